"""Choosing settings on validation data only, and the order of a suite's runs.

For each task and each method with settings to choose, every grid point trains on train800 and is scored on
val200 (first seed only); the best mean val accuracy wins (ties: the earlier grid point). The final runs then
train on train800val200 with the chosen settings, one per seed, and are scored once on test. Test accuracy never
chooses anything: ``plan`` reads val records only to choose.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heartlora.errors import ConfigError

FORMAT = "heartlora-suite-results"


@dataclass(frozen=True)
class Profile:
    """What a suite profile runs. ``grids``: per method, the settings tried on val200; a value "from:<method>" reuses
    the setting chosen for that method on the same task (chosen on val200 too) instead of searching it again."""

    name: str
    img_size: int
    epochs: int
    batch_size: int
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None
    note: str = ""
    # The engine's own profile (``heartlora train --profile``) whose defaults the runs take, e.g. its few-shot floor.
    engine_profile: str | None = None
    # Methods run on fewer seeds than the profile's (e.g. a variant shown on the selection seed only).
    method_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def seeds_of(self, method: str) -> tuple[int, ...]:
        """The seeds ``method`` runs on: its own subset (kept in the profile's order) or every seed."""
        only = self.method_seeds.get(method)
        return tuple(s for s in self.seeds if s in only) if only else self.seeds

    def schedule(self) -> str:
        return f"{self.img_size}px-{self.epochs}ep-b{self.batch_size}"


def settings_tag(settings: dict[str, Any]) -> str:
    """``ne12_scale1.0``: the chosen settings in a folder name ('' when there are none)."""
    return "_".join(f"{k}{settings[k]}" for k in sorted(settings))


def run_id(profile: Profile, protocol: str, task: str, method: str, settings: dict[str, Any], seed: int) -> str:
    """Unique per result-determining choice; the schedule is in it so that a changed profile never reuses runs."""
    tag = settings_tag(settings)
    return f"{profile.name}/{profile.schedule()}/{protocol}/{task}/{method}{'_' + tag if tag else ''}_s{seed}"


def records_by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in data["records"]}


def load_results(path: Path) -> dict[str, Any]:
    """The results file, or an empty one."""
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a suite results file (format {data.get('format')!r}): pass another "
                              "--results")
        return data
    return {"format": FORMAT, "records": []}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a kill mid-write leaves the old file), readable by all."""
    from heartlora._paths import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    os.chmod(path, 0o644)


def save_results(data: dict[str, Any], path: Path) -> None:
    """Write atomically (a kill mid-write leaves the old file); records sorted by id."""
    data["records"].sort(key=lambda r: r["id"])
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the results file ``path`` (a ``.lock`` file beside it), held while the block reads and
    writes it: two processes changing the same file never lose each other's records."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def add_record(rec: dict[str, Any], path: Path, machine_key: str | None = None,
               machine: dict[str, Any] | None = None) -> None:
    """Add (or replace, by id) one record under the file's lock (``locked``); the write itself is atomic
    (``save_results``)."""
    with locked(path):
        data = load_results(path)
        data["records"] = [r for r in data["records"] if r["id"] != rec["id"]] + [rec]
        if machine_key is not None and machine is not None:
            data.setdefault("machines", {})[machine_key] = machine
        save_results(data, path)


def grid_points(grid: dict[str, Any], chosen: dict[str, dict[str, Any]], method: str) -> list[dict[str, Any]] | None:
    """Settings to try on val200 for ``method``; None when a "from:" dependency has not been chosen yet.

    "from:M" takes M's choice; "from:M/k" takes it divided by k (global ne → per-layer ne over k layers, at
    least 1)."""
    fixed: dict[str, Any] = {}
    search: dict[str, list[Any]] = {}
    for key, spec in grid.items():
        if isinstance(spec, str) and spec.startswith("from:"):
            src, _, div = spec[5:].partition("/")
            if src not in chosen:
                return None
            value = chosen[src][key]
            fixed[key] = max(1, round(value / int(div))) if div else value
        else:
            search[key] = list(spec)
    points = [dict(fixed)]
    for key, values in search.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def choose(candidates: list[tuple[dict[str, Any], list[float]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The settings with the best mean val accuracy; ties go to the earlier grid point. Returns (choice, table)."""
    table = [{"settings": s, "val_acc": sum(a) / len(a), "n": len(a)} for s, a in candidates]
    best = max(range(len(table)), key=lambda i: (table[i]["val_acc"], -i))
    return table[best]["settings"], table


def plan(profile: Profile, data: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any], int, dict | None]]:
    """Every run that can start now, as (protocol, task, method, settings, seed, selection), choosing settings from
    the val runs already recorded: a task's final runs of a method with settings to choose wait for its val runs
    (and so do the methods listed after it on that task, which may reuse its choice). Order: seed by seed (val runs
    first), then task, then method, so that an interrupted suite leaves whole seeds. Called again after each run."""
    recs = records_by_id(data)
    ready = []
    for ti, task in enumerate(profile.tasks):
        chosen: dict[str, dict[str, Any]] = {}
        for mi, method in enumerate(profile.methods):
            grid = profile.grids.get(method, {})
            selection = None
            if grid:
                points = grid_points(grid, chosen, method)
                if points is None:
                    raise ConfigError(f"profile {profile.name}: {method} depends on a method listed after it: "
                                      "reorder the profile's methods")
                searched = any(not (isinstance(v, str)) for v in grid.values())
                if searched and len(points) > 1:
                    missing = [pt for pt in points
                               if run_id(profile, "val", task, method, pt, profile.seeds[0]) not in recs]
                    if missing:
                        ready += [((-1, ti, mi), ("val", task, method, pt, profile.seeds[0], None)) for pt in missing]
                        break
                    cands = [(pt, [recs[run_id(profile, "val", task, method, pt, profile.seeds[0])]["accuracy"]])
                             for pt in points]
                    best, table = choose(cands)
                    selection = {"chosen": best, "on": "val200", "seed": profile.seeds[0], "candidates": table}
                else:
                    best = points[0]
                    selection = {"chosen": best, "on": "val200 (reused from another method's choice)",
                                 "rule": {k: v for k, v in grid.items()}}
                chosen[method] = best
            else:
                best = {}
            for seed in profile.seeds_of(method):
                if run_id(profile, "final", task, method, best, seed) not in recs:
                    ready.append(((profile.seeds.index(seed), ti, mi), ("final", task, method, best, seed, selection)))
    return [item for _, item in sorted(ready, key=lambda kv: kv[0])]


def next_run(profile: Profile, data: dict[str, Any]) -> tuple | None:
    ready = plan(profile, data)
    return ready[0] if ready else None


def count_runs(profile: Profile, data: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """(the profile's recorded runs, how many runs the whole profile takes): every val grid point on the first
    seed, plus one final run per task, method and seed of that method."""
    total = 0
    for method in profile.methods:
        grid = profile.grids.get(method, {})
        searched = {k: v for k, v in grid.items() if not isinstance(v, str)}
        n_points = 1
        for values in searched.values():
            n_points *= len(values)
        total += len(profile.tasks) * ((n_points if n_points > 1 else 0) + len(profile.seeds_of(method)))
    prefix = f"{profile.name}/{profile.schedule()}/"
    mine = [r for r in data["records"] if r["id"].startswith(prefix) and r["task"] in profile.tasks
            and r.get("suite_method") in profile.methods
            and (r.get("role") == "select" or int(r["seed"]) in profile.seeds_of(r["suite_method"]))]
    return mine, total
