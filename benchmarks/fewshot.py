"""Few-shot by steps: 1-, 2-, 4-, 8- and 16-shot Fashion-MNIST at the `cpu` profile, heartlora's default method
against the plain HF + PEFT recipe, each trained for at least the engine's floor of optimizer steps
(``MIN_FEWSHOT_STEPS``; the baseline script applies the same floor). Protocol final: train on the K-shot set (K
images per class from train800), test once on the 2,000 test images; seed 42; defaults only.

Resumable (a run folder with a metrics.json is finished); ``--report`` writes docs/research/sweeps/fewshot.md.

    python benchmarks/fewshot.py --jobs 1          # one thread per run
    python benchmarks/fewshot.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = (1, 2, 4, 8, 16)
METHODS = ("heart-lora", "hf-peft")


def command(method: str, shots: int, out: Path, seed: int) -> list[str]:
    task = f"fashion_mnist@{shots}shot"
    if method == "hf-peft":
        return [sys.executable, str(ROOT / "benchmarks" / "baselines" / "hf_peft.py"), "--task", task, "--protocol",
                "final", "--seed", str(seed), "--img-size", "112", "--epochs", "10", "--batch-size", "32",
                "--threads", "1", "--out", str(out)]
    return [sys.executable, "-m", "heartlora", "train", "--task", task, "--method", method, "--profile", "cpu",
            "--protocol", "final", "--seed", str(seed), "--threads", "1", "--quiet", "--out", str(out)]


def report(runs: Path, dest: Path, seed: int) -> None:
    lines = ["# Few-shot by steps (Fashion-MNIST, `cpu` profile)", "",
             "Command: `python benchmarks/fewshot.py --jobs 1` (one thread per run) then `--report`. "
             "Protocol final: train on K images per "
             "class (from train800), test once on 2,000 test images, 112 px, batch 32, seed "
             f"{seed}; a K-shot run trains for at least 100 optimizer steps (its epochs raised from 10 when they give "
             "fewer; the baseline script applies the same floor). Chance is 10 %.", "",
             "| shots | images | epochs | optimizer steps | " + " | ".join(f"{m} test %" for m in METHODS) +
             " | heart-lora heads off | heart-lora adapter bytes |",
             "|---|---|---|---|" + "---|" * len(METHODS) + "---|---|"]
    for k in SHOTS:
        ms = {}
        for m in METHODS:
            f = runs / f"{m}_{k}shot_s{seed}" / "metrics.json"
            ms[m] = json.loads(f.read_text()) if f.is_file() else None
        h = ms["heart-lora"]
        epochs = h.get("epochs") if h else None
        steps = epochs * -(-10 * k // 32) if epochs else None
        accs = [f"{100 * ms[m]['accuracy']:.1f}" if ms[m] else "" for m in METHODS]
        lines.append(f"| {k} | {10 * k} | {epochs or ''} | {steps or ''} | " + " | ".join(accs) +
                     f" | {h.get('heads_off_count', '') if h else ''} | {h['adapter_bytes'] if h else ''} |")
    dest.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "fewshot")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--dest", type=Path, default=ROOT / "docs" / "research" / "sweeps" / "fewshot.md")
    args = ap.parse_args()
    if args.report:
        report(args.runs, args.dest, args.seed)
        print(args.dest.read_text())
        return
    todo = [(m, k) for k in SHOTS for m in METHODS
            if not (args.runs / f"{m}_{k}shot_s{args.seed}" / "metrics.json").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, str]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, k = todo.pop(0)
            out = args.runs / f"{m}_{k}shot_s{args.seed}"
            cmd = command(m, k, out, args.seed)
            if m != "hf-peft" and out.is_dir() and any(out.iterdir()):
                cmd.append("--resume" if (out / "checkpoint.pt").is_file() else "--overwrite")
            out.parent.mkdir(parents=True, exist_ok=True)
            log = open(args.runs / f"{out.name}.log", "a")  # noqa: SIM115 (closed with the process)
            running.append((subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), out.name))
            print(f"[{time.strftime('%H:%M:%S')}] start {out.name}", flush=True)
        time.sleep(2)
        for item in list(running):
            if item[0].poll() is not None:
                running.remove(item)
                print(f"    exit {item[0].returncode}: {item[1]}", flush=True)


if __name__ == "__main__":
    main()
