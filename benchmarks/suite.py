"""The accuracy suite: methods × tasks × seeds on the offline DINOv2-S/14, resumable, into docs/results.json.

Protocol (docs/METHOD.md §5, with val200 selection; the logic is heartlora.experiments.selection): for each task and each method with settings to choose (``ne``, ``scale``),
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
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from heartlora.experiments import (
    METHODS,
    PROFILES,
    Profile,
    group_of,
    load_results,
    machine,
    next_run,
    run_id,
    save_results,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.json"
RUNS = ROOT / "runs" / "suite"


def make_record(run: str, profile: Profile, method: str, extra: dict[str, Any], metrics: dict[str, Any],
                role: str, selection: dict[str, Any] | None) -> dict[str, Any]:
    """A results record: the run's metrics.json without the per-epoch history (it stays in the run folder; the
    last epoch's numbers are kept), plus what the suite knows."""
    rec = {k: v for k, v in metrics.items() if k not in ("history", "status", "files")}
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
        import heartlora.experiments.peft_lora  # noqa: F401  (registers the method)
    return run, train(cfg)


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
        data = load_results(RESULTS)
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
        data = load_results(RESULTS)  # re-read: the file may have been committed or reported on meanwhile
        data["records"] = [r for r in data["records"] if r["id"] != run] + [rec]
        data.setdefault("machines", {})[profile.name] = machine()
        save_results(data, RESULTS)
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
    data = load_results(RESULTS)
    mine = [r for r in data["records"] if r["profile"] == profile.name]
    print(f"{len(mine)} runs recorded for profile {profile.name}; next: {next_run(profile, data)}")
    return 0


def report(profile_name: str) -> None:
    """Write the report for the results file (benchmarks/report.py, in its own process: the scripts never import
    each other). With --results elsewhere it goes beside that file, never into docs/."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "report.py"), "--profile", profile_name,
           "--results", str(RESULTS)]
    subprocess.run(cmd, check=True)


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
