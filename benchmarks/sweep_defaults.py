"""The sweep behind heartlora's defaults: candidate settings on the visible tasks' val200 only (train on train800,
score on val200; test is never read), at the `cpu` profile (112 px, 10 epochs, batch 32), against the plain
HF + PEFT recipe (benchmarks/baselines/hf_peft.py) run on the same splits.

Resumable: each run writes its own folder under ``--runs``; a folder with a metrics.json is finished and never run
again, so the command continues where the last one stopped. One training process at a time, one thread each
(``--threads``); ``--status`` counts what is done. ``--report`` writes the table of val200 accuracies
(docs/sweeps/defaults.md and .json) from the finished runs.

    python benchmarks/sweep_defaults.py                 # run what is left
    python benchmarks/sweep_defaults.py --status
    python benchmarks/sweep_defaults.py --report        # writes docs/sweeps/defaults.{md,json}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("fashion_mnist", "dsprites_loc", "clevr_count")
COMMON = ["--profile", "cpu", "--protocol", "val", "--seed", "42"]
# name -> CLI arguments after `heartlora train` (or the baseline script), in the order they run
CONFIGS: dict[str, list[str]] = {
    "hf-peft": ["baseline"],
    "lora, cls, drop-path 0.1 (old default)": ["--method", "lora", "--pool", "cls"],
    "lora, cls+mean, drop-path 0": ["--method", "lora", "--pool", "cls+mean", "--drop-path", "0"],
    "lora, cls+mean, drop-path 0.1 (pool auto)": ["--method", "lora", "--pool", "cls+mean", "--drop-path", "0.1"],
    "lora, cls+mean, drop-path 0, scale 2": ["--method", "lora", "--pool", "cls+mean", "--drop-path", "0",
                                             "--scale", "2"],
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def plan(runs: Path) -> list[tuple[str, str, Path, list[str]]]:
    out = []
    for task in TASKS:  # task by task: each finished task is a complete comparison
        for name, args in CONFIGS.items():
            folder = runs / task / _slug(name)
            if args == ["baseline"]:
                cmd = [sys.executable, str(ROOT / "benchmarks" / "baselines" / "hf_peft.py"), "--task", task,
                       "--protocol", "val", "--seed", "42", "--img-size", "112", "--epochs", "10",
                       "--batch-size", "32", "--out", str(folder)]
            else:
                cmd = [sys.executable, "-m", "heartlora", "train", "--task", task, *COMMON, *args,
                       "--out", str(folder), "--quiet"]
            out.append((name, task, folder, cmd))
    return out


def recorded(dest: Path) -> dict[str, dict[str, dict]]:
    """Results already committed in ``dest``'s JSON: a later session on a fresh machine (no runs/ folder) keeps them
    and does not run them again."""
    path = dest.with_suffix(".json")
    return json.loads(path.read_text()).get("results", {}) if path.is_file() else {}


def report(runs: Path, dest: Path) -> None:
    rows = recorded(dest)
    for name, task, folder, cmd in plan(runs):
        f = folder / "metrics.json"
        if f.is_file():
            m = json.loads(f.read_text())
            rows.setdefault(name, {})[task] = {"val200": m["accuracy"], "adapter_bytes": m.get("adapter_bytes"),
                                                "wall_s": m.get("wall_s")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps({"tasks": TASKS, "common": COMMON, "configs": CONFIGS,
                                                     "results": rows}, indent=1))
    lines = ["# Defaults sweep (val200 only)", "",
             "Command: `python benchmarks/sweep_defaults.py` then `--report`. Protocol: train on train800, accuracy on "
             "val200 after the last epoch (no test data), `--profile cpu` (112 px, 10 epochs, batch 32), seed 42, "
             "one thread per run. The HF + PEFT row is benchmarks/baselines/hf_peft.py on the same splits.", "",
             "| settings | " + " | ".join(TASKS) + " | mean |", "|---|" + "---|" * (len(TASKS) + 1)]
    for name in CONFIGS:
        accs = [rows.get(name, {}).get(t, {}).get("val200") for t in TASKS]
        done = [a for a in accs if a is not None]
        mean = f"{100 * sum(done) / len(done):.1f}" + ("" if len(done) == len(TASKS) else " (partial)") if done else ""
        lines.append(f"| {name} | " + " | ".join("" if a is None else f"{100 * a:.1f}" for a in accs) + f" | {mean} |")
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "sweep-defaults")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--status", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--dest", type=Path, default=ROOT / "docs" / "sweeps" / "defaults.md")
    args = ap.parse_args()
    done = recorded(args.dest)
    todo = [p for p in plan(args.runs) if not (p[2] / "metrics.json").is_file() and p[1] not in done.get(p[0], {})]
    if args.status:
        print(f"{len(plan(args.runs)) - len(todo)} of {len(plan(args.runs))} runs done")
        return
    if args.report:
        report(args.runs, args.dest)
        print(args.dest.with_suffix(".md").read_text())
        return
    env = {**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads)}
    for name, task, folder, cmd in todo:
        if "heartlora" in cmd:
            cmd += ["--threads", str(args.threads)] + (["--resume"] if (folder / "checkpoint.pt").is_file() else [])
        else:
            cmd += ["--threads", str(args.threads)]
        t0 = time.time()
        print(f"run {name} on {task}", flush=True)
        res = subprocess.run(cmd, env=env, cwd=ROOT)
        print(f"  exit {res.returncode} after {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
