"""AdapterBank against one merged model per task: resident memory, and images/s of a mixed-task batch.

For 1, 8 and 32 adapters (random weights, random heads off, alternately float and 1-bit) on one backbone:
  * memory: the bytes of every tensor the bank holds (backbone once + each task's adapters, head index buffers and
    classifier), against N merged model copies (one per task), and against the goal
    1.1 × (backbone + the adapters' own in-memory factor bytes + their classifiers);
  * speed: images/s of one batch whose rows cycle through all N tasks, against one merged model (the deltas
    written into its weights) on a batch of the same size: --repeats timed calls of each, alternating, after one
    warm-up; images/s from the median call, the ratio the median of the per-pair ratios.

    OMP_NUM_THREADS=1 python benchmarks/bank.py --backbone dinov2_small --img-size 112 \
        --out benchmarks/records/bank_dinov2.json
    OMP_NUM_THREADS=1 python benchmarks/bank.py --img-size 64 --batch 64 --repeats 15 --out benchmarks/records/bank.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import heartlora as hl
from heartlora.bank import BankLinear


def build(name: str, img_size: int, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return hl.create_backbone(name, num_classes=num_classes, img_size=img_size, pretrained=False)


def make_adapters(folder: Path, n: int, args: argparse.Namespace) -> list[Path]:
    paths = []
    for i in range(n):
        classes = 2 + i % 9
        model = hl.attach(build(args.backbone, args.img_size, classes),
                          hl.HeartLoRAConfig(targets=("q", "v"), rank=args.rank, bits=32 if i % 2 == 0 else 1),
                          verify=False)
        g = torch.Generator().manual_seed(i)
        layers = hl.attention_layers(model)
        heads = [(layer.name, h) for layer in layers for h in range(layer.num_heads)]
        off = torch.randperm(len(heads), generator=g)[:len(heads) // 3].tolist()
        hl.deactivate_heads(model, heads=[heads[j] for j in off])
        with torch.no_grad():
            for p in hl.adapter_parameters(model) + list(model.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        paths.append(folder / f"task{i}.safetensors")
        hl.save_adapter(model, paths[-1], extra_metadata={"heartlora_run": {"task": f"task{i}"}})
    return paths


def nbytes(model: torch.nn.Module) -> int:
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def timed_pair(f, g, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each call of ``f`` and of ``g``, called alternately (a busy shared machine slows both alike)."""
    f(), g()  # warm-up
    tf, tg = [], []
    for _ in range(repeats):
        for fn, out in ((f, tf), (g, tg)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return tf, tg


def run(n: int, args: argparse.Namespace, folder: Path) -> dict:
    paths = make_adapters(folder, n, args)
    bank = hl.AdapterBank(build(args.backbone, args.img_size, 10))
    for p in paths:
        bank.add(p)
    x = torch.rand(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    tasks = [f"task{i % n}" for i in range(args.batch)]

    merged = hl.merge(hl.load_adapter(build(args.backbone, args.img_size, 2), paths[0]).eval())
    copy_bytes = []
    for p in paths:  # the bytes a merged copy of each task holds (its own classifier), counted without the
        # adapters and the kept original weights: what a deployment of N merged models keeps resident
        m = hl.load_adapter(build(args.backbone, args.img_size, bank.tasks[Path(p).stem].num_classes), p)
        copy_bytes.append(sum(t.numel() * t.element_size() for n_, t in m.state_dict().items()
                              if ".lora" not in n_ and "lora_" not in n_))
    with torch.no_grad():
        tb, tm = timed_pair(lambda: bank(x, tasks), lambda: merged(x), args.repeats)
    # img/s from the median call of each; the ratio is the median of the per-pair ratios (each bank call against the
    # merged call right after it), which a load that changes over the run moves far less
    t_bank, t_merged = statistics.median(tb), statistics.median(tm)
    ratio = statistics.median(m / b for b, m in zip(tb, tm))

    backbone = bank.backbone_bytes()
    factors = sum(lin.factor_bytes() for lin in bank._linears.values())
    heads = sum(t.numel() * t.element_size() for m in bank._saved.values() for t in m.copies.parameters())
    resident = bank.resident_bytes()
    goal = 1.1 * (backbone + factors + heads)
    return {"adapters": n, "bank_bytes": resident, "backbone_bytes": backbone, "factor_bytes": factors,
            "classifier_bytes": heads, "index_buffer_bytes": resident - backbone - factors - heads,
            "file_adapter_bytes": sum(t.adapter_bytes for t in bank.tasks.values()),
            "merged_copies_bytes": sum(copy_bytes), "memory_goal_bytes": int(goal), "memory_ok": resident <= goal,
            "bank_img_s": args.batch / t_bank, "merged_img_s": args.batch / t_merged,
            "speed_ratio": ratio, "speed_ok": ratio >= 0.8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--counts", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--gather-from", type=int, help="groups in a call from which the bank runs its batched path "
                    f"(default: the library's, {BankLinear.GATHER_FROM}; 1: always, 999: never)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    if args.gather_from is not None:
        BankLinear.GATHER_FROM = args.gather_from
    args.gather_from = BankLinear.GATHER_FROM
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(c) for c in args.counts.split(",")):
            folder = Path(tmp) / str(n)
            folder.mkdir()
            rows.append(run(n, args, folder))
            r = rows[-1]
            print(f"{n:>3} adapters: bank {r['bank_bytes'] / 2**20:.1f} MiB "
                  f"(goal {r['memory_goal_bytes'] / 2**20:.1f}, "
                  f"{'ok' if r['memory_ok'] else 'MISSED'}) vs {r['merged_copies_bytes'] / 2**20:.1f} MiB merged "
                  f"copies; {r['bank_img_s']:.0f} img/s mixed vs {r['merged_img_s']:.0f} merged "
                  f"({r['speed_ratio']:.2f}x, {'ok' if r['speed_ok'] else 'MISSED'})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
