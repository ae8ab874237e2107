"""The accuracy suite: methods × tasks × seeds on the offline DINOv2-S/14, resumable, into
benchmarks/records/results.json.

Protocol (docs/METHOD.md §5, with val200 selection; the logic is heartlora_bench.selection): for each task and each
method with settings to choose (``ne``, ``scale``),
every grid point trains on train800 and is scored on val200 (``--protocol val``, first seed only); the best mean val
accuracy wins (ties: the earlier grid point). The final runs then train on train800val200 with the chosen settings,
one per seed, and are scored once on test (``--protocol final``). Test accuracy never chooses anything.

Each run has its own folder ``runs/suite/<profile>/<protocol>/<task>/<method>[_<settings>]_s<seed>`` and one
record in ``benchmarks/records/results.json`` (the run's metrics.json fields, without the per-epoch history, plus
the suite's).
A run whose record is there is never redone; an interrupted run resumes from its checkpoint.

Each run is its own process (``heartlora train``, or benchmarks/baselines/hf_peft.py for ``linear-probe`` and
``hf-peft``), single-threaded on the cpu profile, ``--jobs`` of them side by side; each finished run's record is
added to the results file at once (under a lock, atomically), so a killed suite loses at most its running runs, and
those resume from their checkpoints (the baseline script's too: it resumes its own folder's). ``--tasks`` /
``--methods`` run a subset, whose records and report go to runs/suite/<profile>-subset/ (or ``--results``), never
to docs/.

    .venv/bin/python benchmarks/suite.py --profile cpu --jobs 2     # = run; resumable; report at the end
    .venv/bin/python benchmarks/suite.py --profile cpu --status     # done / left / rough time left
    .venv/bin/python benchmarks/suite.py run --profile quick        # the smoke profile: says nothing about accuracy
    .venv/bin/python benchmarks/suite.py run --profile cpu --redo ID,ID  # run recorded runs again, replace records
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from heartlora_bench import (
    METHODS,
    PROFILES,
    Profile,
    add_record,
    count_runs,
    group_of,
    load_results,
    machine,
    plan,
    run_id,
)
from heartlora_bench.runner import ended_run, launch, run_pool, start_limit

from heartlora.engine.settings import PROFILES as ENGINE_PROFILES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "records" / "results.json"
RUNS = ROOT / "runs" / "suite"
BASELINE = ROOT / "benchmarks" / "baselines" / "hf_peft.py"
POLL_S = 2.0
# --engine-flags: more `heartlora train` flags per suite method ("*": every engine method; a method's own entry comes
# after, so it wins; "baseline": the baseline script's), e.g.
# '{"*": ["--precision", "tf32"], "baseline": ["--precision", "tf32"]}' to run the cpu profile on a GPU with TF32
# matrix products. Each record lists the flags its run had.
ENGINE_FLAGS: dict[str, list[str]] = {}


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
# Running: each run is its own process (`heartlora train` or the baseline script), one thread each, `--jobs` at once.


def run_command(profile: Profile, protocol: str, task: str, method: str, settings: dict[str, Any], seed: int,
                out: Path, device: str, threads: int | None) -> list[str]:
    """The command line of one run. An engine run killed midway continues from its checkpoint (``--resume``); one
    killed before its first checkpoint starts afresh (``--overwrite``). The baseline script needs no flag: it resumes
    a checkpoint of the same command in its folder by itself."""
    spec = dict(METHODS[method])
    common = ["--task", task, "--protocol", protocol, "--seed", str(seed), "--out", str(out)]
    if "baseline" in spec:
        cmd = [sys.executable, str(BASELINE), "--method", spec["baseline"], *common, "--img-size",
               str(profile.img_size), "--epochs", str(profile.epochs), "--batch-size", str(profile.batch_size)]
        if device != "auto":
            cmd += ["--device", device]
        cmd += ENGINE_FLAGS.get("baseline", [])
    else:
        engine_method = spec.pop("method")
        cmd = [sys.executable, "-m", "heartlora", "train", "--method", engine_method, *common, "--device", device]
        schedule = {"img_size": profile.img_size, "epochs": profile.epochs, "batch_size": profile.batch_size}
        if profile.engine_profile:
            cmd += ["--profile", profile.engine_profile]
        # what the engine profile already sets is not passed again: epochs given on the command line would turn off
        # the engine's K-shot step floor (it raises a profile's epochs only), and the suite promises that floor
        engine = ENGINE_PROFILES.get(profile.engine_profile or "", {})
        for key, value in schedule.items():
            if engine.get(key) != value:
                cmd += ["--" + key.replace("_", "-"), str(value)]
        for key, value in {**spec, **settings}.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        cmd += engine_flags(method)
        if out.is_dir() and any(out.iterdir()):
            cmd.append("--resume" if (out / "checkpoint.pt").exists() else "--overwrite")
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def engine_flags(method: str) -> list[str]:
    if "method" not in METHODS[method]:
        return list(ENGINE_FLAGS.get("baseline", []))
    return [*ENGINE_FLAGS.get("*", []), *ENGINE_FLAGS.get(method, [])]


def record_run(profile: Profile, item: tuple, metrics: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """The record of a finished run, added to the results file at once (locked, atomic)."""
    protocol, task, method, settings, seed, selection = item
    run = run_id(profile, protocol, task, method, settings, seed)
    rec = make_record(run, profile, method, settings, metrics, "select" if protocol == "val" else "final", selection)
    here = machine()
    if threads:
        here["threads"] = threads
    rec["threads"] = here["threads"]
    if engine_flags(method):
        rec["engine_flags"] = engine_flags(method)
    rec["machine"] = here
    add_record(rec, RESULTS, profile.name, here)
    return rec


def cmd_run(args: argparse.Namespace) -> int:
    profile = _profile(args)
    threads = args.threads or profile.threads
    jobs = max(1, args.jobs)
    redo = {x.strip() for x in (getattr(args, "redo", None) or "").split(",") if x.strip()}
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if redo:
        recorded = {r["id"] for r in load_results(RESULTS)["records"]}
        for run in sorted(redo):
            if run not in recorded:
                raise SystemExit(f"--redo {run}: {RESULTS} has no record with that id (the ids are the records' "
                                 "`id`); nothing was run")
            if (RUNS / run / "metrics.json").is_file():
                raise SystemExit(f"--redo {run}: {RUNS / run} holds a finished run, which would be recorded again "
                                 "instead of redone: move that folder away first; nothing was run")

    def current() -> dict[str, Any]:
        """The results, without the records --redo replaces (until this command has written them again)."""
        data = load_results(RESULTS)
        if redo:
            data["records"] = [r for r in data["records"]
                               if r["id"] not in redo or r.get("recorded_at", "") >= since]
        return data

    finished = 0

    def ready() -> list[tuple[str, tuple]]:
        return [(run_id(profile, *item[:5]), item) for item in plan(profile, current())]

    def start(run: str, item: tuple) -> tuple[subprocess.Popen, Any] | None:
        out = RUNS / run
        if (out / "metrics.json").is_file():  # finished, but its record was never written: record it
            record_run(profile, item, json.loads((out / "metrics.json").read_text()), threads)
            print(f"recorded the finished run {run}", flush=True)
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = run_command(profile, *item[:5], out, args.device, threads)
        launched = launch(cmd, out.parent / f"{out.name}.log", ROOT, threads)
        print(f"[{time.strftime('%H:%M:%S')}] start {run}" + (" (resume)" if "--resume" in cmd else ""), flush=True)
        return launched

    def finish(run: str, item: tuple, returncode: int, seconds: float) -> bool:
        nonlocal finished
        metrics = ended_run(RUNS, run, returncode)
        if metrics is None:
            return False
        record_run(profile, item, metrics, threads)
        finished += 1
        print(f"    done {run}: {metrics['accuracy_split']} acc {metrics['accuracy']:.4f}, "
              f"{metrics['adapter_bytes']} B, {seconds:.0f} s", flush=True)
        if args.report_every and finished % args.report_every == 0:
            report(profile.name)
        return True

    _, failed = run_pool(ready, start, finish, jobs=jobs, poll_s=lambda: POLL_S, 
                         may_start=start_limit(args.max_runs, getattr(args, "deadline_s", None)))
    left = len(plan(profile, current()))
    print(f"profile {profile.name}: {finished} runs recorded now, {len(failed)} failed, {left} ready to run",
          flush=True)
    report(profile.name)
    return 1 if failed else 0


def _profile(args: argparse.Namespace) -> Profile:
    """The profile, with --seeds (more seeds) and --tasks / --methods (a subset). A subset's records and report go
    to runs/suite/<profile>-subset/ unless --results says where: a subset never rewrites docs/."""
    global RESULTS, RUNS
    profile = PROFILES[args.profile]
    if getattr(args, "seeds", None):
        # More seeds than the profile's (same selection seed first): their runs extend the same tables.
        seeds = tuple(int(x) for x in args.seeds.split(","))
        if seeds[0] != profile.seeds[0]:
            raise SystemExit(f"--seeds must start with the profile's selection seed {profile.seeds[0]}")
        profile = replace(profile, seeds=seeds)
    subset = {}
    for key, allowed in (("tasks", profile.tasks), ("methods", profile.methods)):
        if getattr(args, key, None):
            chosen = tuple(x.strip() for x in getattr(args, key).split(","))
            unknown = [x for x in chosen if x not in allowed]
            if unknown:
                raise SystemExit(f"--{key} {','.join(unknown)}: not in profile {profile.name} "
                                 f"({', '.join(allowed)})")
            subset[key] = chosen
    if getattr(args, "runs", None):
        RUNS = Path(args.runs)
    elif ENGINE_FLAGS:  # other flags, other runs: never resume the default runs' folders
        key = hashlib.sha256(json.dumps(ENGINE_FLAGS, sort_keys=True).encode()).hexdigest()[:10]
        RUNS = RUNS.parent / f"suite-flags-{key}"
    if subset:
        profile = replace(profile, **subset)
    if getattr(args, "results", None):
        RESULTS = Path(args.results)
    elif ENGINE_FLAGS:  # nor count the default runs' records as done, nor replace them in the suite's records
        RESULTS = RUNS / f"{profile.name}{'-subset' if subset else ''}" / "results.json"
    elif subset:
        RESULTS = RUNS / f"{profile.name}-subset" / "results.json"
    return profile


def status_lines(profile: Profile, data: dict[str, Any], jobs: int, here: dict[str, Any] | None = None) -> list[str]:
    """Done / left / a rough time left: each left run costs the mean wall time of the finished runs most like it
    (same method and task, else same method on tasks of its kind: K-shot or full, else same method, else its kind,
    else any), taken from runs made on a machine like ``here`` (this one: the same CPU model, core count and GPU)
    when there are any, spread over ``jobs`` processes."""
    mine, total = count_runs(profile, data)
    here = here if here is not None else machine()

    def kind(m: dict[str, Any] | None) -> tuple:
        return tuple((m or {}).get(k) for k in ("cpu", "cores", "gpu"))

    timed = [r for r in mine if r.get("wall_s") is not None]
    local = [r for r in timed if kind(r.get("machine")) == kind(here)]
    basis, where = (local, "on this kind of machine") if local else (timed, "on the machines that ran them")

    def mean(rs: list[dict[str, Any]]) -> float | None:
        return sum(float(r["wall_s"]) for r in rs) / len(rs) if rs else None

    def estimate(method: str, task: str) -> float | None:
        shot = "@" in task  # a K-shot run is much shorter than a full one
        for pick in (lambda r: r["suite_method"] == method and r["task"] == task,
                     lambda r: r["suite_method"] == method and ("@" in r["task"]) == shot,
                     lambda r: r["suite_method"] == method, lambda r: ("@" in r["task"]) == shot, lambda r: True):
            m = mean([r for r in basis if pick(r)])
            if m is not None:
                return m
        return None

    done = {(r["suite_method"], r["task"], int(r["seed"])) for r in mine if r.get("role") == "final"}
    left_runs = [(m, t) for m in profile.methods for t in profile.tasks for sd in profile.seeds_of(m)
                 if (m, t, sd) not in done]
    left_by_method = {m: sum(1 for x, _ in left_runs if x == m) for m in profile.methods}
    left = total - len(mine)
    lines = [f"profile {profile.name} ({profile.schedule()}): {len(mine)} of {total} runs done, {left} left"]
    if left and basis:
        secs = sum(estimate(m, t) or 0.0 for m, t in left_runs)
        secs += max(left - len(left_runs), 0) * (mean(basis) or 0.0)  # val runs of a grid
        secs /= jobs
        rough = f"{secs / 3600:.1f} h" if secs >= 3600 else f"{secs / 60:.0f} min"
        lines.append(f"about {rough} left at --jobs {jobs} (mean wall times of the {len(basis)} finished runs "
                     f"{where}, by method and task; a rough guide)")
    elif left:
        lines.append("time left: unknown until a run has finished")
    lines += [f"  {m}: {n} left" for m, n in left_by_method.items() if n]
    ready = plan(profile, data)
    if ready:
        lines.append(f"next: {run_id(profile, *ready[0][:5])}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    profile = _profile(args)
    print("\n".join(status_lines(profile, load_results(RESULTS), max(1, args.jobs))))
    return 0


def report(profile_name: str) -> None:
    """Write the report for the results file (benchmarks/report.py, in its own process: the scripts never import
    each other). With --results elsewhere it goes beside that file, never into docs/."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "report.py"), "--profile", profile_name,
           "--results", str(RESULTS)]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "status", "report"):  # `suite.py --profile cpu [--status]`
        argv = ["status" if "--status" in argv else "run"] + [a for a in argv if a != "--status"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every missing run of a profile, then write the report")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, help="torch threads per run (the profile's, else torch's choice)")
    r.add_argument("--max-runs", type=int, help="start at most this many runs (resume later)")
    r.add_argument("--report-every", type=int, default=5, help="rewrite RESULTS.md every N runs")
    r.add_argument("--engine-flags", help='JSON: suite method (or "*") -> more `heartlora train` flags')
    r.add_argument("--deadline-s", type=float, help="start no run after this many seconds (the rest resume later)")
    r.add_argument("--redo", help="comma-separated record ids to run again although recorded (a checkpoint in the "
                                  "run's folder resumes); each record is replaced when its run finishes")
    s = sub.add_parser("status", help="runs done, left, and a rough time left")
    o = sub.add_parser("report", help="write docs/research/RESULTS.md and the plots from the suite's records")
    for sp in (r, s, o):
        sp.add_argument("--profile", choices=list(PROFILES), default="cpu",
                        help="cpu (default: the suite that learns), paper (GPU), full; quick is a smoke profile")
        sp.add_argument("--seeds", help="comma-separated seeds, the profile's first (e.g. 42,43): extra seeds' final "
                                        "runs are added to the tables once complete")
        sp.add_argument("--tasks", help="a subset of the profile's tasks (its records go to runs/suite/, not docs/)")
        sp.add_argument("--methods", help="a subset of the profile's methods (likewise)")
        sp.add_argument("--results", help="results file (default benchmarks/records/results.json; a subset's: "
                                          "runs/suite/)")
        sp.add_argument("--runs", help=argparse.SUPPRESS)
    for sp in (r, s):
        sp.add_argument("--jobs", type=int, default=2,
                        help="runs side by side (each single-threaded on the cpu profile)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.engine_flags:
            flags = json.loads(args.engine_flags)
            if not isinstance(flags, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                      for v in flags.values()):
                raise SystemExit('--engine-flags must map a method (or "*", "baseline") to a list of strings, e.g. '
                                 '{"*": ["--precision", "tf32"]}')
            ENGINE_FLAGS.update(flags)
        return cmd_run(args)
    if args.cmd == "status":
        return cmd_status(args)
    _profile(args)
    report(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
