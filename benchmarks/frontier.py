"""Accuracy against stored bytes: heartlora's points against every small-adapter method a user could pick in PEFT.

Protocol (the cpu suite's, so its records can be reused): the offline DINOv2 ViT-S/14, 112 px, 10 epochs (1 warmup
for the heart methods), batch 32, one thread a run; tasks: the cpu suite's 7 and the heldout profile's 3.

1. **Learning rate, on val200 only, the same rule for every method** (heartlora's included): each method has a
   reference rate (its paper's or PEFT's docs', heartlora's default); the grid is reference × {1, 1/3, 3}; a point
   trains on train800 and is scored on val200 of the selection tasks (``SELECT_TASKS``: one few-shot, one structured,
   one natural task of the cpu suite; seed 42); the best mean val200 accuracy wins (ties: the earlier grid point, so
   the reference). When the best is at an end of the grid, the grid grows one step (× 3 or ÷ 3) that way, at most
   ``MAX_EXTEND`` times, so a reference off by a decade is still found. Points marked ``lr_from`` take another
   point's choice (heartlora's all-heads-on lora and bi-lora share their heads-off method's rate; its points at
   another rank search their own) and also run val200 at that rate, since heartlora's point at each budget is
   chosen on val200.
2. **Final runs**: train800val200 → test, seed 42 on the 7 cpu tasks first, then seeds 43 and 44 on them for the
   points that decide (every PEFT point, and heartlora's point that each goal compares with it), then seed 42 on the
   3 heldout tasks, which confirm what the cpu tasks decide.
   A final run whose exact command the cpu or heldout suite already ran (same method, settings, learning rate) and
   made the same way (``same_run``) is read from benchmarks/records/results.json instead of run again (its record
   says ``reused_from``).
3. **Bytes**: what a user keeps per task beyond the frozen backbone, counted one way for all (the baseline script's
   docstring): the adapter's tensors at the precision the method stores them, the same at fp16 for float adapters,
   the classifier apart.

Each run is its own process (``heartlora train`` or benchmarks/baselines/hf_peft.py), ``--jobs`` side by side, each
finished run's record added to ``benchmarks/records/frontier.json`` at once (locked, atomic); a recorded run is never
redone; an interrupted run resumes from its checkpoint (an engine run with ``--resume``, the baseline script by
itself). One ``run`` at a time holds runs/frontier.lock: a second ``run``, or a ``supersede`` while it works, is
refused.

    .venv/bin/python benchmarks/frontier.py run --jobs 2          # resumable; writes the report at the end
    .venv/bin/python benchmarks/frontier.py run --finish-by 08:40  # start only runs expected to end by then
    .venv/bin/python benchmarks/frontier.py status                # done / left / what runs next
    .venv/bin/python benchmarks/frontier.py report                # docs/research/FRONTIER.md and frontier.png
    .venv/bin/python benchmarks/frontier.py supersede fourierft --why "…"  # a point's recipe changed: run it anew
    python benchmarks/frontier.py run --device cuda --jobs 14 --records F   # a lent GPU: the same protocol, fp32
    .venv/bin/python benchmarks/frontier.py merge runs/gpu/frontier.json    # here: the GPU's new runs into the records

The protocol is a CPU's, but it is not tied to one: ``run --device cuda`` trains the same runs on a lent GPU in exact
fp32 (no TF32, no bf16), many side by side, which finishes in minutes what takes two CPU cores weeks. Its backbone
weights went through fp16 for the transfer (benchmarks/gpu_carry.py: within 2^-11 relative of the CPU's), so its
runs are not bit-identical to a CPU's; the report counts the final runs each kind of machine made.
    python benchmarks/frontier.py paper --jobs 8 --device cuda --precision bf16   # a GPU: the paper protocol

``paper`` runs every point whose rate the cpu protocol has chosen at the paper's protocol (224 px, 100 epochs,
batch 64; seed 42; the cpu tasks first, then heldout, task by task so that the tasks run hold every point) into
benchmarks/records/frontier-paper.json; the report shows them in their own table. Its rates are the cpu protocol's
choices, not searched again at 100 epochs: a caveat the table states.

``report`` also rewrites the README's first table (between its ``<!-- frontier:begin -->`` and ``<!-- frontier:end
-->`` marks) once every compared point has all its cpu cells, and leaves it as it is until then.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from heartlora_bench import add_record, load_results, locked, machine, save_results, write_text_atomic
from heartlora_bench.runner import ended_run, launch, run_pool, start_limit
from heartlora_bench.suite import CPU_TASKS, HELDOUT_TASKS

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records" / "frontier.json"
SUPERSEDED = ROOT / "benchmarks" / "records" / "frontier_superseded.json"  # runs made with a recipe no longer run
COMMITTED = RECORDS  # the records the README's table is written from (--records points RECORDS elsewhere)
SUITE_RESULTS = ROOT / "benchmarks" / "records" / "results.json"
RUNS = ROOT / "runs"  # a run folder is runs/<its id>, and every id starts with frontier/
BASELINE = ROOT / "benchmarks" / "baselines" / "hf_peft.py"
DOC = ROOT / "docs" / "research" / "FRONTIER.md"
PLOT = ROOT / "docs" / "research" / "frontier.png"
SCHEDULE = {"img_size": 112, "epochs": 10, "batch_size": 32}
TAG = "frontier/112px-10ep-b32"
# `paper`: the same points at the paper's protocol (the engine's `paper` profile) on a GPU, seed 42, each at the rate
# the cpu protocol chose on val200 (no search of its own: a GPU session has minutes), into their own records
PAPER = {"img_size": 224, "epochs": 100, "batch_size": 64}
PAPER_TAG = "frontier/224px-100ep-b64"
PAPER_RECORDS = ROOT / "benchmarks" / "records" / "frontier-paper.json"
SELECT_TASKS = ("fashion_mnist@4shot", "dsprites_loc", "fashion_mnist")
TASKS = CPU_TASKS + HELDOUT_TASKS
SEEDS = (42, 43, 44)
LR_STEP = 3.0
MAX_EXTEND = 5
POLL_S = 2.0

# name → how it runs. "peft": the baseline script's --method; "engine": `heartlora train` flags; "lr": the reference
# rate; "lr_from": take that point's chosen rate; "suite": the suite method whose records are this point's runs at
# the reference rate; "family": the line it belongs to in the plot.
POINTS: dict[str, dict[str, Any]] = {
    "lora-r1": {"peft": "lora-r1", "lr": 1e-3, "family": "PEFT LoRA (q, v)"},
    "lora-r2": {"peft": "lora-r2", "lr": 1e-3, "family": "PEFT LoRA (q, v)"},
    "lora-r4": {"peft": "lora-r4", "lr": 1e-3, "family": "PEFT LoRA (q, v)"},
    "lora-r8": {"peft": "hf-peft", "lr": 1e-3, "suite": "hf-peft", "family": "PEFT LoRA (q, v)"},
    "vera": {"peft": "vera", "lr": 4e-2, "family": "PEFT VeRA"},
    "fourierft": {"peft": "fourierft", "lr": 2e-1, "family": "PEFT FourierFT"},
    "vblora": {"peft": "vblora", "lr": 1e-2, "family": "PEFT VB-LoRA"},
    # (IA)³ and LN tuning search from where their first search ended (0.027 from the paper's 3e-3, 0.081 from 1e-3):
    # superseded when their recipe dropped weight decay on their scales and norms, they start again there
    "ia3": {"peft": "ia3", "lr": 2.7e-2, "family": "PEFT (IA)³"},
    "ln-tuning": {"peft": "ln-tuning", "lr": 8.1e-2, "family": "PEFT LN tuning"},
    # the same methods scaled under 20 KB (goal 2's budget); each searches its own rate around its preset's reference
    "fourierft-n400": {"peft": "fourierft-n400", "lr": 2e-1, "family": "PEFT FourierFT"},
    "vblora-v60": {"peft": "vblora-v60", "lr": 1e-2, "family": "PEFT VB-LoRA"},
    "ia3-kv": {"peft": "ia3-kv", "lr": 2.7e-2, "family": "PEFT (IA)³"},
    "heart-bi-lora": {"engine": ["--method", "heart-bi-lora", "--scope", "global"], "lr": 1e-3,
                      "suite": "heart-bi-lora", "family": "heartlora 1-bit"},
    "bi-lora": {"engine": ["--method", "bi-lora"], "lr_from": "heart-bi-lora", "suite": "bi-lora",
                "family": "heartlora 1-bit"},
    "heart-lora": {"engine": ["--method", "heart-lora", "--scope", "global"], "lr": 1e-3, "suite": "heart-lora",
                   "family": "heartlora float"},
    "lora": {"engine": ["--method", "lora"], "lr_from": "heart-lora", "suite": "lora", "family": "heartlora float"},
    # budget reallocation: the bytes of switched-off heads spent on a higher rank for the heads kept. A layer's A
    # factor (rank × 384) serves all its heads and only B's rows go with a head, so q and v at rank R with k heads
    # kept in L layers store 2·R·(2·384·L + 2·64·k) bytes at fp16 (a layer with no head kept stores nothing): rank
    # 16 with half the heads off is about 1.5 × LoRA r8's 294,912. These two come near it from below (a 28 px digits
    # run stored 270,336 and 261,120 bytes; the heads kept, so L and the bytes, vary by task).
    # Each searches its own rate (reference: heart-lora's): the delta is scale·B·A at a fixed scale, so a higher rank
    # moves the output faster at a given rate.
    "heart-lora-r16-ne48": {"engine": ["--method", "heart-lora", "--scope", "global", "--rank", "16", "--ne", "48"],
                            "lr": 1e-3, "family": "heartlora float"},
    "heart-lora-r10-ne36": {"engine": ["--method", "heart-lora", "--scope", "global", "--rank", "10", "--ne", "36"],
                            "lr": 1e-3, "family": "heartlora float"},
    # heartlora between 20 KB and LoRA r8's bytes, where most of PEFT's small methods sit (VeRA 31 KB, LoRA r1 37 KB,
    # LN tuning 38 KB, FourierFT 48 KB, IA³ 55 KB, LoRA r2 74 KB, r4 147 KB): without them every one of those is
    # compared with the 19 KB 1-bit Bi-LoRA, which says nothing of heartlora at their bytes. 1 bit at rank 16 and
    # float at rank 2 and 4, `--ne auto` as the defaults (on fashion_mnist@4shot they stored 20-30 KB, 68 KB and
    # 135 KB at fp16: at a low rank `--ne auto` keeps most heads). Each searches its own rate around heartlora's
    # default, as the reallocation points do.
    "heart-bi-lora-r16": {"engine": ["--method", "heart-bi-lora", "--scope", "global", "--rank", "16"], "lr": 1e-3,
                          "family": "heartlora 1-bit"},
    "heart-lora-r2": {"engine": ["--method", "heart-lora", "--scope", "global", "--rank", "2"], "lr": 1e-3,
                      "family": "heartlora float"},
    "heart-lora-r4": {"engine": ["--method", "heart-lora", "--scope", "global", "--rank", "4"], "lr": 1e-3,
                      "family": "heartlora float"},
}
PEFT_POINTS = tuple(p for p, s in POINTS.items() if "peft" in s)
HEART_POINTS = tuple(p for p, s in POINTS.items() if "engine" in s)
REALLOCATION = ("heart-lora-r16-ne48", "heart-lora-r10-ne36")  # goal 3's candidates
SMALL_BUDGET = 20_000  # goal 2: bytes a task at fp16, classifier excluded
GOALS = {"bytes": 1.0, "small": 3.0, "reallocation": 1.0}  # the margins, in test points


# the one exception to the rate rule, stated in the report
FOLLOWERS_NOTE = ("heartlora's all-heads-on variants (" + ", ".join(p for p in HEART_POINTS if "lr_from" in POINTS[p])
                  + ") train at the rate their heads-off method chose (" + ", ".join(
                      sorted({POINTS[p]["lr_from"] + "'s" for p in HEART_POINTS if "lr_from" in POINTS[p]}))
                  + ") instead of searching their own: the one exception to the rate rule (they differ from it only "
                    "in switching no head off). The points at another rank search their own rate: the delta is "
                    "scale·B·A at a fixed scale, so the rank changes how fast the output moves at a given rate.")


def lr_str(lr: float) -> str:
    return f"{lr:.3g}"


def run_id(protocol: str, task: str, point: str, lr: float, seed: int) -> str:
    return f"{TAG}/{protocol}/{task}/{point}_lr{lr_str(lr)}_s{seed}"


def grid(ref: float, extra_down: int = 0, extra_up: int = 0) -> list[float]:
    """The rates tried, in tie-break order: the reference, then ÷3 and ×3, then the steps the rule added."""
    pts = [ref, ref / LR_STEP, ref * LR_STEP]
    pts += [ref / LR_STEP ** (k + 2) for k in range(extra_down)] + [ref * LR_STEP ** (k + 2) for k in range(extra_up)]
    return pts


def choose_lr(point: str, val: dict[tuple[str, str, float], float]) -> tuple[float | None, list[float], list]:
    """(chosen rate or None while val runs are missing, the rates still to run, the table of mean val accuracy).
    ``val`` maps (point, task, rate) → val200 accuracy of seed 42."""
    spec = POINTS[point]
    if "lr_from" in spec:
        return choose_lr(spec["lr_from"], val)[0], [], []
    down = up = 0
    while True:
        rates = grid(spec["lr"], down, up)
        table = [(r, val_mean(point, r, val)) for r in rates]
        missing = [r for r, score in table if score is None]
        if missing:
            return None, missing, []
        best = max(range(len(table)), key=lambda i: (table[i][1], -i))
        lowest, highest = min(rates), max(rates)
        if table[best][0] == lowest and down < MAX_EXTEND:
            down += 1
        elif table[best][0] == highest and up < MAX_EXTEND:
            up += 1
        else:
            return table[best][0], [], sorted(table)


def val_mean(point: str, lr: float, val: dict[tuple[str, str, float], float]) -> float | None:
    """A point's mean val200 accuracy at rate ``lr`` over the selection tasks (None while one is missing), rounded
    to 1e-6: records hold float32 accuracies (k / 200 to ~1e-8), so equal counts of val images must compare equal."""
    vals = [val.get((point, t, lr)) for t in SELECT_TASKS]
    return round(statistics.fmean(vals), 6) if all(v is not None for v in vals) else None


def val_index(data: dict[str, Any]) -> dict[tuple[str, str, float], float]:
    return {(r["frontier_point"], r["task"], float(r["frontier_lr"])): float(r["accuracy"])
            for r in data["records"] if r.get("role") == "select"}


def plan(data: dict[str, Any], suite: dict[str, dict[str, Any]] | None = None
         ) -> list[tuple[str, str, str, float, int]]:
    """Every run that can start now, as (protocol, task, point, lr, seed), in priority order: the val runs of the
    rate search (few-shot task first: it is the cheapest) and of heartlora's variants at their shared rate (so that
    heartlora's point at each budget is chosen on val200), then seed 42's final runs on the cpu tasks, then seeds 43
    and 44 on them for the points that decide (``deciding``), then seed 42 on the heldout tasks (they confirm what
    the cpu tasks decide). Called again after each run, so new choices open new runs."""
    done = {r["id"] for r in data["records"]}
    val = val_index(data)
    decide = deciding(data, suite)
    ready: list[tuple[tuple, tuple[str, str, str, float, int]]] = []
    for pi, point in enumerate(POINTS):
        chosen, missing, _ = choose_lr(point, val)
        if chosen is not None and "lr_from" in POINTS[point] and point in HEART_POINTS:
            missing = [chosen]
        for lr in missing:
            for ti, task in enumerate(SELECT_TASKS):
                if run_id("val", task, point, lr, SEEDS[0]) not in done:
                    ready.append(((0, ti, pi), ("val", task, point, lr, SEEDS[0])))
        if chosen is None:
            continue
        for si, seed in enumerate(SEEDS):
            if seed != SEEDS[0] and point not in decide:
                continue
            for ti, task in enumerate(TASKS if seed == SEEDS[0] else CPU_TASKS):
                if run_id("final", task, point, chosen, seed) not in done:
                    phase = 1 + si if task in CPU_TASKS else 1 + len(SEEDS)  # heldout last: it confirms
                    ready.append(((phase, ti, pi), ("final", task, point, chosen, seed)))
    return [item for _, item in sorted(ready, key=lambda kv: kv[0])]


def deciding(data: dict[str, Any], suite: dict[str, dict[str, Any]] | None = None) -> set[str]:
    """The points whose seeds 43 and 44 run: every PEFT point; heartlora's point that each goal compares
    (``comparisons``), known once every heartlora point has its val200 runs and its seed-42 finals on the cpu tasks;
    and heartlora's points whose every seed-43 and seed-44 cell the suite already holds as the same run (reused, so
    they cost nothing)."""
    val = val_index(data)
    suite = suite_records() if suite is None else suite
    out = set(PEFT_POINTS)
    for point in HEART_POINTS:
        chosen = choose_lr(point, val)[0]
        if chosen is not None and all(suite_record(suite, t, point, chosen, seed)
                                      for t in CPU_TASKS for seed in SEEDS[1:]):
            out.add(point)
    fin = finals(data)
    if heart_settled(fin, val):
        out |= {row[2] for row in comparisons(fin, val) if row[2]}
    return out


def representative(candidates: tuple[str, ...], budget: float, fin: dict[str, dict[tuple[str, int], dict]],
                   val: dict[tuple[str, str, float], float]) -> str | None:
    """heartlora's point for a byte budget: among ``candidates`` whose bytes (fp16, seed-42 finals) exceed
    ``budget`` on no task (``--ne auto`` keeps a different count of heads per task: a mean under the budget can hide
    a task over it), the best mean val200 accuracy at its rate (ties: the earlier point). Test accuracy never enters
    the choice."""
    fits = [(val_score(h, val), -i, h) for i, h in enumerate(candidates)
            if fin[h] and most_bytes(fin[h]) <= budget and val_score(h, val) is not None]
    return max(fits)[2] if fits else None


def comparisons(fin: dict[str, dict[tuple[str, int], dict]], val: dict[tuple[str, str, float], float]
                ) -> list[tuple[str, str, str | None, float]]:
    """Every comparison the issue's goals make, as (goal, PEFT point, heartlora point or None, byte budget):
    "bytes": each PEFT method against heartlora's point at no more bytes; "small": each PEFT method under
    ``SMALL_BUDGET`` against heartlora's point under it; "reallocation": LoRA r8 against the heads-off, higher-rank
    point at no more bytes."""
    rows: list[tuple[str, str, str | None, float]] = []
    for point in PEFT_POINTS:
        budget = mean_bytes(fin[point])
        if budget is None:
            continue
        rows.append(("bytes", point, representative(HEART_POINTS, budget, fin, val), budget))
        if budget <= SMALL_BUDGET:
            rows.append(("small", point, representative(HEART_POINTS, SMALL_BUDGET, fin, val), SMALL_BUDGET))
    if (budget := mean_bytes(fin["lora-r8"])) is not None:
        rows.append(("reallocation", "lora-r8", representative(REALLOCATION, budget, fin, val), budget))
    return rows


_SUITE_CACHE: dict[str, Any] = {}


def suite_records() -> dict[str, dict[str, Any]]:
    """The suite's records by id (re-read when the file changes, so runs a suite records meanwhile are reused)."""
    stamp = SUITE_RESULTS.stat().st_mtime_ns if SUITE_RESULTS.exists() else None
    if _SUITE_CACHE.get("stamp") != stamp or _SUITE_CACHE.get("path") != SUITE_RESULTS:
        _SUITE_CACHE.update(stamp=stamp, path=SUITE_RESULTS,
                            records={r["id"]: r for r in load_results(SUITE_RESULTS)["records"]})
    return _SUITE_CACHE["records"]


def suite_record(suite: dict[str, Any], task: str, point: str, lr: float, seed: int) -> dict[str, Any] | None:
    """The cpu / heldout suite's record of exactly this final run: same method and settings at the reference rate,
    and made as frontier's runs are (``same_run``); else None, and the run is trained here."""
    spec = POINTS[point]
    ref = spec.get("lr") or POINTS[spec.get("lr_from", point)].get("lr")
    if "suite" not in spec or not math.isclose(lr, ref):
        return None
    profile = "cpu" if task in CPU_TASKS else "heldout"
    rec = suite.get(f"{profile}/112px-10ep-b32/final/{task}/{spec['suite']}_s{seed}")
    if rec is None or not same_run(rec, point):
        return None
    made_at = (rec.get("settings") or {}).get("lr")  # the suite's rate may move: its id does not say it
    return rec if made_at is not None and math.isclose(float(made_at), lr) else None


def same_run(rec: dict[str, Any], point: str) -> bool:
    """Whether a suite record was made as this point's runs are here: fp32 on a CPU, no extra engine flags, and for
    the methods that switch heads off with ``--ne auto``, today's rule (its refine step on). A suite's seed-42 runs
    made on a GPU with TF32, or by the earlier heads-off rule, are other runs (their ids do not say so)."""
    settings = rec.get("settings") or {}
    if rec.get("engine_flags") or settings.get("precision") not in (None, "auto", "fp32"):
        return False
    if (rec.get("machine") or {}).get("gpu"):
        return False
    method = POINTS[point].get("engine", [None, None])[1]
    return not (method and method.startswith("heart-")) or settings.get("ne_refine") is True


def command(protocol: str, task: str, point: str, lr: float, seed: int, out: Path, threads: int,
            profile: str = "cpu", device: str | None = None, precision: str | None = None) -> list[str]:
    """One run's command: the baseline script for a PEFT point, ``heartlora train`` for heartlora's, at the cpu
    protocol's schedule or (``profile="paper"``) the paper's; ``device`` and ``precision`` when given."""
    spec = POINTS[point]
    common = ["--task", task, "--protocol", protocol, "--seed", str(seed), "--out", str(out), "--lr", repr(lr),
              "--threads", str(threads), *(["--precision", precision] if precision else [])]
    if "peft" in spec:
        schedule = PAPER if profile == "paper" else SCHEDULE
        return [sys.executable, str(BASELINE), "--method", spec["peft"], *common,
                *(["--device", device] if device else []),
                *(f"--{k.replace('_', '-')}={v}" for k, v in schedule.items())]
    cmd = [sys.executable, "-m", "heartlora", "train", *spec["engine"], *common, "--device", device or "cpu",
           "--profile", profile]
    if out.is_dir() and any(out.iterdir()):
        cmd.append("--resume" if (out / "checkpoint.pt").exists() else "--overwrite")
    return cmd


@functools.cache
def num_classes(task: str) -> int:
    """A task's class count (older baseline records do not carry it)."""
    from heartlora.data import get_task  # imports torch: only for those records, not for every status or report

    return get_task(task).num_classes


def stored(metrics: dict[str, Any]) -> dict[str, int]:
    """The bytes of a run, counted as the baseline script counts them (heartlora's runs: the adapter's packed tensors
    at the stored precision; fp16 halves the float ones; the classifier is the fp32 Linear on CLS + mean patch)."""
    if "adapter_bytes_fp16" in metrics:
        return {k: int(metrics[k]) for k in ("adapter_bytes", "adapter_bytes_fp16", "classifier_bytes")}
    bits = int(metrics["settings"].get("bits", 32))
    n = int(metrics["adapter_bytes"])
    classes = int(metrics.get("num_classes") or num_classes(metrics["task"]))
    return {"adapter_bytes": n, "adapter_bytes_fp16": n // 2 if bits == 32 else n,
            "classifier_bytes": (768 * classes + classes) * 4}


def make_record(item: tuple[str, str, str, float, int], metrics: dict[str, Any],
                reused_from: str | None = None) -> dict[str, Any]:
    protocol, task, point, lr, seed = item
    rec = {k: v for k, v in metrics.items()
           if k not in ("history", "status", "files", "responsiveness", "head_masks", "heads_off", "epoch_seconds")}
    rec.update(stored(metrics))
    rec.update({"id": run_id(*item), "role": "select" if protocol == "val" else "final", "frontier_point": point,
                "frontier_lr": lr, "family": POINTS[point]["family"],
                "command": ".venv/bin/python benchmarks/frontier.py run",
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if reused_from:
        rec["reused_from"] = reused_from
    return rec


def run_precision(device: str) -> str | None:
    """The cpu protocol's arithmetic wherever it runs: a CPU's default (exact fp32), and on a GPU fp32 named
    explicitly (the engine would pick bf16 or TF32 there)."""
    return None if device == "cpu" else "fp32"


def stamped(rec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A run's record with the machine and device that made it (on this machine: a run is resumed or recorded
    where it started), and the device in its command when it is not a CPU."""
    rec["machine"] = {**machine(), "threads": args.threads, "device": args.device}
    if args.device != "cpu":
        rec["command"] += f" --device {args.device}"
    return rec


def finish_by(text: str | None, now: float | None = None) -> float | None:
    """``--finish-by HH:MM`` as a time stamp: the next time the local clock reads it (today, or tomorrow once it has
    passed), so a run that starts at 23:00 with 01:30 means the night's 01:30; a time that passed within the last
    hour is refused (a slip: it would put the guard a day away)."""
    if text is None:
        return None
    try:
        hour, minute = (int(part) for part in text.split(":"))
        if not (0 <= hour < 24 and 0 <= minute < 60):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--finish-by {text!r}: give a local time as HH:MM, for example 08:40") from None
    now = time.time() if now is None else now
    t = time.localtime(now)
    stamp = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, hour, minute, 0, 0, 0, -1))
    if now - 3600 < stamp <= now:  # a slip, not tomorrow: the guard would be a day away
        raise SystemExit(f"--finish-by {text}: that was {(now - stamp) / 60:.0f} min ago (it is "
                         f"{time.strftime('%H:%M', t)}); give a time still ahead")
    return stamp if stamp > now else time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, hour, minute, 0, 0, 0, -1))


class Fit:
    """Which runs may still start before ``until``: a run whose expected time (``cost``: ``wall_model`` of the
    records as they were when the driver started, scaled by how this machine's runs, started from scratch by this
    driver, compared with it: the median ratio, 1 until one has finished) would end after it does not; a shorter one
    may (a few-shot task's run takes a quarter of a full one's), so that the last minutes of a session train
    something instead of starting runs a session's end kills. The model stays fixed: the records this driver adds
    already carry this machine's speed, which the ratio applies."""

    def __init__(self, until: float | None, cost: Callable[[tuple], float] = lambda item: 600.0,
                 clock: Callable[[], float] = time.time):
        self.until, self.cost, self.clock, self.ratios = until, cost, clock, []

    def expected(self, item: tuple) -> float:
        return self.cost(item) * (statistics.median(self.ratios) if self.ratios else 1.0)

    def __call__(self, item: tuple) -> bool:
        return self.until is None or self.clock() + self.expected(item) <= self.until

    def finished(self, item: tuple, seconds: float) -> None:
        """A run this driver trained from its start took ``seconds`` (a resumed one says nothing of the speed)."""
        self.ratios.append(seconds / self.cost(item))


@contextlib.contextmanager
def driver_lock(command: str) -> Iterator[None]:
    """Held by ``run`` while it works (runs/frontier.lock, with its pid): a second ``run`` would start the same runs
    twice, and a ``supersede`` would see a run of the point in progress come back with the old recipe. Either is
    refused in one line while the lock is held; the lock goes with the process, however it ends."""
    import fcntl

    path = RUNS / "frontier.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SystemExit(f"frontier.py {command}: a `frontier.py run` is working on {RUNS} ({holder}, {path}); "
                             "stop it first (it resumes its runs when started again)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cmd_run(args: argparse.Namespace) -> int:
    with driver_lock("run"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    finished = 0
    until = finish_by(getattr(args, "finish_by", None))
    fit = Fit(until, wall_model(load_results(RECORDS), suite_records()))
    if until is not None:
        print(f"frontier: starting only runs expected to end by {time.strftime('%a %H:%M', time.localtime(until))} "
              f"(in {(until - time.time()) / 3600:.1f} h)", flush=True)
    resumed: set[str] = set()

    def ready() -> list[tuple[str, tuple]]:
        return [(run_id(*item), item) for item in plan(load_results(RECORDS)) if fit(item)]

    def start(run: str, item: tuple) -> tuple[subprocess.Popen, Any] | None:
        if item[0] == "final" and (old := suite_record(suite_records(), item[1], item[2], item[3], item[4])):
            add_record(make_record(item, old, reused_from=old["id"]), RECORDS)
            print(f"reused {old['id']} as {run}", flush=True)
            return None
        out = RUNS / run
        if (out / "metrics.json").is_file():  # finished, but its record was never written: record it
            add_record(stamped(make_record(item, json.loads((out / "metrics.json").read_text())), args), RECORDS)
            return None
        print(f"[{time.strftime('%H:%M:%S')}] start {run}", flush=True)
        if (out / "checkpoint.pt").exists():  # the engine's and the baseline script's checkpoint
            resumed.add(run)
        return launch(command(*item, out, args.threads, device=args.device, precision=run_precision(args.device)),
                      out.parent / f"{out.name}.log", ROOT, args.threads)

    def finish(run: str, item: tuple, returncode: int, seconds: float) -> bool:
        nonlocal finished
        metrics = ended_run(RUNS, run, returncode)
        if metrics is None:
            return False
        rec = stamped(make_record(item, metrics), args)
        add_record(rec, RECORDS)
        finished += 1
        if run not in resumed:
            fit.finished(item, seconds)
        print(f"    done {run}: {rec['accuracy_split']} acc {rec['accuracy']:.4f}, {rec['adapter_bytes']} B, "
              f"{seconds:.0f} s", flush=True)
        return True

    _, failed = run_pool(ready, start, finish, jobs=args.jobs, poll_s=lambda: POLL_S,
                         may_start=start_limit(args.max_runs, args.deadline_s))
    left = plan(load_results(RECORDS))
    n_late = sum(not fit(item) for item in left)
    late = f" ({n_late} of them would not end by {time.strftime('%H:%M', time.localtime(fit.until))})" if n_late else ""
    print(f"frontier: {finished} runs recorded now, {len(failed)} failed, {len(left)} ready{late}", flush=True)
    report()
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------------
# The report: table and plot from the records.


def finals(data: dict[str, Any]) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
    """point → (task, seed) → its final record at the chosen rate."""
    val = val_index(data)
    out: dict[str, dict[tuple[str, int], dict[str, Any]]] = {p: {} for p in POINTS}
    for r in data["records"]:
        if r.get("role") != "final":
            continue
        point = r["frontier_point"]
        if math.isclose(float(r["frontier_lr"]), choose_lr(point, val)[0] or -1.0):
            out[point][(r["task"], int(r["seed"]))] = r
    return out


def paired(a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict],
           cells: set[tuple[str, int]] | None = None) -> tuple[float, float, int] | None:
    """Mean of b − a over the (task, seed) cells both have (within ``cells``), in points, with its standard error;
    both rounded to 1e-6 (accuracies are float32: a difference of exactly one point must compare equal to 1)."""
    keys = sorted(set(a) & set(b) & (cells if cells is not None else set(a)))
    if not keys:
        return None
    d = [100 * (float(b[k]["accuracy"]) - float(a[k]["accuracy"])) for k in keys]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return round(statistics.fmean(d), 6), round(se, 6), len(d)


def task_se(a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict],
            cells: set[tuple[str, int]]) -> tuple[float, int] | None:
    """The standard error of b − a over its tasks instead of its cells: each task's mean difference over the seeds
    both have, then the standard error of those means (the seeds of one task share its data, so their differences
    are not independent and the cells' standard error can understate the spread). (se in points, tasks); None under
    two tasks."""
    by_task: dict[str, list[float]] = {}
    for key in sorted(set(a) & set(b) & cells):
        by_task.setdefault(key[0], []).append(100 * (float(b[key]["accuracy"]) - float(a[key]["accuracy"])))
    means = [statistics.fmean(d) for d in by_task.values()]
    return (round(statistics.stdev(means) / math.sqrt(len(means)), 6), len(means)) if len(means) > 1 else None


def mean_bytes(runs: dict[tuple[str, int], dict], key: str = "adapter_bytes_fp16") -> float | None:
    """A point's bytes a task: the mean over its seed-42 finals on the cpu tasks (over all its finals while it has
    none), so that later runs do not move a budget once the choices that read it are made."""
    s42 = [r for (task, seed), r in runs.items() if seed == SEEDS[0] and task in CPU_TASKS] or list(runs.values())
    return statistics.fmean(int(r[key]) for r in s42) if s42 else None


def most_bytes(runs: dict[tuple[str, int], dict], key: str = "adapter_bytes_fp16") -> int:
    """The most bytes a point stored on one task: the largest of its seed-42 finals on the cpu tasks, the runs
    ``mean_bytes`` reads (all its finals while it has none; 0 without any)."""
    s42 = [r for (task, seed), r in runs.items() if seed == SEEDS[0] and task in CPU_TASKS] or list(runs.values())
    return max((int(r[key]) for r in s42), default=0)


def cell_bytes(runs: dict[tuple[str, int], dict], cells: set[tuple[str, int]],
               key: str = "adapter_bytes_fp16") -> float | None:
    """A point's mean bytes over ``cells`` (the cells an accuracy is read from): ``--ne auto`` keeps other heads on
    other seeds, so this can differ from the seed-42 figure a budget was checked against."""
    vals = [int(runs[c][key]) for c in cells if c in runs]
    return statistics.fmean(vals) if vals else None


def all_heads_on(point: str) -> bool:
    """heartlora's points that switch no head off (LoRA and Bi-LoRA trained by heartlora's engine)."""
    spec = POINTS[point]
    return "engine" in spec and not spec["engine"][spec["engine"].index("--method") + 1].startswith("heart-")


def label(point: str) -> str:
    """A heartlora point's name in the goal and README tables, marked when it switches no head off."""
    return point + (" (all heads on)" if all_heads_on(point) else "")


def heart_settled(fin: dict[str, dict[tuple[str, int], dict]], val: dict[tuple[str, str, float], float]) -> bool:
    """Every heartlora point has its val200 score and its seed-42 finals on the cpu tasks: its choices can be made."""
    return all(val_score(h, val) is not None and all((t, SEEDS[0]) in fin[h] for t in CPU_TASKS)
               for h in HEART_POINTS)


def partial(point: str, val: dict[tuple[str, str, float], float]) -> str:
    """The val200 means so far of a point whose rate search is still running, with how many tasks each has."""
    rates = sorted({lr for (p, _, lr) in val if p == point})
    if not rates:
        return "not started"
    cells = []
    for lr in rates:
        accs = [val[(point, t, lr)] for t in SELECT_TASKS if (point, t, lr) in val]
        cells.append(f"{lr_str(lr)}: {100 * statistics.fmean(accs):.1f} ({len(accs)}/{len(SELECT_TASKS)} tasks)")
    return "so far " + ", ".join(cells)


def val_score(point: str, val: dict[tuple[str, str, float], float]) -> float | None:
    """A point's mean val200 accuracy over the selection tasks at its chosen rate (what picks heartlora's points)."""
    lr = choose_lr(point, val)[0]
    return None if lr is None else val_mean(point, lr, val)


def val_bytes(data: dict[str, Any], val: dict[tuple[str, str, float], float]) -> dict[str, float]:
    """Each point's mean bytes (fp16, classifier excluded) over its val200 runs at its chosen rate."""
    chosen = {point: choose_lr(point, val)[0] for point in POINTS}
    got: dict[str, list[int]] = {}
    for r in data["records"]:
        point = r.get("frontier_point")
        if (r.get("role") == "select" and point in chosen and chosen[point] is not None
                and math.isclose(float(r["frontier_lr"]), chosen[point]) and r.get("adapter_bytes_fp16") is not None):
            got.setdefault(point, []).append(int(r["adapter_bytes_fp16"]))
    return {point: statistics.fmean(values) for point, values in got.items()}


def val_lines(data: dict[str, Any], val: dict[tuple[str, str, float], float]) -> list[str]:
    """The val200 data the choices are made on, read as a frontier before the final runs are in: every point at its
    chosen rate by bytes, and for each PEFT method heartlora's best point at no more bytes by the same numbers. Not
    a result: heartlora's point is the best of several on these very numbers (which favours it), and three tasks at
    one seed are not the goals' 21 test cells."""
    nbytes = val_bytes(data, val)
    scored = sorted((nbytes[p], p, score) for p in POINTS if p in nbytes and (score := val_score(p, val)) is not None)
    if not scored:
        return []
    lines = ["", "## What val200 says so far (the selection data, not a result)", "",
             f"Mean val200 accuracy over {', '.join(SELECT_TASKS)} (train800 → val200, seed 42) at each point's "
             "chosen rate, and its mean bytes over those runs (fp16, classifier excluded). The comparison column "
             "takes, for each PEFT method, heartlora's best point on these same numbers among those at no more bytes: "
             "a maximum over several points on the data that chose it, so it leans towards heartlora, and three "
             "tasks at one seed decide no goal; the test runs above do.", "",
             "| point | bytes (fp16) | mean val200 (%) | heartlora's best at no more bytes | its val200 (%) | "
             "heartlora − PEFT (points) |", "|---|---|---|---|---|---|"]
    heart = [(b, p, a) for b, p, a in scored if p in HEART_POINTS]
    for b, point, acc in scored:
        cells = ["", "", ""]
        if point in PEFT_POINTS:
            # the goals' tie rule (``representative``): the better val200, then the earlier point
            fits = [(a, -HEART_POINTS.index(h), h) for hb, h, a in heart if hb <= b]
            if fits:
                best_acc, _, best = max(fits)
                cells = [label(best), f"{100 * best_acc:.1f}", f"{100 * (best_acc - acc):+.1f}"]
            else:
                cells = ["none fits", "", ""]
        lines.append(f"| {label(point) if point in HEART_POINTS else point} | {b:,.0f} | {100 * acc:.1f} | "
                     + " | ".join(cells) + " |")
    return lines


def hardware_lines(fin: dict[str, dict[tuple[str, int], dict[str, Any]]],
                   val_runs: list[dict[str, Any]] | None = None) -> list[str]:
    """Which machines made the final runs in the table and the val200 runs that chose the rates, for each when more
    than one kind did (a GPU's runs are the same protocol in fp32, on fp16-rounded backbone weights)."""
    def kind(rec: dict[str, Any]) -> str:
        m = rec.get("machine") or {}
        on_gpu = m.get("gpu") and m.get("device", "cpu") != "cpu"
        return f"{m['gpu']} (fp32, backbone weights rounded through fp16)" if on_gpu else m.get("cpu") or "a CPU"

    lines = []
    for what, recs in (("Final runs", [r for runs in fin.values() for r in runs.values()]),
                       ("val200 runs (the rate choices)", val_runs or [])):
        kinds = collections.Counter(map(kind, recs))
        if len(kinds) > 1:
            lines.append(f"{what} by machine: " + "; ".join(f"{n} on {k}" for k, n in sorted(kinds.items())) + ".")
    return ["", *lines] if lines else []


def failed_lines(fin: dict[str, dict[tuple[str, int], dict[str, Any]]]) -> list[str]:
    """The final runs that learnt next to nothing (test accuracy under twice chance) or whose training loss went
    non-finite: counted in the tables as measured (they are what the recipe gave), and listed so that a reader can
    tell a diverged run from a weak method, with what a look into one found (a record's ``examined``)."""
    rows = []
    for point, runs in fin.items():
        for (task, seed), r in sorted(runs.items()):
            classes = int(r.get("num_classes") or num_classes(task))
            bad = r.get("nonfinite_loss_steps")
            if float(r["accuracy"]) >= 2 / classes and not bad:
                continue
            loss = "not recorded" if r.get("final_train_loss") is None else f"{r['final_train_loss']:.4g}"
            steps = "not recorded" if bad is None else str(bad)
            acc = f"{100 * float(r['accuracy']):.2f} (chance {100 / classes:.1f})"
            rows.append(f"| {point} | {task} | {seed} | {acc} | {loss} | {steps} | {r.get('examined', '')} |")
    if not rows:
        return []
    return ["", "## Final runs that failed to learn", "",
            "Test accuracy under twice chance, or a training loss that went NaN or infinite. They count in the tables "
            "above as measured. `not recorded`: the run was made before its recipe kept that figure.", "",
            "| point | task | seed | test accuracy % | last epoch's mean train loss | non-finite loss steps | "
            "examined |", "|---|---|---|---|---|---|---|", *rows]


def report() -> None:
    data = load_results(RECORDS)
    val = val_index(data)
    fin = finals(data)
    cpu_cells = {(t, s) for t in CPU_TASKS for s in SEEDS}
    held_cells = {(t, 42) for t in HELDOUT_TASKS}
    lines = ["# Accuracy per stored byte: heartlora against PEFT's small adapters", "",
             "Generated by `.venv/bin/python benchmarks/frontier.py report` from benchmarks/records/frontier.json "
             "(the protocol and the rules are in benchmarks/frontier.py's docstring). Offline DINOv2 ViT-S/14, 112 px, "
             "10 epochs, batch 32; train800val200 → test; learning rates chosen per method on val200 of "
             f"{', '.join(SELECT_TASKS)} (seed 42), never on test. Bytes: per task, beyond the frozen backbone, "
             "classifier excluded (it is the same fp32 Linear for every method: its bytes, mean over the cpu tasks, "
             "are a column of the frontier table); float adapters at fp16 (heartlora's as `heartlora export ADAPTER "
             "DIR --format heartlora --dtype fp16` stores them, PEFT's as users save theirs). Accuracies are those of "
             "the float32 adapters the runs trained (they began before `heartlora train --save-dtype fp16`, which "
             "reports the stored file's); heartlora's stored at fp16 changed 0 of 1,800 val200 predictions over 9 of "
             "these runs (`.venv/bin/python benchmarks/store_precision.py`), PEFT's were not evaluated again at fp16. "
             + FOLLOWERS_NOTE, "",
             "Recipes: each side trains as its users would. PEFT's methods run the plain recipe outside heartlora "
             "(benchmarks/baselines/hf_peft.py: AdamW with weight decay 0.01 on every trained tensor but (IA)³'s "
             "scales and LN tuning's norms, whose no-change value is not zero; one-cycle schedule); heartlora's "
             "points run `heartlora train` (weight decay 1e-4, one warmup epoch, then cosine to 1 %, its LoRA scale "
             "chosen on val200 earlier: 4 for float adapters, 16 for 1-bit ones). On one and the same adapter, LoRA r8 "
             "on q and v, the two recipes score 76.2 ± 0.6 and 75.8 ± 0.6 test, both at 1e-3 (the cpu suite, 7 tasks × "
             "3 seeds, docs/research/RESULTS.md), so at one rate the recipes alone are worth under half a point"
             + recipes_at_val(val) + "; the goals section gives the same pair at the rates each chose, on test. VeRA "
             "and FourierFT train their classifier at their authors' fixed rate, the others at the searched one.", ""]
    lines += point_lines()
    lines += superseded_lines()
    lines += rate_lines(val)
    lines += ["", "## Frontier (test accuracy, mean over tasks)", "",
              "| point | bytes (fp16) | bytes as stored | classifier (fp32) | cpu tasks s42 | cpu tasks, all seeds | "
              "heldout s42 | runs |", "|---|---|---|---|---|---|---|---|"]
    for point in POINTS:
        runs = fin[point]
        if not runs:
            continue
        s42 = [100 * float(r["accuracy"]) for (t, s), r in runs.items() if s == 42 and t in CPU_TASKS]
        allc = [100 * float(r["accuracy"]) for k, r in runs.items() if k in cpu_cells]
        held = [100 * float(r["accuracy"]) for k, r in runs.items() if k in held_cells]

        def m(xs: list[float], n: int) -> str:
            return f"{statistics.fmean(xs):.1f}" + ("" if len(xs) == n else f" ({len(xs)}/{n})") if xs else "…"
        lines.append(f"| {point} | {mean_bytes(runs):,.0f} | {mean_bytes(runs, 'adapter_bytes'):,.0f} | "
                     f"{mean_bytes(runs, 'classifier_bytes'):,.0f} | {m(s42, len(CPU_TASKS))} | "
                     f"{m(allc, len(cpu_cells))} | {m(held, len(held_cells))} | "
                     f"{len(runs)} |")
    lines += failed_lines(fin)
    lines += hardware_lines(fin, [r for r in data["records"] if r.get("role") == "select"])
    lines += goal_lines(fin, val, cpu_cells, held_cells)
    lines += val_lines(data, val)
    lines += paper_lines(load_results(PAPER_RECORDS), val)
    left = plan(data)
    ahead = projection(data, suite_records())
    lines += ["", f"Runs recorded: {len(data['records'])}; ready to run now: {len(left)}. Left, if the open rate "
              f"searches end at their reference (`frontier.py status`): {ahead['runs']:.0f} runs to train, about "
              f"{ahead['seconds'] / 7200:.0f} h with two one-thread jobs at the run times the records show (the "
              f"CPUs they ran on differ up to 3× in speed), and {ahead['reused']:.0f} "
              "answered by the suite's records; a lent GPU runs the same protocol in fp32, many runs side by side "
              "(`bash benchmarks/gpu_session.sh frontier`, docs/research/GPU.md). A row with (k/n) is partial."]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(DOC, "\n".join(lines) + "\n")
    plot(fin)
    print(f"wrote {DOC}")
    table = readme_lines(fin, val, cpu_cells)
    if RECORDS.resolve() != COMMITTED.resolve():  # --records (a GPU session's copy, a test's): never the README
        print(f"README's table left as it is: {RECORDS} is not {COMMITTED}")
    elif table is None:
        print("README's table left as it is: the comparison is not complete yet")
    elif write_readme(table):
        print(f"wrote the table between {README_MARKS[0]} and {README_MARKS[1]} in {README}")


def rate_lines(val: dict[tuple[str, str, float], float]) -> list[str]:
    """The rates table: each point's reference, its choice (marked where it sits at an end of the grid the rule
    stopped growing: a better rate may lie beyond) and the mean val200 accuracy at every rate tried."""
    lines = ["## Learning rates chosen on val200", "", "| point | reference | chosen | mean val200 per rate |",
             "|---|---|---|---|"]
    for point, spec in POINTS.items():
        chosen, missing, table = choose_lr(point, val)
        if "lr_from" in spec:
            score = val_score(point, val) if point in HEART_POINTS else None
            cell = f"{lr_str(chosen)}: {100 * score:.1f}" if score is not None else ""
            lines.append(f"| {point} | from {spec['lr_from']} | {lr_str(chosen) if chosen else '…'} | {cell} |")
            continue
        cells = ", ".join(f"{lr_str(r)}: {100 * a:.1f}" for r, a in table) if table else partial(point, val)
        edge = " (at the grid's end: the search may stop short)" if table and chosen in (table[0][0], table[-1][0]) \
            else ""
        lines.append(f"| {point} | {lr_str(spec['lr'])} | {lr_str(chosen) if chosen else '…'}{edge} | {cells} |")
    return lines


def recipes_at_val(val: dict[tuple[str, str, float], float]) -> str:
    """The two recipes on the same LoRA r8 (heartlora's lora, PEFT's lora-r8) at val200, each at its chosen rate."""
    ours, peft = val_score("lora", val), val_score("lora-r8", val)
    if ours is None or peft is None:
        return ""
    return (f"; at val200 on the {len(SELECT_TASKS)} selection tasks (one seed, each at its chosen rate) lora scores "
            f"{100 * ours:.1f} and lora-r8 {100 * peft:.1f}")


def superseded_lines() -> list[str]:
    """The runs ``supersede`` set aside (benchmarks/records/frontier_superseded.json), by point and reason."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for rec in load_results(SUPERSEDED)["records"]:
        groups[(rec.get("frontier_point", "?"), rec.get("superseded", "?"))].append(rec)
    if not groups:
        return []
    lines = ["## Superseded runs", "", "Runs made with a recipe a point no longer runs, kept in "
             "benchmarks/records/frontier_superseded.json (`frontier.py supersede`), not counted anywhere above.", "",
             "| point | runs | why |", "|---|---|---|"]
    for (point, why), recs in sorted(groups.items()):
        roles = collections.Counter(r.get("role", "?") for r in recs)
        lines.append(f"| {point} | {len(recs)} ({', '.join(f'{n} {k}' for k, n in sorted(roles.items()))}) | "
                     f"{why} |")
    return lines + [""]


def point_lines() -> list[str]:
    """What each point trains: the baseline preset's settings, or heartlora's flags."""
    import importlib.util  # the baseline script imports torch and PEFT: only the report needs its presets

    spec = importlib.util.spec_from_file_location("hf_peft", BASELINE)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    lines = ["## Points", "", "| point | family | what it trains |", "|---|---|---|"]
    for point, p in POINTS.items():
        what = baseline.PEFT_METHODS[p["peft"]]["settings"] if "peft" in p else \
            "`heartlora train " + " ".join(p["engine"]) + "` (defaults otherwise)"
        lines.append(f"| {point} | {p['family']} | {what} |")
    return lines + [""]


def goal_lines(fin: dict[str, dict[tuple[str, int], dict]], val: dict[tuple[str, str, float], float],
               cpu_cells: set[tuple[str, int]], held_cells: set[tuple[str, int]]) -> list[str]:
    """The goals table: every comparison, heartlora − PEFT in test points paired over the (task, seed) cells both
    have, ± its standard error, against the issue's margin; judged on the cpu tasks' 3 seeds, the heldout tasks
    shown as the confirmation."""
    titles = {"bytes": f"+{GOALS['bytes']:g} at the PEFT method's bytes",
              "small": f"+{GOALS['small']:g} under {SMALL_BUDGET:,} bytes",
              "reallocation": f"+{GOALS['reallocation']:g}: heads off and a higher rank at LoRA r8's bytes"}
    lines = ["", "## Goals: heartlora against each PEFT method", "",
             "heartlora's point for each comparison is chosen on val200 (the best mean val200 accuracy at its rate "
             "among its points whose bytes fit the budget; the reallocation goal chooses among "
             f"{', '.join(REALLOCATION)}). Difference: heartlora − PEFT in test points, paired over the (task, seed) "
             "cells both have, ± its standard error (n cells). A goal is judged on the 7 cpu tasks × 3 seeds "
             "(21 cells), by the mean difference (and whether it clears the margin by more than 2 standard "
             "errors, the larger of the two below); the heldout tasks (seed 42) confirm it. A budget is the PEFT "
             "method's mean bytes over the cpu tasks at seed 42, and heartlora's point is chosen among those whose "
             "seed-42 bytes stay within it on every task; the heartlora "
             "bytes shown are its mean over the cells compared (heads-off counts chosen by `--ne auto` vary by task "
             "and seed); where they exceed the budget the row says so and the goal is not met there, whatever the "
             "accuracy. A point marked (all heads on) switches no head off. The seeds of one task share its data, so "
             "their differences are not independent and the cells' standard error (the issue's) can be small: the "
             "standard error over the task means (each task's mean over its seeds) is shown beside it, the "
             "conservative reading.", "",
             "| goal | PEFT method | its bytes | heartlora point | its bytes | cpu: diff ± se (n) | "
             "cpu: se over tasks | heldout: diff ± se (n) | met |", "|---|---|---|---|---|---|---|---|---|"]

    settled = heart_settled(fin, val)
    rows = comparisons(fin, val)
    for goal, point, heart, budget in rows:
        if heart is None:
            why = ("none fits | | | | | no" if settled
                   else "pending: heartlora's points are not all run | | | | | not yet")
            lines.append(f"| {titles[goal]} | {point} | {mean_bytes(fin[point]):,.0f} | {why} |")
            continue
        cpu, held = paired(fin[point], fin[heart], cpu_cells), paired(fin[point], fin[heart], held_cells)
        shared = {c for c in cpu_cells if c in fin[point] and c in fin[heart]}
        spent = cell_bytes(fin[heart], shared) if shared else mean_bytes(fin[heart])
        if not settled:  # a heartlora point still to run may be the better choice on val200
            met = "not yet: heartlora's points are not all run"
        elif cpu is None or cpu[2] < len(cpu_cells):
            met = f"not yet ({cpu[2] if cpu else 0}/{len(cpu_cells)} cells)"
        elif cpu[0] >= GOALS[goal]:
            tse = task_se(fin[point], fin[heart], cpu_cells)
            se = max(cpu[1], tse[0] if tse else cpu[1])  # the cells' se can understate: the larger of the two
            met = "yes" + (", by more than 2 se" if cpu[0] - 2 * se >= GOALS[goal] else ", within 2 se")
            if held is None or held[2] < len(held_cells):
                met += f"; heldout pending ({held[2] if held else 0}/{len(held_cells)})"
            elif held[0] < GOALS[goal]:
                met += "; not on heldout"
        else:
            met = f"no, by {GOALS[goal] - cpu[0]:.1f}"
        if spent is not None and spent > budget:  # not a comparison at the budget's bytes: never a "yes"
            over = f"its bytes over these cells exceed the budget by {spent - budget:,.0f}"
            met = f"no: {over} ({met})" if met.startswith("yes") else f"{met}; {over}"
        if met.startswith("yes") and all_heads_on(heart):
            met += "; by a point that switches no head off: the recipe's doing, not the heads'"
        tse = task_se(fin[point], fin[heart], cpu_cells)
        lines.append(f"| {titles[goal]} | {point} | {mean_bytes(fin[point]):,.0f} | {label(heart)} | "
                     f"{spent:,.0f} | {fmt(cpu)} | {f'{tse[0]:.1f} ({tse[1]} tasks)' if tse else '…'} | "
                     f"{fmt(held)} | {met} |")
    compared = {p for _, p, _, _ in rows}
    for point in PEFT_POINTS:
        if point not in compared:
            lines.append(f"| every goal | {point} | … | pending: its final runs are not in | | | | | not yet |")
    recipe = paired(fin["lora-r8"], fin["lora"], cpu_cells)
    if recipe:  # one adapter, two recipes: how much of a difference above the recipes alone can make
        tse = task_se(fin["lora-r8"], fin["lora"], cpu_cells)
        lines += ["", f"The recipes alone, on one adapter (LoRA r8 on q and v, every head on), each at the rate it "
                      f"chose: heartlora's engine (`lora`) − PEFT's plain recipe (`lora-r8`) = {fmt(recipe)} test "
                      f"points on the cpu cells{f', se over tasks {tse[0]:.1f}' if tse else ''}. A goal met by a "
                      "margin of that size or less says more about the two training recipes than about head "
                      "selection."]
    return lines


def fmt(res: tuple[float, float, int] | None) -> str:
    """A paired difference: mean ± standard error (n cells); one cell has no standard error."""
    if not res:
        return "…"
    se = f"{res[1]:.1f}" if res[2] > 1 else "n/a"
    return f"{res[0]:+.1f} ± {se} ({res[2]})"


README = ROOT / "README.md"
README_MARKS = ("<!-- frontier:begin -->", "<!-- frontier:end -->")


def readme_lines(fin: dict[str, dict[tuple[str, int], dict]], val: dict[tuple[str, str, float], float],
                 cpu_cells: set[tuple[str, int]]) -> list[str] | None:
    """The README's first table: each PEFT method's bytes and accuracy beside heartlora's point at no more bytes
    (chosen on val200), and one line a user can act on: the point to use under ``SMALL_BUDGET``, chosen on val200
    like every other choice, with the highest test accuracy measured at any size as an observation. Bytes and
    accuracy are means over the same cells (every cpu task and seed). None until every PEFT point, every compared
    heartlora point and the point the advice picks have all their cpu cells, and heartlora's choices are made (every
    heartlora point run: one still to run could be the val200 choice). A PEFT method no heartlora point fits under
    is a row that says so."""
    if not heart_settled(fin, val):
        return None
    rows = [(p, h) for g, p, h, _ in comparisons(fin, val) if g == "bytes"]
    full = {p for p in POINTS if cpu_cells <= set(fin[p])}
    # the advice is a choice, so it is made on val200 like every other: the best mean val200 among the points whose
    # bytes (seed 42, the basis every budget choice reads) fit (ties: the earlier point); the test column reports it
    small = [p for p in POINTS if fin[p] and most_bytes(fin[p]) <= SMALL_BUDGET and val_score(p, val) is not None]
    pick = max(small, key=lambda p: (val_score(p, val), -list(POINTS).index(p))) if small else None
    if (not rows or not set(PEFT_POINTS) <= full or any(h is not None and h not in full for _, h in rows)
            or pick not in full | {None}):
        return None

    def acc(point: str) -> float:
        return statistics.fmean(100 * float(fin[point][c]["accuracy"]) for c in cpu_cells)

    def nbytes(point: str) -> float:
        return cell_bytes(fin[point], cpu_cells) or 0.0

    lines = [f"Offline DINOv2 ViT-S/14, {len(CPU_TASKS)} tasks (natural, structured, 4-shot), 112 px, 10 epochs, test "
             "accuracy mean over tasks and seeds 42–44; bytes per task at fp16, classifier excluded; every learning "
             "rate and heartlora's point at each budget chosen on val200, never on test "
             "(`.venv/bin/python benchmarks/frontier.py run`; every point, the goals and the heldout tasks: "
             "[docs/research/FRONTIER.md](docs/research/FRONTIER.md)):", "",
             "| PEFT method (plain recipe) | bytes | accuracy (%) | heartlora at no more bytes | bytes | "
             "accuracy (%) | difference ± se |", "|---|---|---|---|---|---|---|"]
    for point, heart in sorted(rows, key=lambda r: nbytes(r[0])):
        if heart is None:
            lines.append(f"| {point} | {nbytes(point):,.0f} | {acc(point):.1f} | none fits | | | |")
            continue
        d = paired(fin[point], fin[heart], cpu_cells)
        over = nbytes(heart) - nbytes(point)
        spent = f"{nbytes(heart):,.0f}" + (f" ({over:,.0f} over: `--ne auto` kept more heads on seeds 43–44)"
                                           if over > 0 else "")
        lines.append(f"| {point} | {nbytes(point):,.0f} | {acc(point):.1f} | {label(heart)} | {spent} | "
                     f"{acc(heart):.1f} | "
                     f"{fmt(d).rsplit(' (', 1)[0]} |")
    best = max(full, key=acc)
    line = (f"**For adapters under {SMALL_BUDGET // 1000} KB a task, use {pick}** ({acc(pick):.1f} %, "
            f"{nbytes(pick):,.0f} bytes; the best val200 accuracy under that size)") if pick else \
        f"**No point measured fits under {SMALL_BUDGET // 1000} KB**"
    lines += ["", line + f". The highest test accuracy measured at any size (points run on every seed) is "
              f"{best}'s ({acc(best):.1f} %, {nbytes(best):,.0f} bytes).", "",
              "![accuracy against stored bytes](docs/research/frontier.png)"]
    return lines


def write_readme(lines: list[str], path: Path | None = None) -> bool:
    """Put ``lines`` between the README's frontier marks (atomically); False where the marks are absent."""
    path = path or README
    text = path.read_text()
    begin, end = README_MARKS
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    write_text_atomic(path, head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    return True


def plot(fin: dict[str, dict[tuple[str, int], dict[str, Any]]]) -> None:
    """Test accuracy (mean over the cpu tasks, seed 42) against bytes (fp16, log axis), one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, list[tuple[float, float, str]]] = {}
    for point, runs in fin.items():
        s42 = [100 * float(r["accuracy"]) for (t, s), r in runs.items() if s == 42 and t in CPU_TASKS]
        if len(s42) == len(CPU_TASKS):
            fams.setdefault(POINTS[point]["family"], []).append((mean_bytes(runs) or 1.0, statistics.fmean(s42), point))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam, pts in sorted(fams.items()):
        pts.sort()
        style = "-o" if fam.startswith("heartlora") else "--s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=fam)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per task (fp16 for float adapters, classifier excluded)")
    ax.set_ylabel(f"test accuracy, mean of {len(CPU_TASKS)} tasks, seed 42 (%)")
    ax.set_title("Accuracy per stored byte (DINOv2 ViT-S/14, 112 px, 10 epochs)")
    ax.grid(True, which="both", alpha=0.3)
    if fams:
        ax.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


FINAL_OVER_VAL = 1.25  # a final run's time over a val run's on the same task: 1,000 training images against 800


def wall_model(data: dict[str, Any], suite: dict[str, dict[str, Any]] | None = None
               ) -> Callable[[tuple[str, str, str, float, int]], float]:
    """A run's expected seconds on one CPU job, from the records (this driver's, and the suite's final runs of the
    same schedule, ``suite``: they time a final run's evaluation on each task's whole test split): the median wall
    time recorded on a CPU for its (protocol, task); a final run on a task with no final yet at its task's val runs'
    median × ``FINAL_OVER_VAL`` (it trains on train800val200, a quarter more images than train800); else the median
    of its protocol, else 600 s."""
    walls: dict[tuple[str, ...], list[float]] = {}

    def add(protocol: str, task: str, wall: float) -> None:
        walls.setdefault((protocol, task), []).append(wall)
        walls.setdefault((protocol,), []).append(wall)

    for r in data["records"]:
        # times of this protocol on a CPU only: a GPU session's merged runs would make two cores look fast
        on_cpu = (r.get("machine") or {}).get("device", "cpu") == "cpu"
        if r.get("wall_s") and not r.get("reused_from") and on_cpu:
            add("val" if r.get("role") == "select" else "final", r["task"], float(r["wall_s"]))
    for rid, r in (suite or {}).items():
        parts = rid.split("/")
        machine = r.get("machine") or {}
        if (len(parts) > 3 and parts[1] == TAG.split("/")[1] and parts[2] == "final" and r.get("wall_s")
                and not machine.get("gpu") and machine.get("device", "cpu") == "cpu"):
            add("final", parts[3], float(r["wall_s"]))
    medians = {key: statistics.median(values) for key, values in walls.items()}

    def seconds(item: tuple[str, str, str, float, int]) -> float:
        protocol, task = item[0], item[1]
        if (protocol, task) in medians:
            return medians[protocol, task]
        if protocol == "final" and ("val", task) in medians:
            return medians["val", task] * FINAL_OVER_VAL
        return medians.get((protocol,), 600.0)

    return seconds


def projection(data: dict[str, Any], suite: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What is left, by playing the plan forward with stand-in records: each rate search still open ends at its
    reference (a search already past it may still grow its grid), every point's bytes are those recorded so far.
    Returns the runs to train, the runs the suite's records answer, and the seconds of one job, each run costed by
    ``wall_model``."""
    cost = wall_model(data, suite)
    nbytes: dict[str, int] = {}
    for r in data["records"]:
        nbytes.setdefault(r["frontier_point"], int(r.get("adapter_bytes_fp16") or 0))
    sim = {"records": list(data["records"])}
    out = {"runs": 0.0, "reused": 0.0, "seconds": 0.0}
    for _ in range(10_000):
        items = plan(sim, suite)
        if not items:
            break
        for item in items:
            protocol, task, point, lr, seed = item
            if protocol == "final" and suite_record(suite, task, point, lr, seed):
                out["reused"] += 1
            else:
                out["runs"] += 1
                out["seconds"] += cost(item)
            leader = POINTS[POINTS[point].get("lr_from", point)]
            sim["records"].append({"id": run_id(*item), "role": "select" if protocol == "val" else "final",
                                   "frontier_point": point, "task": task, "frontier_lr": lr, "seed": seed,
                                   "accuracy": 0.6 if math.isclose(lr, leader["lr"]) else 0.5,
                                   "adapter_bytes_fp16": nbytes.get(point, 0)})
    return out


def paper_id(task: str, point: str, lr: float) -> str:
    return f"{PAPER_TAG}/final/{task}/{point}_lr{lr_str(lr)}_s{SEEDS[0]}"


def paper_plan(data: dict[str, Any], paper: dict[str, Any]) -> list[tuple[str, str, float]]:
    """The paper protocol's runs left, as (task, point, rate): every point whose rate the cpu protocol's val200
    runs chose, seed 42, task by task (the cpu tasks first), the points in their order within a task."""
    val = val_index(data)
    done = {r["id"] for r in paper["records"]}
    rates = {point: choose_lr(point, val)[0] for point in POINTS}
    return [(task, point, lr) for task in TASKS for point, lr in rates.items()
            if lr is not None and paper_id(task, point, lr) not in done]


def paper_command(task: str, point: str, lr: float, out: Path, device: str, precision: str,
                  threads: int) -> list[str]:
    """A paper-protocol run's command: a seed-42 final run of ``command`` at the paper's schedule."""
    return command("final", task, point, lr, SEEDS[0], out, threads, profile="paper", device=device,
                   precision=precision)


def cmd_paper(args: argparse.Namespace) -> int:
    """Run the paper protocol's runs (resumable, ``--jobs`` side by side) into PAPER_RECORDS."""
    finished = 0
    data = load_results(RECORDS)

    def ready() -> list[tuple[str, tuple]]:
        return [(paper_id(*item), item) for item in paper_plan(data, load_results(PAPER_RECORDS))]

    def record(item: tuple, metrics: dict[str, Any]) -> None:
        task, point, lr = item
        rec = make_record(("final", task, point, lr, SEEDS[0]), metrics)
        rec.update(id=paper_id(task, point, lr), frontier_protocol="paper",
                   command=f"python benchmarks/frontier.py paper --device {args.device} --precision {args.precision}")
        rec["machine"] = {**machine(), "threads": args.threads, "device": args.device}
        add_record(rec, PAPER_RECORDS)

    def start(run: str, item: tuple) -> tuple[subprocess.Popen, Any] | None:
        out = RUNS / run
        if (out / "metrics.json").is_file():  # finished, but its record was never written
            record(item, json.loads((out / "metrics.json").read_text()))
            return None
        print(f"[{time.strftime('%H:%M:%S')}] start {run}", flush=True)
        return launch(paper_command(*item, out, args.device, args.precision, args.threads),
                      out.parent / f"{out.name}.log", ROOT, args.threads)

    def finish(run: str, item: tuple, returncode: int, seconds: float) -> bool:
        nonlocal finished
        metrics = ended_run(RUNS, run, returncode)
        if metrics is None:
            return False
        record(item, metrics)
        finished += 1
        print(f"    done {run}: test acc {float(metrics['accuracy']):.4f}, {seconds:.0f} s", flush=True)
        return True

    _, failed = run_pool(ready, start, finish, jobs=args.jobs, poll_s=lambda: POLL_S,
                         may_start=start_limit(args.max_runs, args.deadline_s))
    print(f"frontier paper: {finished} runs recorded now, {len(failed)} failed, {len(ready())} left", flush=True)
    return 1 if failed else 0


def paper_lines(paper: dict[str, Any], val: dict[tuple[str, str, float], float] | None = None) -> list[str]:
    """The paper protocol's table: each point's test accuracy, mean over the tasks every point run has (so the
    means compare), with its bytes; empty while nothing is recorded. With ``val`` (the cpu protocol's val200 index),
    only the runs at the rate the cpu protocol chooses now count (a choice that moved leaves older runs out)."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for r in paper["records"]:
        point = r["frontier_point"]
        if val is not None and not math.isclose(float(r["frontier_lr"]), choose_lr(point, val)[0] or -1.0):
            continue
        runs.setdefault(point, {})[r["task"]] = r
    if not runs:
        return []
    shared = [t for t in TASKS if all(t in by_task for by_task in runs.values())]
    lines = ["", "## The paper's protocol (a GPU, seed 42)", "",
             f"`python benchmarks/frontier.py paper` on a lent GPU: 224 px, 100 epochs, batch 64, train800val200 → "
             "test, seed 42, each point at the rate the cpu protocol chose on val200 (not searched again at 100 "
             "epochs, so a method whose best rate moves with the schedule is at a disadvantage here); records in "
             f"benchmarks/records/frontier-paper.json. Mean over the {len(shared)} task(s) every point below has run"
             f"{' (' + ', '.join(shared) + ')' if shared else ''}; the per-task count beside it.", "",
             "| point | bytes (fp16) | test accuracy (%) | tasks run | device, precision |", "|---|---|---|---|---|"]
    for point in POINTS:
        if point not in runs:
            continue
        by_task = runs[point]
        acc = f"{statistics.fmean(100 * float(by_task[t]['accuracy']) for t in shared):.1f}" if shared else "…"
        nbytes = statistics.fmean(int(r["adapter_bytes_fp16"]) for r in by_task.values())
        first = next(iter(by_task.values()))
        where = f"{(first.get('machine') or {}).get('gpu') or 'cpu'}, {(first.get('settings') or {}).get('precision')}"
        lines.append(f"| {point} | {nbytes:,.0f} | {acc} | {len(by_task)} | {where} |")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    data = load_results(RECORDS)
    ready = plan(data)
    val = sum(1 for r in data["records"] if r.get("role") == "select")
    fin = sum(1 for r in data["records"] if r.get("role") == "final")
    print(f"frontier: {val} val runs and {fin} final runs recorded; {len(ready)} ready now")
    for item in ready[:5]:
        print(f"  next: {run_id(*item)}")
    left = projection(data, suite_records())
    print(f"  left, if the open rate searches end at their reference: {left['runs']:.0f} runs to train "
          f"({left['seconds'] / 3600:.1f} h of one job, about {left['seconds'] / 3600 / args.jobs:.1f} h with "
          f"{args.jobs} jobs) and {left['reused']:.0f} answered by the suite's records")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """A GPU session's records (its copy of frontier.json or frontier-paper.json) into the committed ones: each run
    the committed file lacks is added (by id, locked, atomic); a run both hold keeps the committed record."""
    new = load_results(args.file)["records"]
    stray = [r["id"] for r in new if not r["id"].startswith((TAG + "/", PAPER_TAG + "/"))]
    if stray:
        raise SystemExit(f"{args.file}: {len(stray)} records are not frontier runs (e.g. {stray[0]}): merge only "
                         "frontier.json or frontier-paper.json")
    since = superseded_since()  # a run made before its point was superseded: the recipe it replaced
    fresh = [r for r in new if r.get("recorded_at", "") >= since.get(r.get("frontier_point"), "")]
    added, stale = 0, len(new) - len(fresh)
    for dest, tag in ((RECORDS, TAG), (PAPER_RECORDS, PAPER_TAG)):
        have = {r["id"] for r in load_results(dest)["records"]}
        for rec in fresh:
            if rec["id"].startswith(tag + "/") and rec["id"] not in have:
                add_record(rec, dest)
                added += 1
    print(f"{added} of {len(new)} records of {args.file} added ({len(new) - added - stale} were there already"
          + (f", {stale} made before their point was superseded: left out" if stale else "") + ")")
    return 0


def superseded_since() -> dict[str, str]:
    """point → when it was last superseded (UTC, as ``recorded_at`` is written)."""
    out: dict[str, str] = {}
    for rec in load_results(SUPERSEDED)["records"]:
        point, when = rec.get("frontier_point"), rec.get("superseded_at")
        if isinstance(point, str) and isinstance(when, str):
            out[point] = max(out.get(point, ""), when)
    return out


def cmd_supersede(args: argparse.Namespace) -> int:
    """A point whose recipe changed: its records (val and final) move to ``SUPERSEDED`` with the reason, and its run
    folders (every one of the point's, recorded or not) to runs/superseded/, so that ``run`` makes them again with
    what the code now runs (a folder left in place would be read back as the new recipe's run). Under the records'
    lock, in the order that loses nothing if it stops half way: the folders, then the superseded records, and the
    records last (run again, it finds the records still there and finishes). Refused while ``run`` works (a run of
    the point in progress would come back with the old recipe): stop it first."""
    unknown = [p for p in args.point if p not in POINTS]
    if unknown:
        raise SystemExit(f"unknown point {unknown[0]!r}: choose from {', '.join(POINTS)}")
    with driver_lock("supersede"):
        return _supersede(args)


def _supersede(args: argparse.Namespace) -> int:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    aside = RUNS / "superseded" / when
    with locked(RECORDS), locked(PAPER_RECORDS):  # no record a run adds meanwhile is lost
        data, paper = load_results(RECORDS), load_results(PAPER_RECORDS)  # the paper protocol's runs too: one
        # of the old recipe would count again wherever the new one chose the same rate
        moved = [r for d in (data, paper) for r in d["records"] if r.get("frontier_point") in args.point]
        if not moved:
            raise SystemExit(f"{RECORDS} holds no record of {', '.join(args.point)}: nothing to supersede")
        folders = 0
        for point in args.point:  # ids are TAG/protocol/task/<point>_lr…_s…, each folder with its .log beside it
            for src in sorted([*(RUNS / TAG).glob(f"*/*/{point}_lr*_s*"),
                               *(RUNS / PAPER_TAG).glob(f"*/*/{point}_lr*_s*")]):
                dest = aside / src.relative_to(RUNS)
                dest.parent.mkdir(parents=True, exist_ok=True)
                folders += src.is_dir()
                src.rename(dest)
        with locked(SUPERSEDED):  # each kept with the reason, under an id of its own: a point superseded twice
            kept = load_results(SUPERSEDED)  # keeps both batches
            kept["records"] += [{**rec, "id": f"{rec['id']}@{when}", "superseded": args.why, "superseded_at": when}
                                for rec in moved]
            save_results(kept, SUPERSEDED)
        for d, path in ((paper, PAPER_RECORDS), (data, RECORDS)):
            if any(r.get("frontier_point") in args.point for r in d["records"]):
                d["records"] = [r for r in d["records"] if r.get("frontier_point") not in args.point]
                save_results(d, path)
    print(f"{len(moved)} records of {', '.join(args.point)} moved to {SUPERSEDED.name} ({folders} run folders to "
          f"{aside}): `run` makes them again")
    return 0


def main(argv: list[str] | None = None) -> int:
    global RECORDS, RUNS, DOC, PLOT, PAPER_RECORDS, SUPERSEDED
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every missing run (resumable), then write the report")
    r.add_argument("--jobs", type=int, default=2, help="runs side by side")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--max-runs", type=int, help="start at most this many runs")
    r.add_argument("--deadline-s", type=float, help="start no run after this many seconds")
    r.add_argument("--finish-by", metavar="HH:MM",
                   help="start only runs expected to end by this local time (each run's time from the records' "
                        "median for its protocol and task, scaled by this machine's finished runs): a session's end "
                        "kills no run half done")
    r.add_argument("--device", default="cpu",
                   help="where each run trains: cpu, or cuda on a lent GPU (the same protocol in exact fp32, no TF32 "
                        "or bf16; many runs side by side)")
    st = sub.add_parser("status", help="runs recorded, what runs next and an estimate of what is left")
    st.add_argument("--jobs", type=int, default=2, help="runs side by side, for the estimate")
    sub.add_parser("report", help="write docs/research/FRONTIER.md and the plot")
    mg = sub.add_parser("merge", help="add a GPU session's frontier records (the runs not here yet)")
    mg.add_argument("file", type=Path, help="its frontier.json or frontier-paper.json")
    su = sub.add_parser("supersede", help="a point's recipe changed: move its records and run folders aside so that "
                                          "`run` makes them again (stop `run` first)")
    su.add_argument("point", nargs="+", help="the points (POINTS' names)")
    su.add_argument("--why", required=True, help="what changed, kept in each superseded record")
    pp = sub.add_parser("paper", help="the paper's protocol on a GPU: every point with a chosen rate, seed 42")
    pp.add_argument("--jobs", type=int, default=8, help="runs side by side")
    pp.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    pp.add_argument("--device", default="cuda")
    pp.add_argument("--precision", default="bf16", choices=("fp32", "tf32", "bf16"))
    pp.add_argument("--max-runs", type=int, help="start at most this many runs")
    pp.add_argument("--deadline-s", type=float, help="start no run after this many seconds")
    pp.add_argument("--paper-records", type=Path, help="where its records go (default benchmarks/records/"
                                                       "frontier-paper.json)")
    for sp in sub.choices.values():
        sp.add_argument("--records", type=Path, help=argparse.SUPPRESS)
        sp.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
        sp.add_argument("--doc", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    RECORDS, RUNS = args.records or RECORDS, args.runs or RUNS
    if args.records:  # its superseded runs beside it
        SUPERSEDED = RECORDS.with_name(f"{RECORDS.stem}_superseded.json")
    if args.doc:
        DOC, PLOT = args.doc, args.doc.with_suffix(".png")
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "paper":
        PAPER_RECORDS = args.paper_records or PAPER_RECORDS
        return cmd_paper(args)
    if args.cmd == "merge":
        return cmd_merge(args)
    if args.cmd == "supersede":
        return cmd_supersede(args)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
