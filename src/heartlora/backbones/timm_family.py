"""timm models (ViT, DeiT, EVA, Swin, …) by their timm name."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedBackboneError
from .classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

TIMM_PREFIX = "timm:"


class TimmClassifier(ImageClassifier):
    """An `ImageClassifier` over a timm model built with ``num_classes=0``.

    Models with a class token give it and their patch tokens; the others (Swin, ConvNets, GAP ViTs) give timm's
    own pooled feature, so only ``pool="cls"`` applies to them. ``pool="own"``: timm's own pre-logits feature
    (``forward_head(pre_logits=True)``) for every model, what ``pool="auto"`` picks where a class token is not the
    model's readout and reaches the head un-normalised (BEiT, EVA-02: mean patch token, then ``fc_norm``).
    """

    OWN_POOL = True

    def __init__(self, backbone: nn.Module, *, spec: dict[str, Any]) -> None:
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        has_cls = has_class_token(backbone)
        super().__init__(backbone, num_features=backbone.num_features, spec=spec,
                         mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                         has_patch_tokens=has_cls)
        self._has_cls = has_cls
        self._num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone.forward_features(x)
        if self._has_cls and feats.ndim == 3 and self.pool != "own":
            return feats[:, 0], feats[:, self._num_prefix_tokens:]
        return self.backbone.forward_head(feats, pre_logits=True), None


def has_class_token(backbone: nn.Module) -> bool:
    return getattr(backbone, "cls_token", None) is not None and getattr(backbone, "num_prefix_tokens", 0) > 0


def reads_own_pool(backbone: nn.Module) -> bool:
    """Whether the model's readout is not its class token and normalises after pooling (``fc_norm``), so its class
    token leaves ``forward_features`` un-normalised (BEiT, BEiT v2, EVA-02 pool by average): there ``pool="auto"``
    feeds the head the model's own feature, as its classifier does."""
    fc_norm = getattr(backbone, "fc_norm", None)
    return (has_class_token(backbone) and getattr(backbone, "global_pool", "token") not in ("token", "")
            and isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity))


@functools.lru_cache(maxsize=64)
def timm_reads_own_pool(name: str) -> bool:
    """`reads_own_pool` of timm model ``name``, built without weights (no download): on the meta device, or on the
    CPU where the model's initialisation reads a value (older timm's EVA calls ``.item()``)."""
    import timm

    model_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                return reads_own_pool(timm.create_model(model_name, pretrained=False, num_classes=0))
        except Exception:  # noqa: BLE001 - not buildable here: create_timm says why, with its own message
            continue
    return False


def is_timm_name(name: str) -> bool:
    """True when timm knows ``name`` (with or without a ``.pretrained_tag``), or it has the ``timm:`` prefix."""
    if name.startswith(TIMM_PREFIX):
        return True
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def _native_size(name: str) -> int | None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None


def create_timm(name: str, num_classes: int, img_size: int | None, pretrained: bool, pool: str,
                drop_path: float) -> TimmClassifier:
    """Build a `TimmClassifier`; a non-native ``img_size`` goes to timm, which resamples position embeddings."""
    try:
        import timm
    except ImportError as e:
        raise UnsupportedBackboneError(f"timm backbone {name!r} needs timm: pip install timm") from e
    model_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if not timm.is_model(model_name):
        raise UnsupportedBackboneError(f"timm has no model {model_name!r}: see timm.list_models('*vit*')")
    kwargs: dict[str, Any] = {}
    native = _native_size(model_name)
    if img_size is not None and img_size != native:
        kwargs["img_size"] = int(img_size)
    if drop_path:  # only when asked: some timm constructors take no drop_path_rate at all
        kwargs["drop_path_rate"] = float(drop_path)
    try:
        try:
            backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            # Convolutional models take any input size and have no img_size argument.
            kwargs.pop("img_size")
            backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        raise ConfigError(f"timm model {model_name!r} has no stochastic depth: use drop_path=0") from None
    except OSError as e:  # the hub could not be reached or has no weights for this name
        raise UnsupportedBackboneError(f"cannot download timm weights for {model_name!r} "
                                       f"({str(e).splitlines()[0]}): go online, or pass pretrained=False") from e
    resolved = img_size or native or int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    spec = {"name": name, "num_classes": int(num_classes), "img_size": int(resolved), "pool": pool,
            "drop_path": float(drop_path)}
    return TimmClassifier(backbone, spec=spec)
