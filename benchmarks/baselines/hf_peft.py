"""The plain recipe a user would pick instead of heartlora, outside heartlora's engine: Hugging Face's own
``Dinov2ForImageClassification`` (its classifier reads the CLS token and the mean patch token), PEFT's LoRA on q and v
(r 8, ``lora_alpha`` 8), torch's AdamW (lr 1e-3, its default weight decay 0.01) with ``OneCycleLR``, batch 32,
mean cross-entropy, no augmentation (a K-shot task trains for at least 100 optimizer steps, as in heartlora). Also a
linear probe on frozen features computed once per task (the same CLS + mean-patch features, a Linear trained on them
with the same optimizer and schedule).

Only the data (``heartlora.data.get_task``: the same splits, images and seeds as every heartlora run) and the offline
DINOv2 weights (``heartlora.backbones.dinov2_offline``) come from heartlora; the model, adapter, loop and schedule are
transformers', PEFT's and torch's. A finished run writes ``metrics.json`` with the keys of heartlora's runs (method
``hf-peft`` or ``linear-probe``), so a suite reads it as one more column.

    python benchmarks/baselines/hf_peft.py --task digits --protocol val --out runs/base/digits-hf-peft
    python benchmarks/baselines/hf_peft.py --task vtab:/data/cifar --method linear-probe --out runs/base/cifar-lp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROTOCOLS = {"val": ("train800", "val200"), "final": ("train800val200", "test")}
MIN_FEWSHOT_STEPS = 100  # as heartlora's engine: a K-shot task trains for at least this many optimizer steps
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METHODS = ("hf-peft", "linear-probe")


def build_model(num_classes: int) -> nn.Module:
    """``Dinov2ForImageClassification`` with the offline DINOv2 ViT-S/14 weights in its backbone."""
    from safetensors.torch import load_file
    from transformers import Dinov2ForImageClassification

    from heartlora.backbones.dinov2_offline import cached_weights, dinov2_small_config, to_installed_names

    config = dinov2_small_config(0.0)
    config.num_labels = num_classes
    model = Dinov2ForImageClassification(config)
    weights = to_installed_names(load_file(str(cached_weights())), set(model.dinov2.state_dict()))
    model.dinov2.load_state_dict(weights, strict=True)
    model.dinov2.embeddings.mask_token.requires_grad_(False)
    return model


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the attention's q and v Linears, under either naming of the installed transformers."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attention." in n
             and n.rsplit(".", 1)[-1] in ("query", "value", "q_proj", "v_proj")]
    if not names:
        raise SystemExit(f"no q/v attention Linears found in {type(model).__name__}")
    return names


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 128) -> torch.Tensor:
    """The classifier's input of ``Dinov2ForImageClassification``: CLS token and mean patch token, concatenated."""
    out = []
    for i in range(0, len(images), batch):
        h = model.dinov2(pixel_values=normalise(images[i:i + batch].to(device))).last_hidden_state
        out.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1).cpu())
    return torch.cat(out)


def train_loop(step_fn: Any, params: list[nn.Parameter], n: int, args: argparse.Namespace) -> float:
    """AdamW + OneCycleLR over ``args.epochs`` epochs of shuffled batches; ``step_fn(idx)`` returns the loss."""
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        for s in range(steps_per_epoch):
            step_fn(perm[s * args.batch_size:(s + 1) * args.batch_size]).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the clock reads the work done, not the work queued
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from heartlora.data import get_task

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 is exact fp32 (as on a CPU); tf32 and bf16 let matmuls use TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    task = get_task(args.task)
    train_split, eval_split = PROTOCOLS[args.protocol]
    train_x, train_y = task.load(train_split, img_size=args.img_size, seed=args.seed)
    eval_x, eval_y = task.load(eval_split, img_size=args.img_size, seed=args.seed)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size
    if re.search(r"@\d+shot$", args.task) and args.epochs * steps_per_epoch < MIN_FEWSHOT_STEPS:
        # the same floor heartlora's engine applies to K-shot tasks, so both train for as many steps
        args.epochs = -(-MIN_FEWSHOT_STEPS // steps_per_epoch)
    model = build_model(task.num_classes).to(device)
    adapter_bytes = 0
    if args.method == "linear-probe":
        model.eval()
        f_train, f_eval = features(model, train_x, device), features(model, eval_x, device)
        clf = nn.Linear(f_train.shape[1], task.num_classes).to(device)
        params = list(clf.parameters())
        train_s = train_loop(lambda idx: F.cross_entropy(clf(f_train[idx].to(device)), train_y[idx].to(device)),
                             params, len(train_x), args)
        with torch.no_grad():
            pred = torch.cat([clf(f_eval[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(f_eval), 512)])
    else:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=lora_targets(model),
                                                 modules_to_save=["classifier"], bias="none"))
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()

        def step(idx: torch.Tensor) -> torch.Tensor:
            x = normalise(train_x[idx].to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits = model(pixel_values=x).logits
            return F.cross_entropy(logits.float(), train_y[idx].to(device))

        train_s = train_loop(step, params, len(train_x), args)
        if args.save_peft:  # the trained adapter as a PEFT folder (what `heartlora prune` reads)
            model.peft_config["default"].base_model_name_or_path = "dinov2_small"
            model.save_pretrained(str(args.save_peft))
        adapter_bytes = sum(t.numel() * t.element_size() for k, t in get_peft_model_state_dict(model).items()
                            if "lora_" in k)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(pixel_values=normalise(eval_x[i:i + 128].to(device))).logits.argmax(1).cpu()
                              for i in range(0, len(eval_x), 128)])
    acc = float((pred == eval_y).float().mean())
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device", "threads", "save_peft")}
    return {
        "task": args.task, "method": args.method, "backbone": "dinov2_small", "protocol": args.protocol,
        "seed": args.seed, "settings": settings, "accuracy": acc, "accuracy_split": eval_split,
        "train_split": train_split, "selection": "none: the last epoch is reported; evaluated once, after training",
        "adapter_bytes": adapter_bytes, "trainable_params": sum(p.numel() for p in params),
        "heads_total": 0, "heads_off": [], "wall_s": time.perf_counter() - t_start,
        "train_images_per_s": args.epochs * len(train_x) / max(train_s, 1e-9),
        "engine": "outside heartlora: transformers + PEFT + torch (benchmarks/baselines/hf_peft.py)",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="any task heartlora reads: a name, vtab:DIR, NAME@Kshot")
    ap.add_argument("--method", default="hf-peft", choices=METHODS)
    ap.add_argument("--protocol", default="final", choices=tuple(PROTOCOLS))
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                    help="fp32 (exact, as on a CPU), tf32 (TF32 matmuls on CUDA) or bf16 (autocast; TF32 too)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, required=True, help="run folder; a folder with metrics.json is not run again")
    ap.add_argument("--save-peft", type=Path, default=None, help="hf-peft: also save the trained adapter (PEFT folder)")
    args = ap.parse_args(argv)
    done = args.out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = done.with_name(f".metrics.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, done)
    print(f"{args.method} on {args.task}: {metrics['accuracy_split']} accuracy {100 * metrics['accuracy']:.2f} % "
          f"({metrics['wall_s']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
