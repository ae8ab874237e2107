"""The accuracy suite: methods × tasks × seeds on the offline DINOv2-S/14, resumable, into docs/results.json.

Protocol (SPEC §5, with val200 selection): for each task and each method with settings to choose (``ne``, ``scale``),
every grid point trains on train800 and is scored on val200 (``--protocol val``, first seed only); the best mean val
accuracy wins (ties: the earlier grid point). The final runs then train on train800val200 with the chosen settings,
one per seed, and are scored once on test (``--protocol final``). Test accuracy never chooses anything.

Each run has its own folder ``runs/suite/<profile>/<protocol>/<task>/<method>[_<settings>]_s<seed>`` and one
record in ``docs/results.json`` (the run's metrics.json fields, without the per-epoch history, plus the suite's).
A run whose record is there is never redone; an interrupted run resumes from its checkpoint.

    .venv/bin/python benchmarks/suite.py run --profile quick      # then: ... report (also done at the end of run)
    .venv/bin/python benchmarks/suite.py status --profile quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.json"
RUNS = ROOT / "runs" / "suite"
FORMAT = "heartlora-suite-results"

# Method name in the suite → engine method and fixed settings. heart-lora-layer is the paper's Heart-LoRA†.
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear"},
    "lora": {"method": "lora"},
    "peft-lora": {"method": "peft-lora"},
    "heart-lora": {"method": "heart-lora", "scope": "global"},
    "heart-lora-layer": {"method": "heart-lora", "scope": "layer"},
    "bi-lora": {"method": "bi-lora"},
    "heart-bi-lora": {"method": "heart-bi-lora", "scope": "global"},
}
GROUPS = ("natural", "structured", "few-shot")
NATURAL = ("mnist", "fashion_mnist", "digits")
STRUCTURED = ("dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist", "smallnorb_azi", "smallnorb_ele")
FEWSHOT = tuple(f"fashion_mnist@{k}shot" for k in (1, 2, 4, 8, 16))


@dataclass(frozen=True)
class Profile:
    """What a profile runs. ``grids``: per method, the settings tried on val200; a value "from:<method>" reuses the
    setting chosen for that method on the same task (chosen on val200 too) instead of searching it again."""

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


PROFILES: dict[str, Profile] = {
    # Sized for ≤ 45 minutes on a shared 2-core CPU: small images, 3 epochs (1 warmup), one seed, 2 + 2 + 1 tasks,
    # and one searched setting (ne of global Heart-LoRA); the other heart methods reuse its choice.
    "quick": Profile(
        name="quick", img_size=42, epochs=3, batch_size=32, seeds=(42,),
        tasks=("digits", "fashion_mnist", "dsprites_loc", "smallnorb_ele", "fashion_mnist@4shot"),
        methods=tuple(METHODS),
        grids={"heart-lora": {"ne": [12, 36]},
               "heart-lora-layer": {"ne": "from:heart-lora/12"},
               "heart-bi-lora": {"ne": "from:heart-lora"}},
        threads=1,
        note="42 px, 3 epochs (1 warmup), batch 32, seed 42; tasks digits, fashion_mnist (natural), dsprites_loc, "
             "smallnorb_ele (structured), fashion_mnist@4shot (few-shot); ne of heart-lora chosen on val200 from "
             "{12, 36}, reused by heart-bi-lora and, divided by the 12 layers, by heart-lora-layer; every scale 1.0",
    ),
    # A trial of the machinery only (tests, a first look): tiny images, 2 epochs, one task.
    "smoke": Profile(
        name="smoke", img_size=28, epochs=2, batch_size=32, seeds=(42,), tasks=("digits",), methods=tuple(METHODS),
        grids={"heart-lora": {"ne": [12, 36]}, "heart-lora-layer": {"ne": "from:heart-lora/12"},
               "heart-bi-lora": {"ne": "from:heart-lora"}},
        threads=1, note="machinery trial: 28 px, 2 epochs, digits only; not a result",
    ),
    # The GPU user's run: SPEC §5's schedule, every task, three seeds, the Bi-LoRA scale grid and an ne grid.
    "full": Profile(
        name="full", img_size=224, epochs=100, batch_size=64, seeds=(42, 43, 44),
        tasks=NATURAL + STRUCTURED + FEWSHOT, methods=tuple(METHODS),
        grids={"heart-lora": {"ne": [6, 12, 24, 36]},
               "heart-lora-layer": {"ne": [1, 2, 3]},
               "bi-lora": {"scale": [0.1, 1.0, 10.0, 100.0]},
               "heart-bi-lora": {"scale": "from:bi-lora", "ne": [6, 12, 24, 36]}},
        note="224 px, 100 epochs (10 warmup), batch 64, seeds 42, 43, 44; every task; ne and scale chosen on val200 "
             "with seed 42",
    ),
}


def group_of(task: str) -> str:
    if "@" in task:
        return "few-shot"
    return "structured" if task in STRUCTURED else "natural"


# ---------------------------------------------------------------------------------------------------------------------
# Results file


def load_results(path: Path | None = None) -> dict[str, Any]:
    """The results file, or an empty one."""
    path = path or RESULTS
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise SystemExit(f"{path} is not a suite results file (format {data.get('format')!r})")
        return data
    return {"format": FORMAT, "records": []}


def save_results(data: dict[str, Any], path: Path | None = None) -> None:
    """Write atomically (a kill mid-write leaves the old file)."""
    path = path or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    data["records"].sort(key=lambda r: r["id"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def records_by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in data["records"]}


def settings_tag(settings: dict[str, Any]) -> str:
    """``ne12_scale1.0``: the chosen settings in a folder name ('' when there are none)."""
    return "_".join(f"{k}{settings[k]}" for k in sorted(settings))


def run_id(profile: Profile, protocol: str, task: str, method: str, settings: dict[str, Any], seed: int) -> str:
    """Unique per result-determining choice; the schedule is in it so that a changed profile never reuses runs."""
    tag = settings_tag(settings)
    sched = f"{profile.img_size}px-{profile.epochs}ep-b{profile.batch_size}"
    return f"{profile.name}/{sched}/{protocol}/{task}/{method}{'_' + tag if tag else ''}_s{seed}"


def make_record(run: str, profile: Profile, method: str, extra: dict[str, Any], metrics: dict[str, Any],
                role: str, selection: dict[str, Any] | None) -> dict[str, Any]:
    """A results record: the run's metrics.json without the per-epoch history (it stays in the run folder; the
    last epoch's numbers are kept), plus what the suite knows."""
    rec = {k: v for k, v in metrics.items() if k not in ("history", "already_finished", "files")}
    default_seeds = PROFILES.get(profile.name, profile).seeds
    seeds_flag = f" --seeds {','.join(map(str, profile.seeds))}" if profile.seeds != default_seeds else ""
    hist = metrics.get("history") or []
    rec.update({
        "id": run, "profile": profile.name, "suite_method": method, "suite_settings": extra, "role": role,
        "group": group_of(metrics["task"]), "selection_info": selection,
        "last_epoch_eval_acc": hist[-1].get("eval_acc") if hist else None,
        "epoch_seconds": [round(h["time_s"], 2) for h in hist],
        "command": f".venv/bin/python benchmarks/suite.py run --profile {profile.name}" + seeds_flag,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return rec


# ---------------------------------------------------------------------------------------------------------------------
# Planning: which runs, in which order


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


# ---------------------------------------------------------------------------------------------------------------------
# Running


def train_one(profile: Profile, protocol: str, task: str, method: str, settings: dict[str, Any], seed: int,
              device: str) -> tuple[str, dict[str, Any]]:
    """Train (or resume, or read back) one run through the engine; returns (id, metrics)."""
    from heartlora.engine import TrainConfig, train

    run = run_id(profile, protocol, task, method, settings, seed)
    out = RUNS / run
    # Killed before its first checkpoint: the engine refuses to resume a folder without one, so start it afresh.
    fresh = out.is_dir() and not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    spec = dict(METHODS[method])
    engine_method = spec.pop("method")
    kwargs = {**spec, **settings}
    cfg = TrainConfig(task=task, method=engine_method, img_size=profile.img_size, epochs=profile.epochs,
                      batch_size=profile.batch_size, seed=seed, protocol=protocol, out=str(out), resume=not fresh,
                      overwrite=fresh, device=device, progress=False, **kwargs)
    if engine_method == "peft-lora":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from peft_lora import train_peft

        return run, train_peft(cfg)
    return run, train(cfg)


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
                    raise SystemExit(f"profile {profile.name}: {method} depends on a method listed after it")
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


def cmd_run(args: argparse.Namespace) -> int:
    profile = PROFILES[args.profile]
    _set_paths(args)
    if args.seeds:
        # More seeds than the profile's (same selection seed first): their runs extend the same tables.
        seeds = tuple(int(x) for x in args.seeds.split(","))
        if seeds[0] != profile.seeds[0]:
            raise SystemExit(f"--seeds must start with the profile's selection seed {profile.seeds[0]}")
        profile = replace(profile, seeds=seeds)
    if profile.threads and not args.threads:
        args.threads = profile.threads
    import torch

    if args.threads:
        # On a shared 2-core machine, 2 OpenMP threads per process collapse when other processes hold the cores
        # (measured: small element-wise ops 20× slower); one thread per process degrades gracefully.
        torch.set_num_threads(args.threads)
    done = 0
    while True:
        data = load_results()
        item = next_run(profile, data)
        if item is None:
            print(f"profile {profile.name}: every run is recorded", flush=True)
            break
        if args.max_runs is not None and done >= args.max_runs:
            print(f"stopped after {done} runs (--max-runs)", flush=True)
            break
        protocol, task, method, settings, seed, selection = item
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {protocol} {task} {method} {settings or ''} seed {seed} ...", flush=True)
        run, metrics = train_one(profile, protocol, task, method, settings, seed, args.device)
        rec = make_record(run, profile, method, settings, metrics, "select" if protocol == "val" else "final",
                          selection)
        rec["threads"] = torch.get_num_threads()
        data = load_results()  # re-read: the file may have been committed or reported on meanwhile
        data["records"] = [r for r in data["records"] if r["id"] != run] + [rec]
        data.setdefault("machines", {})[profile.name] = machine()
        save_results(data)
        done += 1
        print(f"    {metrics['accuracy_split']} acc {metrics['accuracy']:.4f}, {metrics['adapter_bytes']} B, "
              f"{time.time() - t0:.0f} s", flush=True)
        if args.report_every and done % args.report_every == 0:
            report(profile.name)
    report(profile.name)
    return 0


def _set_paths(args: argparse.Namespace) -> None:
    """--results / --runs move the outputs (tests and trial runs keep docs/ clean)."""
    global RESULTS, RUNS
    if getattr(args, "results", None):
        RESULTS = Path(args.results)
    if getattr(args, "runs", None):
        RUNS = Path(args.runs)


def cmd_status(args: argparse.Namespace) -> int:
    profile = PROFILES[args.profile]
    _set_paths(args)
    data = load_results()
    mine = [r for r in data["records"] if r["profile"] == profile.name]
    print(f"{len(mine)} runs recorded for profile {profile.name}; next: {next_run(profile, data)}")
    return 0


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads: recorded with every timing."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version()}


def report(profile_name: str) -> None:
    """Write docs/RESULTS.md and the plots from docs/results.json (benchmarks/report.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report as rep

    rep.write_all(profile_name, RESULTS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every missing run of a profile, then write the report")
    r.add_argument("--profile", choices=list(PROFILES), default="quick")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, help="torch threads (quick: 1, see cmd_run)")
    r.add_argument("--seeds", help="comma-separated seeds, the profile's first (e.g. 42,43): extra seeds' final "
                                   "runs are added to the tables once complete")
    r.add_argument("--max-runs", type=int, help="stop after this many runs (resume later)")
    r.add_argument("--report-every", type=int, default=5, help="rewrite RESULTS.md every N runs")
    s = sub.add_parser("status")
    s.add_argument("--profile", choices=list(PROFILES), default="quick")
    o = sub.add_parser("report", help="write docs/RESULTS.md and the plots from docs/results.json")
    o.add_argument("--profile", choices=list(PROFILES), default="quick")
    for sp in (r, s, o):
        sp.add_argument("--results", help=argparse.SUPPRESS)
        sp.add_argument("--runs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _set_paths(args)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "status":
        return cmd_status(args)
    report(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
