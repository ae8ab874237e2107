"""PEFT's LoRA as the peer baseline of the accuracy suite, trained exactly like the engine trains ``lora``.

The engine has no PEFT method, so this module rebuilds the engine's loop around a ``peft.get_peft_model`` model,
reusing the engine's pieces so that only the adapter implementation differs: ``resolve`` (the same defaults),
``create_backbone`` with the same seed, drop-path and image size, the same data splits, the same per-epoch shuffle,
AdamW, the engine's warmup + cosine ``_Schedule``, summed cross-entropy divided by the batch, and the engine's
``accuracy``. It writes a ``metrics.json`` with the engine's required keys. There is no checkpoint: an interrupted
run starts again (runs are minutes long), and a folder with a ``metrics.json`` is a finished run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Only the q and v Linears of the HF DINOv2 / ViT attention (transformers 5 names and the older ones).
PROJ_NAMES = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value"), "o": ("o_proj", "dense")}


def target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full module names of the attention Linears for ``targets`` (full names, so that PEFT cannot match an MLP
    ``dense`` by suffix)."""
    wanted = {n for t in targets for n in PROJ_NAMES[t]}
    names = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and ".attention." in f".{name}." and name.rsplit(".", 1)[-1] in wanted]
    if not names:
        raise ValueError(f"no attention Linears named {sorted(wanted)} in {type(model).__name__}")
    return names


def peft_model(model: nn.Module, targets: tuple[str, ...], rank: int, scale: float, dropout: float = 0.0) -> nn.Module:
    """``get_peft_model`` with LoRA on ``targets``; lora_alpha = scale·rank so PEFT's scaling (alpha / r) equals our
    fixed scale. The classifier trains too (``modules_to_save``), as in the engine's methods."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=dropout,
                     target_modules=target_modules(model, targets), modules_to_save=["head"], bias="none")
    return get_peft_model(model, cfg)


def peft_adapter_bytes(model: nn.Module) -> int:
    """Bytes of the LoRA weights PEFT would save (float32 A and B), without the classifier: the engine's
    ``adapter_bytes`` also leaves the classifier out."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return sum(t.numel() * t.element_size() for k, t in state.items() if "lora_" in k)


def train_peft(cfg: Any) -> dict[str, Any]:
    """Train PEFT LoRA for a ``heartlora.engine.TrainConfig`` (its ``method`` is ignored; "lora" fills the
    defaults) into ``cfg.out``; return the metrics. A finished folder is read back, not trained again."""
    from heartlora.backbones import create_backbone
    from heartlora.data import get_task
    from heartlora.engine import PROTOCOLS, resolve
    from heartlora.engine.distributed import setup
    from heartlora.engine.metrics import accuracy, read_metrics, write_metrics
    from heartlora.engine.trainer import _Schedule

    out = Path(cfg.out)
    if (out / "metrics.json").is_file():
        metrics = read_metrics(out / "metrics.json")
        metrics["already_finished"] = True
        return metrics
    t_start = time.perf_counter()
    cfg = resolve(dataclasses.replace(cfg, method="lora"))
    task = get_task(cfg.task)
    train_split, eval_split = PROTOCOLS[cfg.protocol]
    train_x, train_y = task.load(train_split, img_size=cfg.img_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg.backbone, num_classes=task.num_classes, img_size=cfg.img_size,
                            pretrained=cfg.pretrained, pool=cfg.pool, drop_path=cfg.drop_path)
    model = peft_model(model, cfg.targets, cfg.rank, cfg.scale, cfg.dropout)
    info = setup(cfg.device)  # one process: the device only (torchrun is not supported for this baseline)
    device = info.device
    model.to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)
    n = len(train_x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = _Schedule(optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch,
                         cfg.min_lr_ratio)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    eval_x, eval_y = task.load(eval_split, img_size=cfg.img_size, seed=cfg.seed) if cfg.protocol == "val" \
        else (None, None)
    history: list[dict[str, Any]] = []
    train_time, images_seen = 0.0, 0
    for epoch in range(cfg.epochs):
        model.train()
        # The engine's shuffle for this seed and epoch: both implementations see the same batches.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        loss_sum = correct = seen = 0.0
        t0 = time.perf_counter()
        for step in range(steps_per_epoch):
            batch = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
            x = train_x[batch].float().div_(255.0)
            y = train_y[batch]
            logits = model(x)
            batch_loss = loss_fn(logits, y)
            (batch_loss / len(batch)).backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += float(batch_loss.detach())
            correct += float((logits.detach().argmax(1) == y).sum())
            seen += len(batch)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        images_seen += int(seen)
        eval_acc = None
        if cfg.protocol == "val" and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            eval_acc = accuracy(model, eval_x, eval_y, info)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "eval_acc": eval_acc, "eval_split": eval_split if eval_acc is not None else None,
                        "lr": optimizer.param_groups[0]["lr"], "time_s": epoch_time,
                        "images_per_s": seen / epoch_time})
    final_acc = history[-1]["eval_acc"]
    if cfg.protocol == "final":
        test_x, test_y = task.load("test", img_size=cfg.img_size, seed=cfg.seed)
        final_acc = accuracy(model, test_x, test_y, info)
    settings = dataclasses.replace(cfg, method="peft-lora").settings()
    metrics: dict[str, Any] = {
        "task": cfg.task, "method": "peft-lora", "backbone": cfg.backbone, "protocol": cfg.protocol,
        "seed": cfg.seed, "settings": settings, "accuracy": final_acc, "accuracy_split": eval_split,
        "train_split": train_split,
        "selection": "none: the last epoch is reported; test is evaluated once, after training",
        "adapter_bytes": peft_adapter_bytes(model), "adapter_file_bytes": None,
        "trainable_params": sum(p.numel() for p in params), "heads_total": 0, "heads_off": [],
        "heads_off_count": 0, "head_masks": {}, "responsiveness": None,
        "wall_s": time.perf_counter() - t_start, "train_images_per_s": images_seen / max(train_time, 1e-9),
        "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs, "final_train_loss": history[-1]["train_loss"],
        "final_train_acc": history[-1]["train_acc"], "history": history, "world_size": 1, "device": device.type,
        "num_classes": task.num_classes, "implementation": "peft " + _peft_version(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    return metrics


def _peft_version() -> str:
    import peft

    return peft.__version__


__all__ = ["peft_adapter_bytes", "peft_model", "target_modules", "train_peft"]
