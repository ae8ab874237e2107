"""The adapter configuration: what is adapted, how, and which modules stay trainable."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from heartlora.errors import ConfigError

TARGETS = ("q", "k", "v", "o")
FLOAT_BITS = 32


@dataclass
class HeartLoRAConfig:
    """LoRA on attention projections, organised by head (SPEC §1, §4).

    The delta of projection P is ``scale · B_P A_P``. Head h owns output rows [h·d, (h+1)·d) of B for q, k, v and
    input columns [h·d, (h+1)·d) of A for o.
    """

    targets: tuple[str, ...] = field(default=("q", "v"), metadata={"help": "projections to adapt, from q, k, v, o"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    scale: float = field(default=1.0, metadata={"help": "fixed scale s of the delta s·B·A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    bits: int = field(default=32, metadata={"help": "32 = float adapters; 1..8 = k-bit quantized (Bi-LoRA)"})
    init_b_std: float | None = field(
        default=None,
        metadata={"help": "std of B's truncated-normal init; None: zeros for float, 0.001 for quantized adapters "
                          "(standardising an all-zero matrix is undefined)"},
    )
    modules_to_save: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "module names kept trainable and stored with the adapter; None finds the classifier"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in self.targets.replace(",", " ").split() if t)
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"targets {list(self.targets)} are not valid: choose a non-empty subset of q, k, v, o")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets {list(self.targets)} repeat a projection: name each of q, k, v, o once")
        self.targets = tuple(t for t in TARGETS if t in self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise ConfigError(f"rank {self.rank!r} must be a positive integer")
        self.rank = int(self.rank)
        if (isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale)
                or self.scale <= 0):
            raise ConfigError(f"scale {self.scale!r} must be a finite number > 0 (the delta is scale * B @ A; 0 would "
                              "make the adapter a no-op)")
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral):
            raise ConfigError(f"bits {self.bits!r} is not supported: use 32 (float) or 1..8 (quantized)")
        if not (1 <= int(self.bits) <= 8 or int(self.bits) == FLOAT_BITS):
            raise ConfigError(f"bits {self.bits} is not supported: use 32 (float) or 1..8 (quantized)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT_BITS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["modules_to_save"] = None if self.modules_to_save is None else list(self.modules_to_save)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeartLoRAConfig":
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown adapter settings {sorted(extra)}: the file was written by a newer heartlora")
        return cls(**d)
