"""Does refining ``--ne auto``'s search change accuracy? val200 only (train on train800, score on val200; test is
never read), at the ``cpu`` profile with today's defaults pinned, on the visible tasks and seeds 42, 43 and 44.

The refinement (``choose_ne(refine=True)``; ``--ne-refine`` when these runs were made, the default since this
comparison's verdict, turned off with ``--no-ne-refine``): when a share of heads fails the tolerance, the share
halfway between it and the last that passed is tried once more and chosen if it passes. It can only change a run
where that extra share passes; everything before the choice (the warmup, the scores, the coarse candidates) is the
same run. So, per (task, seed):

1. ``probe``: the heart-lora run with ``--ne auto`` up to the end of its warmup (``--stop-after-epoch``), which
   writes the checkpoint and records both choices: the coarse one (the last coarse share that passed) and the
   refined one.
2. Only where they differ: the run is completed from that checkpoint (``--resume``: the refined choice), and the
   coarse choice runs in full beside it as ``--ne N`` (the same heads: ``--ne auto`` switches off
   ``select_heads(fraction=f)``, which is the ``N = floor(f x 72)`` least responsive, as ``--ne N`` does). Where they
   agree, both rules train the same run: its difference is 0 and nothing more runs.

The rule, fixed before any of these runs: the refinement becomes the default if the mean val200 change (refined −
coarse) over all 21 (task, seed) cells is at least ``-MARGIN`` (0.3 points, the accuracy issue 16 allows a heart
method below LoRA), and ``--ne-refine`` then becomes the default of ``--ne auto`` (for every heart method: the
search does not depend on the adapter's bits); otherwise it stays an option. The bytes it saves are reported beside
it.

    python benchmarks/ne_refine.py --jobs 2            # resumable; runs what is left
    python benchmarks/ne_refine.py --status
    python benchmarks/ne_refine.py --report            # docs/research/sweeps/ne_refine.{md,json}
    python benchmarks/ne_refine.py --final --jobs 2    # probe the cpu suite's heart runs (test), after the verdict
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import IO, Any

from heartlora._paths import atomic_path
from heartlora_bench import METHODS, PROFILES, load_results, run_id

ROOT = Path(__file__).resolve().parent.parent
TASKS = PROFILES["cpu"].tasks  # the visible tasks, as the defaults sweep has them
SUITE_RESULTS = ROOT / "benchmarks" / "records" / "results.json"
SUITE_RUNS = ROOT / "runs" / "suite"  # benchmarks/suite.py's run folders

SEEDS = (42, 43, 44)
MARGIN = 0.003  # 0.3 points of val200 accuracy
# today's defaults, pinned so that the runs mean the same after a default changes
PINNED = ["--method", "heart-lora", "--profile", "cpu", "--protocol", "val", "--pool", "cls+mean", "--drop-path", "0",
          "--scale", "4", "--lr", "1e-3", "--weight-decay", "1e-4", "--targets", "q,v", "--rank", "8",
          "--scope", "global"]
AUTO = ["--ne", "auto", "--ne-tolerance", "0.02"]  # the refined search is the default (the first probes gave
# --ne-refine, the flag of the time); a resumed run keeps its settings
DEST = ROOT / "docs" / "research" / "sweeps" / "ne_refine"
FINAL_METHODS = ("heart-lora", "heart-bi-lora")


def warmup_epochs(task: str) -> int:
    from heartlora.engine.settings import TrainConfig, resolve

    return resolve(TrainConfig(task=task, profile="cpu", method="heart-lora", protocol="val")).warmup_epochs


def folders(runs: Path, task: str, seed: int) -> tuple[Path, Path]:
    return runs / task / f"refined-s{seed}", runs / task / f"coarse-s{seed}"


def cmd(task: str, seed: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "heartlora", "train", "--task", task, "--seed", str(seed), *PINNED, *extra,
            "--out", str(out), "--quiet", "--threads", "1"]


def probe_choice(folder: Path) -> dict[str, Any] | None:
    """The ne choice recorded in the probe's checkpoint (or in the finished run's metrics.json)."""
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())["ne_choice"]
    if not (folder / "checkpoint.pt").is_file():
        return None
    from heartlora.engine.checkpoint import load_checkpoint
    from heartlora.engine.state import TrainState

    return TrainState.from_checkpoint(load_checkpoint(folder / "checkpoint.pt")).decisions.get("ne_choice")


def coarse_of(choice: dict[str, Any]) -> int:
    """What the search without refinement chose: the last coarse candidate that passed."""
    return [c["ne"] for c in choice["candidates"] if not c.get("refine") and c["passes"]][-1]


def committed() -> dict[str, dict[str, Any]]:
    """The cells already in docs/research/sweeps/ne_refine.json: a later session (a fresh machine, no runs/) keeps
    them."""
    path = DEST.with_suffix(".json")
    return json.loads(path.read_text()).get("cells", {}) if path.is_file() else {}


def todo(runs: Path) -> list[tuple[str, list[str], Path]]:
    """(what, command, folder) still to run: every probe first (cheap: they say where the rules differ), then the
    completions the probes asked for. A cell the committed JSON has complete is not run again; one it has half
    (the choices and one accuracy) runs only the missing half."""
    probes, out = [], []
    saved = committed()
    for seed in SEEDS:
        for task in TASKS:
            refined, coarse = folders(runs, task, seed)
            choice = probe_choice(refined)
            old = saved.get(f"{task} s{seed}", {})
            if choice is None and old and (old["coarse_ne"] == old["refined_ne"] or "refined_acc" in old):
                choice = {"ne": old["refined_ne"], "candidates": old["candidates"]}  # the committed probe
            need_refined = "refined_acc" not in old and not (refined / "metrics.json").is_file()
            if choice is None:
                stop = ["--stop-after-epoch", str(warmup_epochs(task))]
                flags = ["--resume"] if refined.is_dir() and any(refined.iterdir()) else []
                probes.append((f"probe {task} s{seed}", cmd(task, seed, refined, *AUTO, *stop, *flags),
                               refined))
                continue
            if choice["ne"] == coarse_of(choice):
                continue
            if need_refined:
                out.append((f"refined {task} s{seed}", cmd(task, seed, refined, *AUTO, "--resume"), refined))
            if "coarse_acc" not in old and not (coarse / "metrics.json").is_file():
                flags = (["--resume"] if (coarse / "checkpoint.pt").is_file()
                         else ["--overwrite"] if coarse.is_dir() and any(coarse.iterdir()) else [])
                out.append((f"coarse {task} s{seed}", cmd(task, seed, coarse, "--ne", str(coarse_of(choice)), *flags),
                            coarse))
    return probes + out


def final_items() -> list[tuple[str, str, int, str, dict[str, Any] | None]]:
    """The cpu suite's default heart runs (benchmarks/records/results.json): (run id, task, seed, method, its
    record)."""
    profile = PROFILES["cpu"]
    by_id = {r["id"]: r for r in load_results(SUITE_RESULTS)["records"]}
    out = []
    for seed in SEEDS:
        for task in TASKS:
            for method in FINAL_METHODS:
                run = run_id(profile, "final", task, method, {}, seed)
                out.append((run, task, seed, method, by_id.get(run)))
    return out


def refined_record(rec: dict[str, Any] | None) -> bool:
    return rec is not None and any("refine" in c for c in (rec.get("ne_choice") or {}).get("candidates", []))


def final_probe_command(task: str, seed: int, method: str, out: Path) -> list[str]:
    """benchmarks/suite.py's command for this run (its ``run_command``, which tests/test_benchmarks.py compares), up
    to the end of the warmup."""
    profile, spec = PROFILES["cpu"], dict(METHODS[method])
    command = [sys.executable, "-m", "heartlora", "train", "--method", spec.pop("method"), "--task", task,
               "--protocol", "final", "--seed", str(seed), "--out", str(out), "--device", "auto", "--profile",
               profile.engine_profile]
    for key, value in spec.items():
        command += ["--" + key.replace("_", "-"), str(value)]
    return [*command, "--threads", str(profile.threads), "--stop-after-epoch", str(warmup_epochs(task))]


def final_todo() -> list[tuple[str, list[str], Path]]:
    """The suite's test runs under the refined search, first step: each default heart run whose record predates it
    is probed to the end of its warmup in the suite's own folder (the suite's command, ``--stop-after-epoch``), which
    says whether the refined choice differs from the coarse one. Where they agree the record stands: the refined
    search trains the same run. Where they differ, ``benchmarks/suite.py run --redo IDS`` (the command --report
    writes) completes the run from that checkpoint and replaces its record."""
    from heartlora.engine.settings import TrainConfig, resolve

    if not resolve(TrainConfig(task="digits")).ne_refine:
        raise SystemExit("--final probes the suite's heart runs under the refined search, which they get once "
                         "--ne-refine is the default: run it after the val200 verdict made it so (--report)")
    path = DEST.with_suffix(".json")
    saved = json.loads(path.read_text()).get("final", {}) if path.is_file() else {}
    out = []
    for run, task, seed, method, rec in final_items():
        if rec is None or refined_record(rec) or run in saved:
            continue  # not in the suite, already under the refined search, or probed in an earlier session
        folder = SUITE_RUNS / run
        if probe_choice(folder) is None:
            out.append((f"final probe {task} s{seed} {method}", final_probe_command(task, seed, method, folder),
                        folder))
    return out


def run(runs: Path, jobs: int, deadline: float | None, final: bool = False) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, str, float, IO]] = []
    started: set[str] = set()
    while True:
        queue = [t for t in (final_todo() if final else todo(runs)) if t[0] not in started]
        while queue and len(running) < jobs and (deadline is None or time.time() < deadline):
            what, command, folder = queue.pop(0)
            folder.parent.mkdir(parents=True, exist_ok=True)
            log = open(folder.parent / f"{folder.name}.log", "a")  # noqa: SIM115 (closed when the process ends)
            running.append((subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                            what, time.time(), log))
            started.add(what)
            print(f"[{time.strftime('%H:%M:%S')}] start {what}", flush=True)
        if not running:
            return
        time.sleep(2.0)
        for item in list(running):
            proc, what, t0, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"    exit {proc.returncode} after {time.time() - t0:.0f} s: {what}", flush=True)
                if proc.returncode == 0 and "probe" in what:
                    started.discard(what)  # a probe may be followed by its completions


def same_warmup_check(refined: Path, coarse: Path) -> dict[str, bool]:
    """What lets an unchanged cell count as 0: the two arms train the same run up to the choice (equal scores and
    first-epoch loss), and ``--ne N`` switches off exactly the heads of the coarse search's share."""
    import torch

    from heartlora.method.deactivate import select_heads

    mr, mc = (json.loads((f / "metrics.json").read_text()) for f in (refined, coarse))
    share = [c["fraction"] for c in mr["ne_choice"]["candidates"] if not c.get("refine") and c["passes"]][-1]
    scores = {k: torch.tensor(v, dtype=torch.float64) for k, v in mr["responsiveness"].items()}
    want = sorted(map(tuple, select_heads(scores, fraction=share)))
    return {"same_warmup": mr["responsiveness"] == mc["responsiveness"]
            and mr["history"][0]["train_loss"] == mc["history"][0]["train_loss"],
            "coarse_heads_match": want == sorted(map(tuple, mc["heads_off"]))}


def collect(runs: Path) -> dict[str, Any]:
    """Per (task, seed): both choices and, where they differ, both val200 accuracies and adapter bytes."""
    cells = committed()
    for seed in SEEDS:
        for task in TASKS:
            key = f"{task} s{seed}"
            refined, coarse = folders(runs, task, seed)
            choice = probe_choice(refined)
            if choice is None:
                continue
            cell = {"task": task, "seed": seed, "coarse_ne": coarse_of(choice), "refined_ne": choice["ne"],
                    "candidates": choice["candidates"]}
            if cell["coarse_ne"] != cell["refined_ne"]:
                if (refined / "metrics.json").is_file() and (coarse / "metrics.json").is_file():
                    cell.update(same_warmup_check(refined, coarse))
                for name, folder in (("refined", refined), ("coarse", coarse)):
                    if (folder / "metrics.json").is_file():
                        m = json.loads((folder / "metrics.json").read_text())
                        cell[f"{name}_acc"], cell[f"{name}_bytes"] = m["accuracy"], m["adapter_bytes"]
                        cell[f"{name}_device"] = m["device"]
                        cell[f"{name}_wall_s"] = m["wall_s"]
                        if name == "refined" and m.get("ne_choice"):
                            cell["choice_seconds"] = m["ne_choice"].get("seconds")
            cells[key] = {**cells.get(key, {}), **cell}  # what this machine ran adds to what was committed
    return {"protocol": "train800 -> val200 (last epoch), cpu profile: 112 px, 10 epochs, batch 32 (4-shot: the "
                        "100-step floor); seeds 42, 43, 44; heart-lora with today's defaults pinned: "
                        + " ".join(PINNED[2:]), "margin": MARGIN, "cells": cells}


def final_cells() -> dict[str, Any]:
    """The suite's test runs (choices only: accuracies are docs/research/RESULTS.md's): the coarse and refined
    choice of the
    probe, the choice of the record it probed, and whether the run was completed under the refined search. A cell
    keeps its probe's figures once it has them: the folder of a redone run holds the completed run, which may have
    been made on another machine than the probe, so its choice goes beside them (``redone_ne``, ``redone_cpu``)."""
    path = DEST.with_suffix(".json")
    cells = json.loads(path.read_text()).get("final", {}) if path.is_file() else {}
    for run, task, seed, method, rec in final_items():
        if run not in cells:
            choice = probe_choice(SUITE_RUNS / run)
            if choice is None:
                continue
            cells[run] = {"coarse_ne": coarse_of(choice), "refined_ne": choice["ne"],
                          "record_ne": rec["heads_off_count"] if rec else None,
                          "record_device": rec.get("device") if rec else None, "rerun": False}
        if refined_record(rec) and not cells[run]["rerun"] and cells[run]["coarse_ne"] != cells[run]["refined_ne"]:
            cells[run].update(rerun=True, redone_ne=rec["heads_off_count"],
                              redone_cpu=(rec.get("machine") or {}).get("cpu"), redone_choice=rec["ne_choice"],
                              redone_tolerance=rec["settings"]["ne_tolerance"])
    return cells


def why_moved(cell: dict[str, Any]) -> str:
    """Why a redone run's choice differs from its probe's: the sampled loss of the probe's share, in the redone run."""
    choice = cell["redone_choice"]
    full = choice["candidates"][0]["loss"]
    probe = [c for c in choice["candidates"] if c["ne"] == cell["refined_ne"]]
    if not probe:
        return "the redone run did not try that share"
    c = probe[0]
    return (f"there that share raised the sampled loss by {100 * c['increase'] / full:.2f} % of its value with "
            f"every head, over the {100 * cell['redone_tolerance']:g} % tolerance; the probe's machine passed it: "
            "two CPUs round the same run differently")


def verdict(data: dict[str, Any]) -> dict[str, Any]:
    cells = [data["cells"].get(f"{t} s{s}") for s in SEEDS for t in TASKS]
    done = [c for c in cells if c is not None and (c["coarse_ne"] == c["refined_ne"] or "coarse_acc" in c
                                                   and "refined_acc" in c)]
    diffs = [0.0 if c["coarse_ne"] == c["refined_ne"] else c["refined_acc"] - c["coarse_acc"] for c in done]
    changed = [c for c in done if c["coarse_ne"] != c["refined_ne"]]
    out = {"cells_done": len(done), "cells": len(cells), "changed": len(changed),
           "mean_change": mean(diffs) if diffs else None,
           "heads_saved": sum(c["refined_ne"] - c["coarse_ne"] for c in done)}
    if len(done) == len(cells):
        out["decision"] = ("--ne-refine becomes the default" if out["mean_change"] >= -MARGIN
                           else "--ne-refine stays an option, off by default")
    return out


def report(runs: Path) -> None:
    data = collect(runs)
    data["verdict"] = verdict(data)
    data["final"] = final_cells()
    with atomic_path(DEST.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")
    v = data["verdict"]
    lines = ["# `--ne auto` with and without the refining share (val200 only)", "",
             "Command: `python benchmarks/ne_refine.py --jobs 2`, then `--report` (this file and ne_refine.json). "
             "The method and the rule are in the script's docstring. Protocol: " + data["protocol"] + ".", "",
             "| task | seed | heads off, coarse | heads off, refined | val200 % coarse | val200 % refined | change |",
             "|---|---|---|---|---|---|---|"]
    for seed in SEEDS:
        for task in TASKS:
            c = data["cells"].get(f"{task} s{seed}")
            if c is None:
                lines.append(f"| {task} | {seed} | | | | | not run yet |")
                continue
            if c["coarse_ne"] == c["refined_ne"]:
                lines.append(f"| {task} | {seed} | {c['coarse_ne']} | {c['refined_ne']} | same run | same run | 0 |")
                continue
            a, b = c.get("coarse_acc"), c.get("refined_acc")
            fa = f"{100 * a:.1f}" if a is not None else "not yet"
            fb = f"{100 * b:.1f}" if b is not None else "not yet"
            ch = f"{100 * (b - a):+.1f}" if a is not None and b is not None else ""
            lines.append(f"| {task} | {seed} | {c['coarse_ne']} | {c['refined_ne']} | {fa} | {fb} | {ch} |")
    lines += ["", f"Cells done: {v['cells_done']} of {v['cells']}; the refining share changed the choice in "
              f"{v['changed']} of them, {v['heads_saved']} more heads off in all."]
    both = [c for c in data["cells"].values() if c.get("coarse_bytes") and c.get("refined_bytes")]
    if both:
        ratio = mean(c["refined_bytes"] / c["coarse_bytes"] for c in both)
        lines.append(f"Where the choice changed ({len(both)} cells with both runs), the refined adapters are "
                     f"{ratio:.3f} x the coarse ones' bytes on average.")
    checked = [c for c in data["cells"].values() if "same_warmup" in c]
    if checked:
        ok = sum(c["same_warmup"] and c["coarse_heads_match"] for c in checked)
        lines.append(f"Check: in {ok} of the {len(checked)} changed cells with both runs, the two arms' warmups are "
                     "identical (the same responsiveness scores and first-epoch loss, bit for bit) and the coarse "
                     "arm's `--ne N` switched off exactly the coarse search's heads: what lets a cell whose choice "
                     "did not change count as 0.")
    cost = [c["choice_seconds"] / c["refined_wall_s"] for c in data["cells"].values()
            if c.get("choice_seconds") and c.get("refined_wall_s")]
    if cost:
        lines.append(f"The choice's own cost with the refining share (`ne_choice.seconds` over the run's wall time, "
                     f"the {len(cost)} refined runs; two runs side by side on 2 CPU cores): median "
                     f"{100 * sorted(cost)[len(cost) // 2]:.1f} %, at most {100 * max(cost):.1f} %.")
    if v["mean_change"] is not None:
        lines.append(f"Mean val200 change over the cells done (0 where the choice is the same): "
                     f"{100 * v['mean_change']:+.2f} points.")
    lines.append(f"Verdict: {v.get('decision', 'not yet: cells are missing')} (the rule: the mean change over all "
                 f"21 cells must be at least -{100 * MARGIN:.1f} points).")
    fin = data["final"]
    if fin:
        lines += ["", "## The suite's test runs (`--final`)", "",
                  "Each default heart run of the cpu suite (benchmarks/records/results.json) probed to the end of "
                  "its warmup "
                  "(`--final`, with the suite's own command): where the probe's refined choice differs from its "
                  "coarse one, the run is done again under the refined search (`benchmarks/suite.py run --redo IDS`, "
                  "which resumes a probe's checkpoint where it finds one) and its record replaced; elsewhere the "
                  "record stands. Accuracies are in docs/research/RESULTS.md.", "",
                  "| run | record's heads off (device) | coarse (probe) | refined (probe) | record now |",
                  "|---|---|---|---|---|"]
        for rid, c in fin.items():
            state = (f"replaced: {c['redone_ne']} off" if c["rerun"]
                     else "stands" if c["coarse_ne"] == c["refined_ne"] else "to rerun")
            lines.append(f"| {rid} | {c['record_ne']} ({c['record_device']}) | {c['coarse_ne']} | {c['refined_ne']} "
                         f"| {state} |")
        other = [rid for rid, c in fin.items() if c["coarse_ne"] != c["record_ne"]]
        if other:
            lines += ["", f"On {len(other)} runs the probe's coarse choice differs from the record it probed: "
                          + ", ".join(f"{rid.split('/final/')[1]} ({fin[rid]['record_device']}, "
                                      f"{fin[rid]['record_ne']} there, {fin[rid]['coarse_ne']} in the probe)"
                                      for rid in other)
                          + ". A record made on another device (a GPU in TF32) can choose otherwise from the same "
                          "seed; where the probe's refined choice equals its coarse one, that record stands as made."]
        redone = [rid for rid, c in fin.items() if c["rerun"]]
        if redone:
            cpus = sorted({str(fin[rid].get("redone_cpu")) for rid in redone})
            moved = [rid for rid in redone if fin[rid]["redone_ne"] != fin[rid]["refined_ne"]]
            lines += ["", f"Redone: {len(redone)} runs, on {', '.join(cpus)} (each record's `machine`); the probes ran "
                          "in an earlier session. The redone run chose the probe's refined share on "
                          f"{len(redone) - len(moved)} of {len(redone)}."
                          + "".join(f" {rid.split('/final/')[1]}: {fin[rid]['redone_ne']} heads where the probe had "
                                    f"{fin[rid]['refined_ne']} ({why_moved(fin[rid])})." for rid in moved)]
        todo_ids = [rid for rid, c in fin.items() if not c["rerun"] and c["coarse_ne"] != c["refined_ne"]]
        if todo_ids:
            lines += ["", f"To rerun ({len(todo_ids)}; each resumes from its probe's checkpoint, and its record is "
                          "replaced): `.venv/bin/python benchmarks/suite.py run --profile cpu --seeds 42,43,44 "
                          f"--jobs 2 --redo {','.join(todo_ids)}`, then `benchmarks/suite.py report --profile cpu`."]
    with atomic_path(DEST.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    heads = ("Cells", "Where", "Check", "The choice", "Mean", "Verdict")
    print("\n".join(line for line in lines if line.startswith(heads)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ne-refine")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--status", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--final", action="store_true",
                    help="probe the suite's test runs under the refined search (only after the val200 verdict)")
    args = ap.parse_args(argv)
    if args.status:
        left = final_todo() if args.final else todo(args.runs)
        print(f"{len(left)} runs ready to start (probes decide what follows):")
        for what, _, _ in left:
            print("  " + what)
        return
    if args.report:
        report(args.runs)
        return
    run(args.runs, max(1, args.jobs), None if args.deadline_s is None else time.time() + args.deadline_s, args.final)
    report(args.runs)


if __name__ == "__main__":
    main()
