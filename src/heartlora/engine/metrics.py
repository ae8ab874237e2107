"""Accuracy on a split (sharded over ranks) and the run's ``metrics.json`` (schema: docs/METRICS.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heartlora._paths import atomic_path
from heartlora.engine.distributed import DistInfo, all_reduce_sum, shard

# Bump when a key changes meaning or disappears (adding keys does not need a bump).
SCHEMA_VERSION = 1

REQUIRED_KEYS = (
    "task", "method", "backbone", "protocol", "seed", "settings", "accuracy", "accuracy_split", "adapter_bytes",
    "trainable_params", "heads_total", "heads_off", "wall_s", "train_images_per_s",
)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """Logits for uint8 images (N, 3, S, S), computed in batches on ``device`` and returned on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255.0)
        out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, info: DistInfo,
             batch_size: int = 128) -> float:
    """Top-1 accuracy over the whole split; under DDP each rank scores its interleaved share and counts are summed."""
    idx = shard(torch.arange(len(images)), info)
    logits = predict_logits(model, images[idx], info.device, batch_size)
    correct = float((logits.argmax(1) == labels[idx]).sum()) if len(idx) else 0.0
    correct, total = all_reduce_sum([correct, float(len(idx))], info)
    return correct / total if total else float("nan")


def _clean(value: Any) -> Any:
    """JSON-safe copy: tensors become lists, NaN and infinity become null."""
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON, atomically; it must carry every key of REQUIRED_KEYS."""
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean({"schema_version": SCHEMA_VERSION, **metrics}), indent=2) + "\n")
    return path


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json``."""
    return json.loads(Path(path).read_text())
