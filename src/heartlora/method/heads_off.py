"""The heads-off rule, in one place: how many attention heads are switched off after the scoring.

Three forms: a count (``ne``), a share of the heads (``ne_fraction``), or ``"auto"``: the count is chosen at the end
of the scoring on sampled training images (``heartlora.method.auto_ne``; ``ne_tolerance`` and ``ne_refine`` tune
it). ``parse_heads_off`` parses and checks the four settings; it is what ``heartlora train`` (``TrainConfig``'s
``resolve``), ``heartlora prune`` (``prune_peft``), ``HeartLoRACallback`` and ``score_and_prune`` call.
``check_count`` checks a count against a model's heads; ``switch_off`` is the one path from a rule and the scores to
the heads switched off. Errors are ``SettingError``\\ s: they name the Python setting, or the flag in the CLI.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heartlora.errors import SettingError
from heartlora.method.auto_ne import DEFAULT_TOLERANCE, NeChoice, choose_ne
from heartlora.method.deactivate import deactivate_heads, ne_limit

AUTO = "auto"
DEFAULT_REFINE = True  # ne auto tries the share halfway between the first that fails and the last that passed
# Without a count or a share, the count is chosen on data: the paper tunes ne per task on validation data, which a
# user running defaults does not do (a fixed share of 1/6 of the heads was the default before).
DEFAULT_NE = AUTO
# The command line's flags whose name is not --<setting> (the others are "--" + the name with dashes).
FLAGS = {"ne_refine": "--no-ne-refine"}


@dataclass(frozen=True)
class HeadsOff:
    """A checked heads-off rule: ``ne`` a count or ``"auto"`` (then ``fraction`` is None), or ``fraction`` a share
    (then ``ne`` is None). ``tolerance`` and ``refine`` are set for ``"auto"`` only."""

    ne: int | str | None
    fraction: float | None = None
    tolerance: float | None = None
    refine: bool | None = None

    @property
    def auto(self) -> bool:
        """Whether the count is chosen by ``choose_ne`` (``ne="auto"``)."""
        return self.ne == AUTO


def _error(template: str, names: Mapping[str, str] | None) -> SettingError:
    return SettingError(template, names=names, flags=FLAGS)


def parse_ne(value: Any, names: Mapping[str, str] | None = None) -> int | str | None:
    """``ne`` as given (an int, or a string from the command line or a file): None, ``"auto"`` or a count >= 0."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        count = int(value)
    elif isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    else:
        try:
            count = int(value.strip()) if isinstance(value, str) else None
        except ValueError:
            count = None
        if count is None:
            raise _error(f"{{ne}} {value!r} is neither a number of attention heads nor auto", names)
    if count < 0:
        raise _error(f"{{ne}} {count} must be 0 or more (a number of attention heads)", names)
    return count


def parse_heads_off(ne: Any = None, fraction: Any = None, tolerance: Any = None, refine: Any = None, *,
                    default: str | None = DEFAULT_NE, names: Mapping[str, str] | None = None) -> HeadsOff:
    """The rule ``ne`` / ``ne_fraction`` / ``ne_tolerance`` / ``ne_refine`` describe, checked; the defaults filled
    in (``default`` when neither a count nor a share is given: ``"auto"``, or None to require one of them).
    ``names``: the caller's own names of the settings (``{"ne_fraction": "fraction"}``), for its error messages."""
    count = parse_ne(ne, names)
    if fraction is not None:
        if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not math.isfinite(fraction)
                or not 0.0 <= fraction <= 1.0):
            raise _error(f"{{ne_fraction}} {fraction!r} must be a share of the attention heads between 0 and 1",
                         names)
        fraction = float(fraction)
    if count is not None and fraction is not None:
        raise _error("give {ne} (a number of heads, or auto) or {ne_fraction} (a share of heads), not both", names)
    if count is None and fraction is None:
        if default is None:
            raise _error("give {ne} (a number of heads, or auto) or {ne_fraction} (a share of heads)", names)
        count = parse_ne(default)
    if count != AUTO:
        for key, value in (("ne_tolerance", tolerance), ("ne_refine", refine)):
            if value is not None:
                raise _error(f"{{{key}}} applies to {{ne}} auto only (the heads off here are a fixed "
                             f"{'count' if fraction is None else 'share'}): leave it out, or choose {{ne}} auto",
                             names)
        return HeadsOff(ne=count, fraction=fraction)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE
    if (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance)
            or tolerance < 0):
        raise _error(f"{{ne_tolerance}} {tolerance!r} must be a number >= 0 (the relative loss increase a share of "
                     "heads may cost)", names)
    return HeadsOff(ne=AUTO, tolerance=float(tolerance), refine=DEFAULT_REFINE if refine is None else bool(refine))


def check_count(ne: Any, heads_per_layer: list[int], scope: str, model: str = "the model's",
                names: Mapping[str, str] | None = None) -> None:
    """Refuse a count above what a model with these head counts has (all its heads, or its smallest layer's with
    ``scope="layer"``) before any time is spent; ``"auto"``, a share and None pass."""
    if not isinstance(ne, int) or isinstance(ne, bool):
        return
    limit = ne_limit(heads_per_layer, scope)
    if ne > limit:
        where = f"{limit} attention heads" if scope == "global" else f"{limit} heads in its smallest layer"
        per = "" if scope == "global" else " per layer"
        raise _error(f"{{ne}} {ne} is more than {model} {where}: choose {{ne}} <= {limit}{per} (or {{ne_fraction}})",
                     names)


def switch_off(model: nn.Module, scores: dict[str, torch.Tensor], rule: HeadsOff, scope: str = "global",
               optimizer: torch.optim.Optimizer | None = None,
               heldout: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
               forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
               names: Mapping[str, str] | None = None) -> tuple[list[tuple[str, int]], NeChoice | None]:
    """Switch off the heads ``rule`` asks for; returns them and, for ``"auto"``, the choice with its evidence.
    ``"auto"`` chooses a share of the heads on ``heldout`` (batches of sampled training images, as ``choose_ne``
    takes them) and switches that share off; a count or a share is switched off as it is. ``optimizer``: as
    ``deactivate_heads`` takes it."""
    if not rule.auto:
        return deactivate_heads(model, scores, ne=rule.ne, fraction=rule.fraction, scope=scope,
                                optimizer=optimizer), None
    if heldout is None:
        raise _error("{ne} auto chooses on sampled training images, and none were given: pass them, or give a "
                     "number with {ne}", names)
    choice = choose_ne(model, scores, heldout, scope=scope, tolerance=rule.tolerance, refine=bool(rule.refine),
                       forward=forward)
    return deactivate_heads(model, scores, fraction=choice.fraction, scope=scope, optimizer=optimizer), choice
