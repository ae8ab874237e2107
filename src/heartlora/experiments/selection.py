"""Choosing settings on validation data only, and the order of a suite's runs.

For each task and each method with settings to choose, every grid point trains on train800 and is scored on
val200 (first seed only); the best mean val accuracy wins (ties: the earlier grid point). The final runs then
train on train800val200 with the chosen settings, one per seed, and are scored once on test. Test accuracy never
chooses anything: ``plan`` reads val records only to choose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
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


def settings_tag(settings: dict[str, Any]) -> str:
    """``ne12_scale1.0``: the chosen settings in a folder name ('' when there are none)."""
    return "_".join(f"{k}{settings[k]}" for k in sorted(settings))


def run_id(profile: Profile, protocol: str, task: str, method: str, settings: dict[str, Any], seed: int) -> str:
    """Unique per result-determining choice; the schedule is in it so that a changed profile never reuses runs."""
    tag = settings_tag(settings)
    sched = f"{profile.img_size}px-{profile.epochs}ep-b{profile.batch_size}"
    return f"{profile.name}/{sched}/{protocol}/{task}/{method}{'_' + tag if tag else ''}_s{seed}"


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


def save_results(data: dict[str, Any], path: Path) -> None:
    """Write atomically (a kill mid-write leaves the old file); records sorted by id."""
    from heartlora._paths import atomic_path

    data["records"].sort(key=lambda r: r["id"])
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.chmod(path, 0o644)


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


def plan(profile: Profile, data: dict[str, Any]) -> Iterable[tuple[str, str, str, dict[str, Any], int, dict | None]]:
    """Yields (protocol, task, method, settings, seed, selection) in run order, choosing settings from the val runs
    already recorded. Called again after each run, so it sees new records (val runs come first per task)."""
    recs = records_by_id(data)
    for task in profile.tasks:
        chosen: dict[str, dict[str, Any]] = {}
        for method in profile.methods:
            grid = profile.grids.get(method, {})
            selection = None
            if grid:
                points = grid_points(grid, chosen, method)
                if points is None:
                    raise ConfigError(f"profile {profile.name}: {method} depends on a method listed after it: "
                                      "reorder the profile's methods")
                searched = any(not (isinstance(v, str)) for v in grid.values())
                if searched and len(points) > 1:
                    cands = []
                    for pt in points:
                        rid = run_id(profile, "val", task, method, pt, profile.seeds[0])
                        if rid not in recs:
                            yield "val", task, method, pt, profile.seeds[0], None
                            return
                        cands.append((pt, [recs[rid]["accuracy"]]))
                    best, table = choose(cands)
                    selection = {"chosen": best, "on": "val200", "seed": profile.seeds[0], "candidates": table}
                else:
                    best = points[0]
                    selection = {"chosen": best, "on": "val200 (reused from another method's choice)",
                                 "rule": {k: v for k, v in grid.items()}}
                chosen[method] = best
            else:
                best = {}
            for seed in profile.seeds:
                rid = run_id(profile, "final", task, method, best, seed)
                if rid not in recs:
                    yield "final", task, method, best, seed, selection
                    return


def next_run(profile: Profile, data: dict[str, Any]) -> tuple | None:
    for item in plan(profile, data):
        return item
    return None
