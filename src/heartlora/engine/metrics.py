"""Accuracy on a split (sharded over ranks) and the run's ``metrics.json`` (schema: docs/METRICS.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heartlora._paths import atomic_path
from heartlora.engine.distributed import DistInfo, all_reduce_sum, shard
from heartlora.errors import MetricsError
from heartlora.method.model import evaluating

log = logging.getLogger(__name__)

# Bump when a key changes meaning or disappears (adding keys does not need a bump).
SCHEMA_VERSION = 1

REQUIRED_KEYS = (
    "task", "method", "backbone", "protocol", "seed", "settings", "accuracy", "accuracy_split", "adapter_bytes",
    "trainable_params", "heads_total", "heads_off", "wall_s", "train_images_per_s",
)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """Logits for uint8 images (N, 3, S, S), computed in batches on ``device`` and returned on the CPU."""
    out = []
    with evaluating(model):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255.0)
            out.append(model(x).float().cpu())
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


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write ``metrics`` as indented JSON, atomically, with a sha256 of its content (``sha256``, checked by
    ``read_metrics``); it must carry every key of REQUIRED_KEYS. Returns what was written (as read back)."""
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}")
    path = Path(path)
    data = _clean({"schema_version": SCHEMA_VERSION, **metrics})
    data["sha256"] = metrics_digest(data)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return data


def metrics_digest(data: dict[str, Any]) -> str:
    """sha256 of a metrics.json's content (every key but ``sha256``, in a canonical JSON form)."""
    body = {k: v for k, v in data.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def way_out_of_bad_metrics(folder: Path) -> str:
    """What a user does about a run folder whose metrics.json cannot be shown."""
    return f"`heartlora eval --adapter {folder}` evaluates the run's adapter again, or --overwrite trains it again"


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` and check it before anything reports it: JSON, the schema (version, required keys,
    the types of the reported numbers) and its checksum. A file of an older heartlora, without a checksum, is read
    with a warning. Anything else is one MetricsError line naming the file and the way out."""
    path = Path(path)
    way_out = way_out_of_bad_metrics(path.parent)

    def damaged(why: str) -> MetricsError:
        return MetricsError(f"{path} is damaged ({why}): {way_out}")

    if path.is_symlink():
        raise MetricsError(f"{path} is a symbolic link: heartlora does not follow links inside a run folder; remove "
                           "it, then " + way_out.replace("`heartlora", "run `heartlora", 1))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise damaged(f"it cannot be read: {getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    except ValueError:
        raise damaged("it is not JSON") from None
    if not isinstance(data, dict):
        raise damaged(f"it holds a JSON {type(data).__name__}, not an object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise damaged(f"schema_version {data.get('schema_version')!r}, not {SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise damaged(f"it lacks {', '.join(missing[:3])}")
    acc = data["accuracy"]
    if not (acc is None or (type(acc) in (int, float) and 0 <= acc <= 1)) or not isinstance(data["settings"], dict):
        raise damaged("its accuracy or settings have the wrong type or range")
    if "sha256" not in data:
        log.warning("%s was written by an older heartlora without a checksum: it is shown unchecked", path)
    elif data["sha256"] != metrics_digest(data):
        raise damaged("its checksum does not match its content")
    return data
