"""`ImageClassifier`: a backbone, its own input normalisation, a pooling rule and a linear head."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError

POOLS = ("cls", "cls+mean", "own")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """Images in [0, 1] → normalise → backbone → pool → ``head`` → logits.

    Subclasses (one per backbone family) implement `encode`. ``pool="cls"`` feeds the head the class token;
    ``pool="cls+mean"`` the class token concatenated with the mean of the patch tokens (twice the width);
    ``pool="own"`` (families that set ``OWN_POOL``: timm's) the model's own pre-logits feature, e.g. BEiT's and
    EVA-02's mean patch token after their ``fc_norm``.
    """

    OWN_POOL = False  # whether encode() gives the model's own pooled feature under pool="own"

    def __init__(self, backbone: nn.Module, *, num_features: int, spec: dict[str, Any],
                 mean: Sequence[float], std: Sequence[float], has_patch_tokens: bool = True) -> None:
        super().__init__()
        pool = spec["pool"]
        if pool not in POOLS:
            raise ConfigError(f"unknown pool {pool!r}: use one of {', '.join(POOLS)}")
        if pool == "own" and not self.OWN_POOL:
            raise ConfigError(f"pool='own' reads a timm model's own pre-logits feature, which {spec['name']!r} does "
                              "not have: use pool='cls' or 'cls+mean'")
        if pool == "cls+mean" and not has_patch_tokens:
            raise ConfigError(f"pool='cls+mean' needs a class token and patch tokens, which {spec['name']!r} "
                              "does not have: use pool='cls' (the model's own pooling)")
        self.backbone = backbone
        self.num_features = int(num_features)
        self.img_size = int(spec["img_size"])
        self.pool = pool
        self._spec = dict(spec)
        # Not persistent: they follow from the spec, so checkpoints and fingerprints hold weights only.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Linear(self.num_features * (2 if pool == "cls+mean" else 1), int(spec["num_classes"]))

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this architecture: ``create_backbone(**model.spec)``."""
        return dict(self._spec)

    def get_classifier(self) -> nn.Linear:
        """The linear head (timm's name for it)."""
        return self.head

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised images → (class token or the model's own pooled feature (B, D), patch tokens (B, N, D) or
        None when the model has none)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, 3, S, S) → pooled features, shape (B, head.in_features)."""
        if x.ndim != 4 or not x.is_floating_point():  # dtype and rank only: no host sync
            raise ConfigError(f"images must be a float tensor (batch, 3, height, width) in [0, 1], got {x.dtype} of "
                              f"shape {tuple(x.shape)}" + (" (uint8 images: x.float() / 255)"
                                                          if not x.is_floating_point() else ""))
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        cls, patches = self.encode(x)
        if self.pool != "cls+mean":  # cls, or own: encode gave the model's own feature
            return cls
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, 3, S, S) → logits (B, num_classes)."""
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        return f"name={self._spec['name']!r}, img_size={self.img_size}, pool={self.pool!r}"
