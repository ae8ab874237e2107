"""Adapter files: safetensors tensors plus one JSON metadata entry. Only active heads are stored; k-bit weights as
packed codes plus float32 mean and std per matrix.

Loading checks everything before it allocates or builds anything: the tensors against the payload checksum, the JSON
against its own sha256 (format 2 on; every setting that changes outputs or labels is in that JSON), and every field's
type, range and agreement with the tensors. It never unpickles."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from heartlora._paths import atomic_path
from heartlora.errors import AdapterFileError, ConfigError
from heartlora.method import quant
from heartlora.method.config import FLOAT_BITS, TARGETS, HeartLoRAConfig
from heartlora.method.deactivate import deactivate_heads
from heartlora.method.layer import HeadLoRAProjection
from heartlora.method.model import (
    attach,
    attach_state,
    attention_layers,
    backbone_fingerprint,
    head_masks,
    is_adapted,
    remove_adapters,
)

log = logging.getLogger(__name__)
# The engine's run facts (task, class names, seed) inside a file's extra metadata.
RUN_KEY = "heartlora_run"
# The mean and std a heartlora backbone normalises its [0, 1] images with: buffers that are not weights, so the
# fingerprint does not cover them, and a backbone folder without its preprocessor_config.json builds another pair.
INPUT_NORM_KEY = "input_norm"

FORMAT = "heartlora-adapter"
# 3: the adapter's values may be stored at float16 or bfloat16 (the metadata's ``dtype``; written only then, so a
# float32 file stays version 2 and older heartlora reads it). 2: the metadata JSON has its own sha256
# (``heartlora_sha256``). 1: only the tensors were checked; still read, with a warning, after the same field checks.
FORMAT_VERSION = 3
# What an adapter's values (float factors, or a k-bit factor's mean and std) may be stored as; read back as float32.
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_META_KEY = "heartlora"
_META_SHA_KEY = "heartlora_sha256"

# Bounds a file's settings must respect before anything is allocated for them. They are far above any model these
# backbones describe (ViT-22B: 48 heads of 128, hidden 6144), and they bound what a damaged file can request.
MAX_RANK = 4096
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CLASSES = 100_000
MAX_IMG_SIZE = 4096
_SPEC_KEYS = {"name", "num_classes", "img_size", "pool", "drop_path"}  # create_backbone's arguments
_META_KEYS = {"format", "format_version", "config", "backbone", "fingerprint", "modules_to_save", "layers", "shapes",
              "adapter_bytes", "payload_sha256", "extra"}  # and "dtype" from version 3 on, where not float32


def store_dtype(dtype: str | torch.dtype | None) -> str:
    """The name (a key of ``STORE_DTYPES``) of a storage dtype given as a torch dtype, its name or fp32/fp16/bf16."""
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype).lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in STORE_DTYPES:
        raise ConfigError(f"cannot store an adapter as {dtype}: choose float32, float16 or bfloat16 (fp32, fp16, bf16)")
    return name


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


def _input_norm(model: nn.Module) -> dict[str, list[float]] | None:
    """The model's input normalisation (its own ``mean`` and ``std`` buffers, as a heartlora ImageClassifier holds
    them), or None for a model that normalises nothing itself (a transformers model: its image processor does)."""
    buffers = dict(getattr(model, "module", model).named_buffers(recurse=False))
    if not all(isinstance(buffers.get(k), torch.Tensor) for k in ("mean", "std")):
        return None
    return {k: buffers[k].detach().float().cpu().reshape(-1).tolist() for k in ("mean", "std")}


def _norm_text(norm: dict[str, Any] | None) -> str:
    return " and std ".join(str([round(float(v), 4) for v in (norm or {}).get(k, [])]) for k in ("mean", "std"))


def _check_input_norm(meta: dict[str, Any], backbone: nn.Module, path: Any) -> None:
    """A file saved with its backbone's normalisation is refused on a backbone that normalises otherwise."""
    saved = (meta.get("extra") or {}).get(INPUT_NORM_KEY)
    now = _input_norm(backbone)
    if saved is None or now is None:  # a file saved before the check records none
        return
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k), list) and saved[k]
                                            and all(_is_num(v) for v in saved[k]) for k in ("mean", "std"))):
        raise _corrupt(path, f"its {INPUT_NORM_KEY} is not a mean and std of numbers")
    buffers = dict(getattr(backbone, "module", backbone).named_buffers(recurse=False))
    for k in ("mean", "std"):
        want = torch.tensor(saved[k], dtype=torch.float32).to(buffers[k].dtype)  # a .half() model: its rounding
        if want.numel() != buffers[k].numel() or not torch.equal(want, buffers[k].detach().cpu().reshape(-1)):
            raise AdapterFileError(
                f"{path} was trained on images normalised with mean {_norm_text(saved)}, and this backbone normalises "
                f"with mean {_norm_text(now)}: build the backbone as it was trained (a Hugging "
                "Face folder with its preprocessor_config.json), or pass check_fingerprint=False")


def _matrix_entries(proj: HeadLoRAProjection) -> dict[str, torch.Tensor]:
    """The projection's two factors over its active heads, keyed A / B. These are the matrices the forward
    quantizes (k-bit codes are taken from them with their own mean and std), not already quantized values."""
    if not proj.active_heads():
        return {}
    return {"A": proj.lora_A.detach(), "B": proj.lora_B.detach()}


NARROW_TOLERANCE = 0.01  # the most a matrix may change, relative to its norm, when stored at a narrower dtype


def _narrowed(key: str, t: torch.Tensor, dtype: torch.dtype, path: Any) -> torch.Tensor:
    """``t`` as ``dtype``, refused in one line where finite values leave its range (they would load as inf) or the
    matrix changes by more than ``NARROW_TOLERANCE`` of its norm (values near float16's smallest, 6e-5, keep few
    bits or none; rounding alone changes a matrix by about 0.03 % at float16, 0.2 % at bfloat16)."""
    out = t.to(dtype).contiguous().cpu()
    if dtype == t.dtype or not bool(torch.isfinite(t).all()):
        return out
    name = str(dtype).removeprefix("torch.")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(f"cannot store {path} as {name}: {key} holds values beyond its range (largest "
                          f"{torch.finfo(dtype).max:g}); store it as bfloat16 or float32; nothing was written")
    norm = float(torch.linalg.vector_norm(t.float()))
    change = float(torch.linalg.vector_norm(out.float() - t.float().cpu())) / norm if norm > 0 else 0.0
    if change > NARROW_TOLERANCE:
        raise ConfigError(f"cannot store {path} as {name}: {key} would change by {100 * change:.1f} % of its norm "
                          f"(values too small for {name}, the smallest normal being {torch.finfo(dtype).tiny:g}); "
                          "store it as bfloat16 or float32; nothing was written")
    return out


def _encode(prefix: str, w: torch.Tensor, bits: int, out: dict[str, torch.Tensor],
            dtype: torch.dtype = torch.float32, path: Any = None, stats: torch.Tensor | None = None) -> int:
    """Add ``w``'s stored form to ``out`` (its values, or a k-bit factor's mean and std, as ``dtype``); return its
    bytes. ``stats``: the (mean, std) a loaded k-bit factor was decoded with, kept as they were."""
    if bits == FLOAT_BITS:
        out[prefix] = _narrowed(prefix, w.float(), dtype, path)
        return out[prefix].numel() * out[prefix].element_size()
    w = w.float()
    if stats is not None:
        mu, sigma = stats[0], stats[1]
        codes = quant.codes_for(w, mu, sigma, bits)
        # only while they give back exactly these values: a write torch's version counter misses (``p.data``), a
        # cast, or a degenerate std leaves values the file's statistics do not describe
        if not torch.equal(quant.decode(codes, mu, sigma, bits).to(w.device), w):
            stats = None
    if stats is None:
        codes, mu, sigma = quant.encode(w, bits)
    out[f"{prefix}.codes"] = quant.pack_codes(codes, bits)
    out[f"{prefix}.stats"] = _narrowed(f"{prefix}.stats", torch.stack([mu, sigma]).float(), dtype, path)
    return out[f"{prefix}.codes"].numel() + out[f"{prefix}.stats"].numel() * out[f"{prefix}.stats"].element_size()


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


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike,
                 extra_metadata: dict[str, Any] | None = None, *,
                 dtype: str | torch.dtype | None = None) -> AdapterReport:
    """Write the adapter (active heads only), the saved modules (classifier) and metadata to ``path``
    (safetensors, written atomically). ``extra_metadata`` must be JSON-able; it is covered by the checksum too.
    ``dtype``: what the adapter's values are stored as, float32 (the default), float16 or bfloat16 (half the bytes;
    a k-bit adapter's mean and std per factor); they load back as float32, so a model loaded from a float16 file
    computes with the float16-rounded adapter: evaluate that file (``heartlora eval``) for the accuracy it gives.
    The classifier is kept at float32."""
    if Path(path).is_dir():
        raise ConfigError(f"{path} is a folder: name the file to write, e.g. {Path(path) / 'adapter.safetensors'}")
    dtype_name = store_dtype(dtype)
    state = attach_state(model)
    cfg = state.config
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    adapter_bytes = 0
    for layer in attention_layers(model):
        for target, proj in layer.projections.items():
            decoded = proj.decoded_stats() or {}  # a loaded k-bit adapter: its own codes and statistics again
            for factor, w in _matrix_entries(proj).items():
                key = f"adapter.{layer.name}.{target}.{factor}"
                shapes[key] = list(w.shape)
                adapter_bytes += _encode(key, w, cfg.bits, tensors, STORE_DTYPES[dtype_name], path,
                                         decoded.get(factor))
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
        "format_version": 2 if dtype_name == "float32" else FORMAT_VERSION,  # a float32 file: older heartlora reads it
        "config": cfg.to_dict(),
        "backbone": _backbone_spec(model),
        "fingerprint": state.fingerprint,
        "modules_to_save": list(state.modules_to_save),
        "layers": [{"name": a.name, "layout": a.layout, "num_heads": a.num_heads, "head_dim": a.head_dim,
                    "head_mask": masks[a.name]} for a in attention_layers(model)],
        "shapes": shapes,
        "adapter_bytes": adapter_bytes,
        "payload_sha256": _payload_hash(tensors),
        "extra": {**(extra_metadata or {}), **({INPUT_NORM_KEY: norm} if (norm := _input_norm(model)) else {})},
        **({} if dtype_name == "float32" else {"dtype": dtype_name}),
    }
    diverged = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if diverged:
        more = f" (and {len(diverged) - 1} more)" if len(diverged) > 1 else ""
        raise ConfigError(f"cannot save {path}: {diverged[0]}{more} holds NaN or infinite values, so training "
                          "diverged (for example fp16 weights under AdamW, whose eps underflows there: keep the "
                          "adapters in float32 and use autocast, or lower the learning rate); nothing was written")
    _write_checked(path, tensors, meta)
    heads_total = sum(len(m) for m in masks.values())
    return AdapterReport(str(path), adapter_bytes, head_bytes, Path(path).stat().st_size, heads_total,
                         sum(sum(m) for m in masks.values()))


def _adapter_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The adapter's stored bytes: its values at their stored size, or packed code bytes plus the mean and std (the
    classifier, ``modules.*``, apart)."""
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith("modules."))


def _write_checked(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` atomically, once the reader's own checks pass on them: every file heartlora
    writes can be read back."""
    try:
        text = json.dumps(meta, allow_nan=False)
        _check_meta(json.loads(text), tensors, path)
    except (TypeError, ValueError, AdapterFileError) as e:
        raise ConfigError(f"cannot save an adapter file heartlora could not read back: {e}") from None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: text, _META_SHA_KEY: _text_hash(text)})


def convert_adapter(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype) -> AdapterReport:
    """The adapter file ``src`` (or a run folder's) stored again as ``dtype`` (float32, float16 or bfloat16, see
    :func:`save_adapter`) at ``dst``, after every check a load makes; its settings, heads, classifier and extra
    metadata (a run's facts) unchanged. Widening (float16 to float32) is exact; narrowing rounds each value once."""
    name = store_dtype(dtype)
    meta, tensors, _ = _read(src)  # adapter values widened to float32 already
    if Path(dst).is_dir():
        raise ConfigError(f"{dst} is a folder: name the file to write, e.g. {Path(dst) / 'adapter.safetensors'}")
    out = {k: t if k.startswith("modules.") or not t.is_floating_point() else _narrowed(k, t, STORE_DTYPES[name], dst)
           for k, t in tensors.items()}
    adapter_bytes = _adapter_bytes(out)
    new = {k: v for k, v in meta.items() if k != "dtype"}
    new.update(format_version=2 if name == "float32" else FORMAT_VERSION, adapter_bytes=adapter_bytes,
               payload_sha256=_payload_hash(out), **({} if name == "float32" else {"dtype": name}))
    _write_checked(dst, out, new)
    masks = [layer["head_mask"] for layer in meta["layers"]]
    head_bytes = sum(t.numel() * t.element_size() for k, t in out.items() if k.startswith("modules."))
    return AdapterReport(str(dst), adapter_bytes, head_bytes, Path(dst).stat().st_size, sum(map(len, masks)),
                         sum(map(sum, masks)))


# ---------------------------------------------------------------------------------------------------------------------
# Reading and checking a file


def _corrupt(path: Any, what: str) -> AdapterFileError:
    return AdapterFileError(f"{path} is corrupt: {what}; re-save it or train again")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _is_strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) and s for s in v)


def check_backbone_spec(spec: Any, where: Any) -> dict[str, Any]:
    """``spec`` if it is a backbone spec a file may hold (``create_backbone``'s arguments with sane types and
    ranges); else an `AdapterFileError` naming ``where`` (the file). Nothing is built or allocated."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _corrupt(where, "its backbone spec has no backbone name")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise _corrupt(where, f"its backbone spec has unknown fields {unknown}")
    checks = {"num_classes": lambda v: _is_int(v, 1, MAX_CLASSES),
              "img_size": lambda v: v is None or _is_int(v, 1, MAX_IMG_SIZE),
              "pool": lambda v: isinstance(v, str), "drop_path": lambda v: _is_num(v, 0.0, 0.999999)}
    for key, ok in checks.items():
        if key in spec and not ok(spec[key]):
            raise _corrupt(where, f"its backbone {key} {spec[key]!r} is out of range or of the wrong type")
    return spec


def _check_config(d: Any, path: Any) -> HeartLoRAConfig:
    if not isinstance(d, dict):
        raise _corrupt(path, "its adapter config is not a JSON object")
    known = {f.name for f in fields(HeartLoRAConfig)}
    if set(d) - known:
        raise AdapterFileError(f"{path} has unknown adapter settings {sorted(set(d) - known)}: it was written by a "
                               "newer heartlora; upgrade heartlora")
    checks = {"targets": lambda v: _is_strs(v) and set(v) <= set(TARGETS),
              "rank": lambda v: _is_int(v, 1, MAX_RANK), "scale": _is_num,
              "dropout": lambda v: _is_num(v, 0.0, 0.999999),
              "bits": lambda v: _is_int(v, 1, 8) or _is_int(v, FLOAT_BITS, FLOAT_BITS),
              "init_b_std": lambda v: v is None or _is_num(v, 0.0),
              "modules_to_save": lambda v: v is None or _is_strs(v)}
    for key, ok in checks.items():
        if key in d and not ok(d[key]):
            raise _corrupt(path, f"its adapter setting {key} = {d[key]!r} is out of range or of the wrong type")
    try:
        return HeartLoRAConfig.from_dict(d)
    except (ConfigError, TypeError, ValueError) as e:
        raise _corrupt(path, f"its adapter settings are invalid ({e})") from None


def _check_layers(layers: Any, path: Any) -> list[dict[str, Any]]:
    if not isinstance(layers, list) or not layers:
        raise _corrupt(path, "its attention layer list is missing or empty")
    names = set()
    for i, layer in enumerate(layers):
        ok = (isinstance(layer, dict) and set(layer) == {"name", "layout", "num_heads", "head_dim", "head_mask"}
              and isinstance(layer["name"], str) and layer["name"] and isinstance(layer["layout"], str)
              and _is_int(layer["num_heads"], 1, MAX_HEADS) and _is_int(layer["head_dim"], 1, MAX_HEAD_DIM)
              and isinstance(layer["head_mask"], list) and len(layer["head_mask"]) == layer["num_heads"]
              and all(isinstance(m, bool) for m in layer["head_mask"]) and layer["name"] not in names)
        if not ok:
            raise _corrupt(path, f"its attention layer entry {i} is malformed")
        names.add(layer["name"])
    return layers


def _expected_tensors(meta: dict[str, Any], cfg: HeartLoRAConfig, path: Any) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every adapter tensor the metadata implies (key → dtype, shape), after checking the shapes themselves."""
    values = STORE_DTYPES[meta.get("dtype", "float32")]
    shapes = meta["shapes"]
    if not isinstance(shapes, dict):
        raise _corrupt(path, "its shape table is not a JSON object")
    expected: dict[str, tuple[torch.dtype, tuple]] = {}
    wanted_keys = set()
    for layer in meta["layers"]:
        on = sum(layer["head_mask"])
        if not on:
            continue
        for target in cfg.targets:
            for factor in ("A", "B"):
                key = f"adapter.{layer['name']}.{target}.{factor}"
                wanted_keys.add(key)
                shape = shapes.get(key)
                if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n, 1, 2**31) for n in shape)):
                    raise _corrupt(path, f"the shape of {key} is missing or malformed")
                # A is (rank × in), B is (out × rank); the per-head side holds exactly the active heads' rows.
                rank_dim = shape[0] if factor == "A" else shape[1]
                per_head = (factor == "B") == (target != "o")
                head_side = shape[0] if factor == "B" else shape[1]
                if rank_dim != cfg.rank or (per_head and head_side != on * layer["head_dim"]):
                    raise _corrupt(path, f"the shape {shape} of {key} disagrees with rank {cfg.rank} and {on} "
                                         f"active heads of {layer['head_dim']}")
                if cfg.bits == FLOAT_BITS:
                    expected[key] = (values, tuple(shape))
                else:
                    expected[f"{key}.codes"] = (torch.uint8, (quant.packed_nbytes(math.prod(shape), cfg.bits),))
                    expected[f"{key}.stats"] = (values, (2,))
    if set(shapes) != wanted_keys:
        raise _corrupt(path, "its shape table names other matrices than its layers and head masks imply")
    return expected


def _check_meta(meta: Any, tensors: dict[str, torch.Tensor], path: Any) -> HeartLoRAConfig:
    """Every field's type and range, and its agreement with the tensors; the adapter config on success."""
    if not isinstance(meta, dict) or set(meta) - {"dtype"} != _META_KEYS:
        raise _corrupt(path, "its metadata does not have the fields of an adapter file")
    if "dtype" in meta:
        if not (isinstance(meta["dtype"], str) and meta["dtype"] in STORE_DTYPES):
            raise _corrupt(path, f"its dtype {meta['dtype']!r} is not one of {', '.join(STORE_DTYPES)}")
        if not _is_int(meta["format_version"], 3, 2**31):
            raise _corrupt(path, f"it names a dtype but is format version {meta['format_version']!r} (a dtype needs "
                                 "version 3)")
    cfg = _check_config(meta["config"], path)
    spec = check_backbone_spec(meta["backbone"], path)
    if not (isinstance(meta["fingerprint"], str) and re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"])):
        raise _corrupt(path, "its backbone fingerprint is not a sha256")
    saved = meta["modules_to_save"]
    if not _is_strs(saved) or len(set(saved)) != len(saved):
        raise _corrupt(path, "its modules_to_save is not a list of distinct module names")
    if not isinstance(meta["extra"], dict):
        raise _corrupt(path, "its extra metadata is not a JSON object")
    _check_layers(meta["layers"], path)
    expected = _expected_tensors(meta, cfg, path)
    for key, t in tensors.items():
        if key.startswith("modules."):
            if not any(key.startswith(f"modules.{name}.") for name in saved):
                raise _corrupt(path, f"tensor {key} belongs to no saved module")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _corrupt(path, f"tensor {key} holds NaN or infinite values")
            continue
        if key not in expected:
            raise _corrupt(path, f"tensor {key} is not described by its metadata")
        dtype, shape = expected[key]
        if t.dtype != dtype or tuple(t.shape) != shape or not bool(torch.isfinite(t.float()).all()):
            raise _corrupt(path, f"tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} of finite "
                                 f"values")
        if key.endswith(".stats") and not t[1] > 0:
            raise _corrupt(path, f"tensor {key} has a standard deviation that is not positive")
    missing = sorted(set(expected) - set(tensors))
    missing += [f"modules.{n}.*" for n in saved if not any(k.startswith(f"modules.{n}.") for k in tensors)]
    if missing:
        raise _corrupt(path, f"it lacks {missing[0]}, which its metadata describes")
    nbytes = _adapter_bytes(tensors)  # every adapter tensor is now one ``expected`` names, at its dtype
    if meta["adapter_bytes"] != nbytes:
        raise _corrupt(path, f"its adapter_bytes {meta['adapter_bytes']!r} disagrees with its tensors ({nbytes})")
    head = tensors.get("modules.head.weight")
    if "num_classes" in spec and head is not None and head.ndim == 2 and head.shape[0] != spec["num_classes"]:
        raise _corrupt(path, f"its backbone num_classes {spec['num_classes']} disagrees with its classifier "
                             f"({head.shape[0]} outputs)")
    return cfg


def adapter_file(path: str | os.PathLike) -> Path:
    """``path``, or the ``adapter.safetensors`` inside it when it is a run folder (as the CLI takes it)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "adapter.safetensors").is_file():
            raise AdapterFileError(f"{path} is a folder without adapter.safetensors: name the adapter file, or the "
                                   "folder of a finished run")
        return path / "adapter.safetensors"
    return path


AdapterContents = tuple[dict[str, Any], dict[str, torch.Tensor], HeartLoRAConfig]


def read_adapter(path: str | os.PathLike) -> AdapterContents:
    """An adapter file read once and checked completely (integrity, fields, shapes): its metadata (as
    :func:`read_adapter_info` gives it), its tensors and its settings. ``load_adapter(..., contents=…)`` attaches
    what this read, so a caller that needs the metadata first (an AdapterBank) reads the file only once."""
    return _read(path)


def _read(path: str | os.PathLike) -> AdapterContents:
    path = adapter_file(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist: check the path (train writes adapter.safetensors)")
    try:
        # safetensors checks that the header's offsets fit the file, so no tensor here is larger than the file.
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterFileError(f"{path} is not a readable adapter file (corrupt or truncated: "
                               f"{' '.join(str(e).split())[:120]}); re-save it or train again") from None
    raw, digest = header.get(_META_KEY), header.get(_META_SHA_KEY)
    if raw is None:
        raise AdapterFileError(f"{path} is a safetensors file without heartlora metadata: it is not an adapter file")
    if digest is not None and digest != _text_hash(raw):
        raise _corrupt(path, "its metadata does not match the checksum written with it")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise _corrupt(path, "its heartlora metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not _is_int(meta.get("format_version"), 1, 2**31):
        raise AdapterFileError(f"{path} is not a heartlora adapter file")
    version = meta["format_version"]
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format version {version}, newer than this heartlora reads "
                               f"({FORMAT_VERSION}): upgrade heartlora")
    if version >= 2 and digest is None:
        raise _corrupt(path, "its metadata checksum is missing")
    if _payload_hash(tensors) != meta.get("payload_sha256"):
        raise _corrupt(path, "its tensors do not match the checksum written with them")
    cfg = _check_meta(meta, tensors, path)
    if meta.get("dtype", "float32") != "float32":  # every reader computes in float32: the stored values, widened
        tensors = {k: t.float() if t.is_floating_point() and not k.startswith("modules.") else t
                   for k, t in tensors.items()}
    if version == 1:
        log.warning("%s is a format-1 adapter file: its tensors are checked, but its metadata (settings, class "
                    "names) has no checksum; save it again to protect it", path)
    return meta, tensors, cfg


def read_adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """The file's metadata (config, backbone spec, fingerprint, layers with head masks, bytes), after the same
    integrity and field checks as :func:`load_adapter`."""
    meta, _, _ = _read(path)
    return meta


# The config.json a Trainer folder's adapter was saved beside, as the adapter file keeps it: `load_adapter(DIR)`
# builds the backbone from that file, and the weights' fingerprint does not cover settings such as layer_norm_eps
# or hidden_act. Left out: what names the copy rather than the model (the dtype is the fingerprint's).
TRANSFORMERS_CONFIG_KEY = "transformers_config"
_CONFIG_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


def transformers_config_facts(config_json: Path) -> dict[str, Any] | None:
    """The settings of a transformers config.json that are the model's, as JSON; None where there is no such file."""
    try:
        data = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if k not in _CONFIG_VOLATILE} if isinstance(data, dict) else None


def _check_transformers_config(meta: dict[str, Any], folder: Path) -> None:
    """The config.json a Trainer folder's backbone was built from must be the one its adapter was saved beside."""
    saved = (meta.get("extra") or {}).get(TRANSFORMERS_CONFIG_KEY)
    now = transformers_config_facts(folder / "config.json")
    if saved is None or saved == now:  # a file saved before the check records none
        return
    now = now or {}
    key = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))[0]
    raise AdapterFileError(f"{folder}/config.json is not the config the adapter was trained with ({key}: "
                           f"{now.get(key, 'absent')!r} there, {saved.get(key, 'absent')!r} when saved): restore "
                           "the folder's config.json")


def _transformers_backbone(folder: Path) -> nn.Module:
    """The transformers model a Trainer folder holds (config.json + model.safetensors, the frozen backbone and the
    trained classifier), built without the PEFT adapter beside it, which transformers would otherwise load."""
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(f"load_adapter({str(folder)!r}) without a backbone needs a folder saved by a "
                          "transformers Trainer with HeartLoRACallback (config.json, model.safetensors); else pass "
                          "the backbone: load_adapter(create_backbone(**read_adapter_info(path)['backbone']), path)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ConfigError(f"{folder}/config.json names no transformers model class (architectures): load the model "
                          "yourself and pass it, load_adapter(model, path)")
    # from_pretrained maps the file's key names (transformers writes its older names) to the class's; given no
    # folder, it does not look for the PEFT adapter beside the weights
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten, leaves the caller's RNG alone
        model, info = cls.from_pretrained(None, config=config, state_dict=load_file(str(folder / "model.safetensors")),
                                          output_loading_info=True)
    wrong = sorted(set(info["missing_keys"]) | set(info["unexpected_keys"]) | set(map(str, info["mismatched_keys"])))
    if wrong:
        raise AdapterFileError(f"{folder}/model.safetensors does not fit {names[0]} ({len(wrong)} weights missing, "
                               f"unexpected or misshapen: {wrong[0]}, …): save the folder again with "
                               "HeartLoRACallback")
    return model.eval()


def load_adapter(backbone: nn.Module | str | os.PathLike, path: str | os.PathLike | None = None,
                 check_fingerprint: bool = True, *, verify: bool = True, fingerprint: str | None = None,
                 contents: AdapterContents | None = None) -> nn.Module:
    """Attach the file's adapter to ``backbone`` (a fresh one, built as the file's ``backbone`` spec says), switch
    off its heads, load its weights and classifier. Refuses a file for another backbone or configuration; the file
    is checked completely before anything is attached. ``path`` may be a run folder (its adapter.safetensors).

    ``load_adapter(DIR)``, with no backbone: DIR is a folder a transformers Trainer saved with
    ``HeartLoRACallback``; the backbone is the transformers model of its config.json and model.safetensors.

    For many files on one backbone (an AdapterBank): ``fingerprint`` is the backbone's fingerprint (its classifier
    skipped) computed once, and ``verify=False`` skips attach's live-adapter probe once it has passed for the same
    configuration on this backbone; ``contents``: what :func:`read_adapter` read from ``path`` (not read again)."""
    built_from = None  # the Trainer folder whose config.json built the backbone
    if path is None:
        if isinstance(backbone, nn.Module):
            raise ConfigError("load_adapter(model) needs the adapter's path: load_adapter(model, path)")
        path = built_from = Path(backbone)
        backbone = _transformers_backbone(built_from)
    path = adapter_file(path)
    meta, tensors, cfg = contents if contents is not None else _read(path)
    if built_from is not None:
        _check_transformers_config(meta, built_from)
    cfg.modules_to_save = tuple(meta["modules_to_save"])
    if is_adapted(backbone):
        raise ConfigError("this backbone already has heartlora adapters: load the file into a fresh backbone")
    spec = getattr(backbone, "spec", None)
    want = meta["backbone"]
    if check_fingerprint:
        fp = fingerprint = fingerprint or backbone_fingerprint(backbone, skip=cfg.modules_to_save)
        if fp != meta["fingerprint"]:
            run = (meta.get("extra") or {}).get(RUN_KEY) or {}
            random = (f"; it was trained on random weights: build the backbone after torch.manual_seed("
                      f"{run['init_seed']})" if run.get("pretrained") is False and "init_seed" in run else "")
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in backbone.parameters()
                             if p.is_floating_point()} - {"float32"})
            if dtypes:
                random += (f"; this backbone's weights are {', '.join(dtypes)} and the fingerprint covers dtypes: "
                           "load onto the float32 backbone, then cast")
            raise AdapterFileError(
                f"{path} was trained on a backbone with other weights or shapes (fingerprint "
                f"{meta['fingerprint'][:12]}, this one {fp[:12]}): load the same pretrained backbone "
                f"({want['name']!r}, same img_size and num_classes), or pass check_fingerprint=False{random}")
        _check_input_norm(meta, backbone, path)
    elif isinstance(spec, dict) and spec.get("name") != want["name"]:
        # Without the fingerprint the name is all there is to go on (with it, equal weights may come by any name).
        raise AdapterFileError(f"{path} was trained on backbone {want['name']!r}, not {spec.get('name')!r}: "
                               f"build that backbone (create_backbone(**info['backbone']))")
    root = getattr(backbone, "module", backbone)
    modules = dict(root.named_modules())
    absent = [n for n in cfg.modules_to_save if n not in modules]
    if absent:
        raise AdapterFileError(f"{path} stores modules {absent} this backbone does not have: use the backbone it "
                               f"was trained on ({want['name']!r})")
    grads = [(p, p.requires_grad) for p in backbone.parameters()]
    saved = {name: {k: v.detach().clone() for k, v in modules[name].state_dict().items()}
             for name in cfg.modules_to_save}
    # attach draws the factors' random init, which the file's weights replace: from a fork, so that loading leaves
    # the caller's random stream (CPU and the backbone's GPUs) as it was
    gpus = sorted({p.device.index or 0 for p in backbone.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=gpus):
        model = attach(backbone, cfg, verify=verify, fingerprint=fingerprint)
    try:
        _fill(model, path, meta, tensors, cfg, modules)
    except BaseException:
        # A refused file leaves the backbone as it came: no adapters, its requires_grad flags and classifier back.
        remove_adapters(model)
        for p, flag in grads:
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, sd in saved.items():
                modules[name].load_state_dict(sd)
        raise
    # attach's probe forward, run inside a caller's autocast block, leaves half-precision copies of the weights in
    # autocast's cache, which the in-place loads above do not refresh: that block would run the unloaded adapter
    torch.clear_autocast_cache()
    return model


def restore_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a file's head masks, factors and saved modules into ``model``, which already carries adapters of the
    file's configuration on the file's backbone (a resumed run, or a run going back to its best checkpoint): heads
    the file has off are switched off (without an optimizer: the caller moves its Parameters), the weights copied.
    Returns the file's metadata."""
    path = adapter_file(path)
    meta, tensors, cfg = _read(path)
    state = attach_state(model)
    ours, theirs = state.config.to_dict(), cfg.to_dict()
    for d in (ours, theirs):
        d.pop("modules_to_save", None)
    if ours != theirs or meta["fingerprint"] != state.fingerprint:
        raise AdapterFileError(f"{path} was saved for another backbone or adapter configuration than this model "
                               "has: resume with the model and HeartLoRAConfig the run was started with")
    cfg.modules_to_save = tuple(meta["modules_to_save"])
    root = getattr(model, "module", model)
    _fill(model, path, meta, tensors, cfg, dict(root.named_modules()))
    return meta


def _fill(model: nn.Module, path: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: HeartLoRAConfig,
          modules: dict[str, nn.Module]) -> None:
    """The part of :func:`load_adapter` after attach: check the layers, switch heads off, load factors and
    modules."""
    want = meta["backbone"]
    layers = {a.name: a for a in attention_layers(model)}
    stored = {s["name"]: s for s in meta["layers"]}
    if set(layers) != set(stored) or any((layers[n].num_heads, layers[n].head_dim)
                                         != (stored[n]["num_heads"], stored[n]["head_dim"]) for n in layers):
        raise AdapterFileError(f"{path} describes other attention layers than this backbone has: "
                               f"use the backbone it was trained on ({want['name']!r})")
    now = {n: layer.head_mask() for n, layer in layers.items()}
    if any(not on and stored[n]["head_mask"][h] for n, mask in now.items() for h, on in enumerate(mask)):
        raise AdapterFileError(f"{path} has heads on that this model has switched off: load it into a model with "
                               "every head on, or one with the file's heads off")
    off = [(n, h) for n, s in stored.items() for h, on in enumerate(s["head_mask"]) if not on and now[n][h]]
    if off:
        deactivate_heads(model, heads=off)
    with torch.no_grad():
        for layer in layers.values():
            for target, proj in layer.projections.items():
                if not proj.active_heads():
                    continue
                stats = {}
                for factor in ("A", "B"):
                    key = f"adapter.{layer.name}.{target}.{factor}"
                    w = _decode(key, meta["shapes"][key], cfg.bits, tensors)
                    _assign(proj, factor, w, path)
                    if cfg.bits != FLOAT_BITS:
                        stats[factor] = tensors[f"{key}.stats"]
                proj.mark_decoded(stats or None)
        for name in cfg.modules_to_save:
            sd = {k[len(f"modules.{name}."):]: v for k, v in tensors.items() if k.startswith(f"modules.{name}.")}
            try:
                modules[name].load_state_dict(sd, strict=True)
            except (RuntimeError, KeyError) as e:
                raise AdapterFileError(f"{path}: module {name!r} does not fit this backbone ({str(e).splitlines()[0]});"
                                       f" build the backbone with the file's num_classes and pool") from None


def _assign(proj: HeadLoRAProjection, factor: str, w: torch.Tensor, path: Any) -> None:
    dst = proj.lora_A if factor == "A" else proj.lora_B
    if dst.shape != w.shape:
        raise AdapterFileError(f"{path}: {proj.layer_name}.{proj.target}.{factor} has shape {tuple(w.shape)}, "
                               f"expected {tuple(dst.shape)} for {len(proj.active_heads())} active heads (another "
                               f"rank or backbone, or a file inconsistent with its own head masks)")
    dst.copy_(w)
