"""How much an epoch of input costs once images are in the uint8 tensor cache.

Times, for one task split at one image size: the first decode + resize (empty disk cache), a reload from the disk
cache in a fresh task, and one epoch of what the training loop does with the cached tensor (shuffle, gather each
batch, convert to float in [0, 1]). The input cost per batch is compared with a real training step measured in the
same process: DINOv2-S/14 (``dinov2_small``) with LoRA on q and v, rank 8, on the same batches (``--step-s`` replaces
the measurement with a given step time).

    .venv/bin/python benchmarks/data_pipeline.py --task fashion_mnist --img-size 112
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch


def epoch_seconds(images: torch.Tensor, labels: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Best-of-``repeats`` time of one shuffled epoch: gather each batch and convert it to float."""
    best = float("inf")
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(repeat)
        start = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            x = images[index].float().div_(255)
            y = labels[index]
        best = min(best, time.perf_counter() - start)
    del x, y
    return best


def train_step_seconds(images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> float:
    """Median time of a LoRA training step of the offline DINOv2-S/14 on batches from the cache."""
    import heartlora as hl

    model = hl.attach(hl.create_backbone("dinov2_small", num_classes=int(labels.max()) + 1, img_size=args.img_size),
                      hl.HeartLoRAConfig(targets=("q", "v"), rank=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for step in range(args.steps + 1):  # the first step warms up allocators and is not counted
        index = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(images)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images[index].float().div_(255)), labels[index])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion_mnist")
    parser.add_argument("--split", default="train800val200")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--step-s", type=float, default=None,
                        help="training step time per batch to compare with (default: measured here)")
    parser.add_argument("--steps", type=int, default=3, help="training steps to time (median)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    # A private cache directory, so the first load really decodes and resizes.
    cache = tempfile.mkdtemp(prefix="heartlora-bench-")
    os.environ["HEARTLORA_CACHE"] = cache
    from heartlora.data import get_task

    start = time.perf_counter()
    images, labels = get_task(args.task).load(args.split, args.img_size)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    images, labels = get_task(args.task).load(args.split, args.img_size)
    warm = time.perf_counter() - start
    epoch = epoch_seconds(images, labels, args.batch_size, args.repeats)
    steps = -(-len(images) // args.batch_size)
    step_s = args.step_s if args.step_s is not None else train_step_seconds(images, labels, args)
    train_epoch = steps * step_s
    torch_threads = torch.get_num_threads()

    print(f"task {args.task} split {args.split}: {len(images)} images at {args.img_size} px, batch {args.batch_size}, "
          f"{torch_threads} torch threads")
    print(f"first load (decode + resize + write cache) : {cold:8.3f} s")
    print(f"load from the disk cache (fresh task)      : {warm:8.3f} s")
    print(f"one epoch from the cache (gather + float)  : {epoch:8.3f} s  ({epoch / steps * 1e3:.2f} ms per batch)")
    how = "given" if args.step_s is not None else "measured: dinov2_small, LoRA q,v r8"
    print(f"training epoch ({steps} steps of {step_s:.3f} s, {how}) : {train_epoch:8.1f} s")
    print(f"input share of an epoch                    : {epoch / train_epoch:8.2%}")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
