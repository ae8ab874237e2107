"""Adapter files: safetensors tensors plus one JSON metadata entry. Only active heads are stored; k-bit weights as
packed codes plus float32 mean and std per matrix. Loading checks everything and never unpickles."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from heartlora._paths import atomic_path
from heartlora.errors import AdapterFileError, ConfigError
from heartlora.method import quant
from heartlora.method.config import FLOAT_BITS, HeartLoRAConfig
from heartlora.method.deactivate import deactivate_heads
from heartlora.method.layer import HeadLoRAProjection
from heartlora.method.model import _state, attach, attention_layers, backbone_fingerprint, head_masks

FORMAT = "heartlora-adapter"
FORMAT_VERSION = 1
_META_KEY = "heartlora"


@dataclass
class AdapterReport:
    """What a saved adapter costs. ``adapter_bytes`` counts the adapter weights and their quantization constants
    only (as the Bi-LoRA code counts), without the classifier and without metadata."""

    path: str
    adapter_bytes: int
    head_bytes: int
    file_bytes: int
    heads_total: int
    heads_on: int


def _backbone_spec(model: nn.Module) -> dict[str, Any]:
    spec = getattr(getattr(model, "module", model), "spec", None)
    return dict(spec) if isinstance(spec, dict) else {"name": type(getattr(model, "module", model)).__name__}


def _matrix_entries(proj: HeadLoRAProjection) -> dict[str, torch.Tensor]:
    """The projection's two factors over its active heads, keyed A / B. These are the matrices the forward
    quantizes (k-bit codes are taken from them with their own mean and std), not already quantized values."""
    if not proj.active_heads():
        return {}
    return {"A": proj.lora_A.detach(), "B": proj.lora_B.detach()}


def _encode(prefix: str, w: torch.Tensor, bits: int, out: dict[str, torch.Tensor]) -> int:
    """Add ``w``'s stored form to ``out``; return its bytes."""
    if bits == FLOAT_BITS:
        out[prefix] = w.float().contiguous().cpu()
        return out[prefix].numel() * 4
    codes, mu, sigma = quant.encode(w.float(), bits)
    out[f"{prefix}.codes"] = quant.pack_codes(codes, bits)
    out[f"{prefix}.stats"] = torch.stack([mu, sigma]).float().cpu()
    return out[f"{prefix}.codes"].numel() + 8


def _decode(prefix: str, shape: list[int], bits: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if bits == FLOAT_BITS:
        return tensors[prefix]
    codes = quant.unpack_codes(tensors[f"{prefix}.codes"], bits, math.prod(shape)).view(shape)
    stats = tensors[f"{prefix}.stats"]
    return quant.decode(codes, stats[0], stats[1], bits)


def _payload_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> AdapterReport:
    """Write the adapter (active heads only), the saved modules (classifier) and metadata to ``path``
    (safetensors, written atomically)."""
    state = _state(model)
    cfg = state.config
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    adapter_bytes = 0
    for layer in attention_layers(model):
        for target, proj in layer.projections.items():
            for factor, w in _matrix_entries(proj).items():
                key = f"adapter.{layer.name}.{target}.{factor}"
                shapes[key] = list(w.shape)
                adapter_bytes += _encode(key, w, cfg.bits, tensors)
    head_bytes = 0
    root = getattr(model, "module", model)
    modules = dict(root.named_modules())
    for name in state.modules_to_save:
        for k, v in modules[name].state_dict().items():
            tensors[f"modules.{name}.{k}"] = v.detach().contiguous().cpu()
            head_bytes += v.numel() * v.element_size()
    masks = head_masks(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "backbone": _backbone_spec(model),
        "fingerprint": state.fingerprint,
        "modules_to_save": list(state.modules_to_save),
        "layers": [{"name": l.name, "layout": l.layout, "num_heads": l.num_heads, "head_dim": l.head_dim,
                    "head_mask": masks[l.name]} for l in attention_layers(model)],
        "shapes": shapes,
        "adapter_bytes": adapter_bytes,
        "payload_sha256": _payload_hash(tensors),
        "extra": extra_metadata or {},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    heads_total = sum(len(m) for m in masks.values())
    return AdapterReport(str(path), adapter_bytes, head_bytes, Path(path).stat().st_size, heads_total,
                         sum(sum(m) for m in masks.values()))


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist: check the path (train writes adapter.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is not a readable adapter file (corrupt or truncated: {e}); "
                               f"re-save it or train again") from None
    if raw is None:
        raise AdapterFileError(f"{path} is a safetensors file without heartlora metadata: it is not an adapter file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterFileError(f"{path} has corrupt heartlora metadata: re-save it or train again") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise AdapterFileError(f"{path} is not a heartlora adapter file")
    if meta["format_version"] > FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format version {meta['format_version']}, newer than this heartlora "
                               f"reads ({FORMAT_VERSION}): upgrade heartlora")
    if _payload_hash(tensors) != meta.get("payload_sha256"):
        raise AdapterFileError(f"{path} is corrupt: its tensors do not match the checksum written with them; "
                               f"re-save it or train again")
    return meta, tensors


def read_adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """The file's metadata (config, backbone spec, fingerprint, layers with head masks, bytes), after the same
    integrity checks as :func:`load_adapter`."""
    meta, _ = _read(path)
    return meta


def load_adapter(backbone: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True) -> nn.Module:
    """Attach the file's adapter to ``backbone`` (a fresh one, built as the file's ``backbone`` spec says), switch
    off its heads, load its weights and classifier. Refuses a file for another backbone or configuration."""
    meta, tensors = _read(path)
    try:
        cfg = HeartLoRAConfig.from_dict(meta["config"])
    except (ConfigError, TypeError, KeyError) as e:
        raise AdapterFileError(f"{path} has invalid adapter settings ({e})") from None
    cfg.modules_to_save = tuple(meta["modules_to_save"])
    spec = getattr(backbone, "spec", None)
    want = meta.get("backbone", {})
    if isinstance(spec, dict) and spec.get("name") != want.get("name"):
        raise AdapterFileError(f"{path} was trained on backbone {want.get('name')!r}, not {spec.get('name')!r}: "
                               f"build that backbone (create_backbone(**info['backbone']))")
    if check_fingerprint:
        fp = backbone_fingerprint(backbone, skip=cfg.modules_to_save)
        if fp != meta["fingerprint"]:
            raise AdapterFileError(
                f"{path} was trained on a backbone with other weights or shapes (fingerprint "
                f"{meta['fingerprint'][:12]}, this one {fp[:12]}): load the same pretrained backbone "
                f"({want.get('name')!r}, same img_size and num_classes), or pass check_fingerprint=False")
    model = attach(backbone, cfg)
    layers = {l.name: l for l in attention_layers(model)}
    stored = {l["name"]: l for l in meta["layers"]}
    if set(layers) != set(stored) or any(layers[n].num_heads != stored[n]["num_heads"] for n in layers):
        raise AdapterFileError(f"{path} describes other attention layers than this backbone has: "
                               f"use the backbone it was trained on ({want.get('name')!r})")
    off = [(n, h) for n, l in stored.items() for h, on in enumerate(l["head_mask"]) if not on]
    deactivate_heads(model, heads=off)
    with torch.no_grad():
        for layer in layers.values():
            for target, proj in layer.projections.items():
                if not proj.active_heads():
                    continue
                for factor in ("A", "B"):
                    key = f"adapter.{layer.name}.{target}.{factor}"
                    if key not in meta["shapes"]:
                        raise AdapterFileError(f"{path} lacks {key}: the file does not match its own metadata")
                    w = _decode(key, meta["shapes"][key], cfg.bits, tensors)
                    _assign(proj, factor, w, path)
                proj.mark_decoded()
        root = getattr(model, "module", model)
        modules = dict(root.named_modules())
        for name in cfg.modules_to_save:
            sd = {k[len(f"modules.{name}."):]: v for k, v in tensors.items() if k.startswith(f"modules.{name}.")}
            try:
                modules[name].load_state_dict(sd, strict=True)
            except (RuntimeError, KeyError) as e:
                raise AdapterFileError(f"{path}: module {name!r} does not fit this backbone ({str(e).splitlines()[0]});"
                                       f" build the backbone with the file's num_classes and pool") from None
    return model


def _assign(proj: HeadLoRAProjection, factor: str, w: torch.Tensor, path: Any) -> None:
    dst = proj.lora_A if factor == "A" else proj.lora_B
    if dst.shape != w.shape:
        raise AdapterFileError(f"{path}: {proj.layer_name}.{proj.target}.{factor} has shape {tuple(w.shape)}, "
                               f"expected {tuple(dst.shape)} for {len(proj.active_heads())} active heads (another "
                               f"rank or backbone, or a file inconsistent with its own head masks)")
    dst.copy_(w)
