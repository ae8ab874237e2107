"""Post-hoc head pruning of a PEFT LoRA adapter against Heart-LoRA trained with those heads off.

Per task: one PEFT LoRA adapter trained with the plain recipe of ``benchmarks/baselines/hf_peft.py``
(``Dinov2ForImageClassification`` on the offline DINOv2 ViT-S/14, q and v, r 8, AdamW + OneCycle, on train800);
then, for each ``ne``, ``heartlora.integrations.prune_peft`` switches off the ``ne`` least responsive heads of that
same adapter (scored on training batches, no retraining), against ``heartlora train --method heart-lora --ne N``
(the heads switched off after the warmup, then trained without them). Both are reported on val200; the PEFT
adapter is scored on the heads after training, Heart-LoRA during its warmup. Rows go to ``--out`` as JSON lines.

CPU-hours at the defaults on the visible tasks; ``--smoke`` runs a tiny version (one task, one epoch, 28 px) in
minutes to check the script:

    .venv/bin/python benchmarks/prune.py --tasks digits,mnist --ne 0,12,24,36,48 --out runs/prune/curve.jsonl
    .venv/bin/python benchmarks/prune.py --smoke --out /tmp/prune-smoke.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def train_peft(task: str, folder: Path, args: argparse.Namespace) -> float:
    """The hf_peft recipe (benchmarks/baselines/hf_peft.py, run as its own process) on train800; the adapter saved
    to ``folder`` for ``dinov2_small``. Returns val200 accuracy."""
    run = folder.with_name(folder.name + "-run")
    cmd = [sys.executable, str(HERE / "baselines" / "hf_peft.py"), "--task", task, "--protocol", "val",
           "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--rank", str(args.rank), "--alpha", str(float(args.rank)), "--seed", str(args.seed),
           "--out", str(run), "--save-peft", str(folder)] + (["--threads", str(args.threads)] if args.threads else [])
    subprocess.run(cmd, check=True)
    return float(json.loads((run / "metrics.json").read_text())["accuracy"])


def heart_lora(task: str, ne: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from heartlora.engine import TrainConfig, train

    cfg = TrainConfig(task=task, backbone="dinov2_small", method="heart-lora", protocol="val", ne=ne,
                      targets=("q", "v"), rank=args.rank, img_size=args.img_size, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed, out=str(out), overwrite=True, progress=False,
                      threads=args.threads, pool="cls+mean")
    return train(cfg)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="digits,mnist,fashion_mnist")
    ap.add_argument("--ne", default="0,12,24,36,48", help="heads switched off, comma-separated (of 72)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8, help="training batches the PEFT adapter's heads are scored on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/prune"))
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per (task, ne, method)")
    ap.add_argument("--smoke", action="store_true", help="digits, ne 0 and 6, 1 epoch, 28 px: checks the script")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tasks, args.ne, args.epochs, args.img_size, args.batches = "digits", "0,6", 1, 28, 1
    torch.set_num_threads(args.threads)
    from heartlora.integrations import prune_peft

    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for task in args.tasks.split(","):
            folder = args.work / f"{task}-peft"
            t0 = time.perf_counter()
            peft_acc = train_peft(task, folder, args)
            base = {"task": task, "img_size": args.img_size, "epochs": args.epochs, "rank": args.rank}
            rows.append({**base, "method": "peft-lora", "ne": 0, "val200": peft_acc, "wall_s": time.perf_counter() - t0})
            for ne in (int(n) for n in args.ne.split(",")):
                t0 = time.perf_counter()
                r = prune_peft(folder, task, ne, batches=args.batches, batch_size=args.batch_size, split="val200",
                               img_size=args.img_size, out=args.work / f"{task}-pruned-{ne}.safetensors")
                rows.append({**base, "method": "peft-lora + heartlora prune", "ne": ne, "val200": r["accuracy_after"],
                             "adapter_bytes": r["adapter_bytes"], "wall_s": time.perf_counter() - t0})
                m = heart_lora(task, ne, args.work / f"{task}-heart-lora-{ne}", args)
                rows.append({**base, "method": "heart-lora", "ne": ne, "val200": m["accuracy"],
                             "adapter_bytes": m["adapter_bytes"], "wall_s": m["wall_s"]})
            for row in rows[-(1 + 2 * len(args.ne.split(","))):]:
                f.write(json.dumps(row) + "\n")
                print(f"{row['task']:<14} {row['method']:<30} ne {row['ne']:>3}  val200 {100 * row['val200']:6.2f} %")
    return rows


if __name__ == "__main__":
    main()
