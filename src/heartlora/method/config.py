"""The adapter configuration: what is adapted, how, and which modules stay trainable."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from heartlora.errors import ConfigError, SettingError

TARGETS = ("q", "k", "v", "o")
FLOAT_BITS = 32
# The scale s of the delta s·B·A when none is given: the best of {1, 4, 16} on val200 of the visible tasks, 4 for
# float and k-bit adapters and 16 for 1-bit ones (docs/research/sweeps/defaults.md). Files store the scale they were
# trained with (adapters saved before these defaults hold 1.0), so a default never changes a saved adapter.
DEFAULT_SCALE = 4.0
ONE_BIT_SCALE = 16.0


def default_scale(bits: int) -> float:
    """The scale an adapter of ``bits`` gets when none is given."""
    return ONE_BIT_SCALE if bits == 1 else DEFAULT_SCALE


@dataclass
class HeartLoRAConfig:
    """LoRA on attention projections, organised by head (docs/METHOD.md §1, §4).

    The delta of projection P is ``scale · B_P A_P``. Head h owns output rows [h·d, (h+1)·d) of B for q, k, v and
    input columns [h·d, (h+1)·d) of A for o. The one source of the adapter's defaults: ``HeartLoRAConfig()`` is the
    adapter ``heartlora train`` attaches (``TrainConfig`` fills its adapter settings from here).
    """

    targets: tuple[str, ...] = field(default=("q", "v"), metadata={"help": "projections to adapt, from q, k, v, o"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    scale: float | None = field(
        default=None,
        metadata={"help": "fixed scale s of the delta s·B·A (chosen on val200, docs/research/sweeps/defaults.md)",
                  "default_text": f"{DEFAULT_SCALE:g}; {ONE_BIT_SCALE:g} for 1-bit adapters"},
    )
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
            raise SettingError(f"{{targets}} {list(self.targets)} are not valid: choose a non-empty subset of q, k, "
                               "v, o")
        if len(set(self.targets)) != len(self.targets):
            raise SettingError(f"{{targets}} {list(self.targets)} repeat a projection: name each of q, k, v, o once")
        self.targets = tuple(t for t in TARGETS if t in self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise SettingError(f"{{rank}} {self.rank!r} must be a positive integer")
        self.rank = int(self.rank)
        if (isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral)
                or not (1 <= int(self.bits) <= 8 or int(self.bits) == FLOAT_BITS)):
            raise SettingError(f"{{bits}} {self.bits!r} is not supported: use 32 (float) or 1..8 (quantized)")
        if self.scale is None:  # the default follows the bits, as heartlora train's does
            self.scale = default_scale(int(self.bits))
        if (isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale)
                or self.scale <= 0):
            raise SettingError(f"{{scale}} {self.scale!r} must be a finite number > 0 (the delta is scale * B @ A; 0 "
                               "would make the adapter a no-op)")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0.0 <= float(self.dropout) < 1.0):
            raise SettingError(f"{{dropout}} {self.dropout!r} must be in [0, 1)")
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)

    @property
    def quantized(self) -> bool:
        """Whether the adapters are stored and trained at ``bits`` < 32 (Bi-LoRA: 1)."""
        return self.bits != FLOAT_BITS

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings, as an adapter file's header stores them."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["modules_to_save"] = None if self.modules_to_save is None else list(self.modules_to_save)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeartLoRAConfig":
        """The settings a file stored; a key this version does not know, or a missing scale, is refused in one
        line."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown adapter settings {sorted(extra)}: the file was written by a newer heartlora")
        if d.get("scale") is None:  # every writer stores it: never let today's default stand in for a file's scale
            raise ConfigError("the adapter settings hold no scale, which every adapter file stores; the file is "
                              "damaged: save the adapter again")
        return cls(**d)
