"""Hugging Face vision encoders (ViT, DeiT, DINOv2, …) through transformers' AutoModel."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedBackboneError
from .classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

HF_PREFIX = "hf:"


class HFClassifier(ImageClassifier):
    """An `ImageClassifier` over a transformers model whose ``last_hidden_state`` has the class token at index 0."""

    def __init__(self, backbone: nn.Module, *, spec: dict[str, Any], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        config = backbone.config
        embeddings = getattr(backbone, "embeddings", None)
        has_cls = embeddings is not None and (hasattr(embeddings, "cls_token") or
                                              hasattr(embeddings, "class_embedding"))
        super().__init__(backbone, num_features=config.hidden_size, spec=spec, mean=mean, std=std,
                         has_patch_tokens=has_cls)
        self._has_cls = has_cls
        # Class token, then DeiT's distillation token and any register tokens, then the patches.
        self._num_prefix_tokens = (1 + int(hasattr(embeddings, "distillation_token"))
                                   + int(getattr(config, "num_register_tokens", 0) or 0))
        if has_cls and getattr(backbone, "pooler", None) is not None:
            # The class token is read directly; an unused pooler would only break DDP on full fine-tuning.
            backbone.pooler = None
        # ViT-style models interpolate position embeddings only when asked; DINOv2 always does it itself.
        params = inspect.signature(backbone.forward).parameters
        self._forward_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.backbone(pixel_values=x, **self._forward_kwargs)
        if not self._has_cls:
            if getattr(out, "pooler_output", None) is None:
                raise UnsupportedBackboneError(f"{self._spec['name']!r} has neither a class token nor a pooled "
                                               "output: use a ViT-style model")
            return out.pooler_output.flatten(1), None
        tokens = out.last_hidden_state
        return tokens[:, 0], tokens[:, self._num_prefix_tokens:]


def is_hf_reference(name: str) -> bool:
    """True for ``hf:<hub id or dir>`` and for a local directory holding a config.json."""
    return name.startswith(HF_PREFIX) or (Path(name).is_dir() and (Path(name) / "config.json").is_file())


def _native_size(config: Any) -> int:
    size = getattr(config, "image_size", 224)
    return int(size[-1] if isinstance(size, (list, tuple)) else size)


def _normalisation(ref: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own mean/std from its preprocessor config; ImageNet's when it ships none."""
    local = Path(ref) / "preprocessor_config.json"
    try:
        if local.is_file():
            cfg = json.loads(local.read_text())
        else:
            from transformers.utils import cached_file

            path = cached_file(ref, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
            cfg = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        cfg = {}
    mean, std = cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:  # single-channel processors: broadcast to RGB
        mean, std = (mean[0],) * 3, (std[0],) * 3
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def create_hf(name: str, num_classes: int, img_size: int | None, pretrained: bool, pool: str,
              drop_path: float) -> HFClassifier:
    """Build an `HFClassifier` from ``hf:<hub id or dir>`` or a local directory with config.json."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as e:
        raise UnsupportedBackboneError(f"Hugging Face backbone {name!r} needs transformers: "
                                       "pip install transformers") from e
    ref = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise UnsupportedBackboneError(f"cannot read the Hugging Face config of {ref!r} "
                                       f"({str(e).splitlines()[0]}): check the hub id or directory") from e
    kind = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "vision_config", None) is not None:  # CLIP, SigLIP and others: image and text towers
        config = config.vision_config  # AutoModel then builds the image tower and loads only its weights
    if not hasattr(config, "hidden_size"):
        raise UnsupportedBackboneError(f"{ref!r} is a {kind} model with no transformer hidden size (a "
                                       "convolutional network?): heartlora adapts the attention of a ViT-style "
                                       "encoder")
    if drop_path:
        if not hasattr(config, "drop_path_rate"):
            raise ConfigError(f"{config.model_type} models have no stochastic depth: use drop_path=0")
        config.drop_path_rate = float(drop_path)
    try:
        if pretrained:
            backbone = AutoModel.from_pretrained(ref, config=config)
        else:
            backbone = AutoModel.from_config(config)
    except (OSError, ValueError) as e:
        raise UnsupportedBackboneError(f"cannot load Hugging Face weights for {ref!r} ({str(e).splitlines()[0]}): "
                                       "check the name and network, or pass pretrained=False") from e
    if "pixel_values" not in inspect.signature(backbone.forward).parameters:
        raise UnsupportedBackboneError(f"{ref!r} is a {kind} model, which takes no images (its forward has no "
                                       "pixel_values): use an image encoder")
    mean, std = _normalisation(ref)
    spec = {"name": name, "num_classes": int(num_classes), "img_size": int(img_size or _native_size(config)),
            "pool": pool, "drop_path": float(drop_path)}
    return HFClassifier(backbone, spec=spec, mean=mean, std=std)
