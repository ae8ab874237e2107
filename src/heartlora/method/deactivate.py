"""Switching heads off: the least responsive heads lose their adapter weights (docs/METHOD.md §3)."""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import nn

from heartlora.errors import ConfigError
from heartlora.method.layer import FactorChange
from heartlora.method.model import adapted_wrappers, adapter_parameters, attention_layers

SCOPES = ("global", "layer")


def ne_limit(heads_per_layer: list[int], scope: str) -> int:
    """The largest ne a model with these head counts takes: every head (``global``), or its smallest layer's."""
    return sum(heads_per_layer) if scope == "global" else min(heads_per_layer)


def share_count(fraction: float, heads: int) -> int:
    """How many of ``heads`` a share ``fraction`` switches off (rounded down; 1e-9 absorbs float error, so a share
    of 3/12 is 3)."""
    return int(math.floor(fraction * heads + 1e-9))


def select_heads(scores: dict[str, torch.Tensor], ne: int | None = None, fraction: float | None = None,
                 scope: str = "global", active: dict[str, list[bool]] | None = None) -> list[tuple[str, int]]:
    """The heads to switch off: the ``ne`` least responsive over all layers (``scope="global"``) or in each layer
    (``scope="layer"``); ``fraction`` instead of ``ne`` takes that share of the heads (of all heads, or of each
    layer's, so layers with different head counts work). Ties break by layer order, then head index.
    Heads already off (``active``) are not counted again."""
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is unknown: choose global or layer")
    if (ne is None) == (fraction is None):
        raise ConfigError("give exactly one of ne (a number of heads) or fraction (a share of heads)")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction {fraction} must be between 0 and 1")
    if ne is not None and (isinstance(ne, bool) or not isinstance(ne, Integral)):
        raise ConfigError(f"ne {ne!r} must be a whole number of heads (or use fraction= for a share)")
    if ne is not None and ne < 0:
        raise ConfigError(f"ne {ne} must not be negative")
    order = list(scores)
    groups = [order] if scope == "global" else [[name] for name in order]
    chosen: list[tuple[str, int]] = []
    for group in groups:
        cands = [(float(scores[n][h]), i, h, n) for i, n in enumerate(group) for h in range(len(scores[n]))
                 if active is None or active[n][h]]
        total = sum(len(scores[n]) for n in group)
        k = ne if ne is not None else share_count(fraction, total)
        where = "in all" if scope == "global" else f"in layer {group[0]}, which has"
        if k > len(cands):
            raise ConfigError(f"ne={k} is more than the {len(cands)} active heads {where} {total} heads: "
                              f"choose ne ≤ {len(cands)}" + (" per layer" if scope == "layer" else ""))
        chosen.extend((n, h) for _, _, h, n in sorted(cands)[:k])
    rank = {n: i for i, n in enumerate(order)}
    return sorted(chosen, key=lambda t: (rank[t[0]], t[1]))


def deactivate_heads(model: nn.Module, scores: dict[str, torch.Tensor] | None = None, ne: int | None = None,
                     fraction: float | None = None, scope: str = "global",
                     optimizer: torch.optim.Optimizer | None = None,
                     heads: list[tuple[str, int]] | None = None) -> list[tuple[str, int]]:
    """Switch off the least responsive heads (or exactly ``heads``) and return them as (layer name, head).

    Each projection's per-head factor is rebuilt without their rows, so they get no gradient, hold no state, cost
    no compute and are not stored. ``optimizer``, when given, gets the rebuilt Parameters in place of the old ones,
    with its state (AdamW's moments) carried over for the heads that stay. A projection with no head left drops
    both factors."""
    layers = {layer.name: layer for layer in attention_layers(model)}
    if any(w.merged for w in adapted_wrappers(model, "deactivate_heads")):
        raise ConfigError("deactivate_heads: the adapters are merged into the base weights, which would keep the "
                          "deltas of the heads switched off; call unmerge(model) first")
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = adapter_parameters(model)
        if params and not any(id(p) in held for p in params):
            raise ConfigError(f"deactivate_heads: the {type(optimizer).__name__} given holds none of this model's "
                              "adapter parameters, so the heads that stay would no longer be trained; pass the "
                              "optimizer that trains them, or none and create it after switching heads off")
    if heads is None:
        if scores is None:
            raise ConfigError("give scores (from ResponsivenessTracker.scores()) or an explicit list of heads")
        unknown = set(scores) - set(layers)
        if unknown:
            raise ConfigError(f"scores name layers this model does not have: {sorted(unknown)[:3]}")
        active = {n: layers[n].head_mask() for n in scores}
        heads = select_heads(scores, ne=ne, fraction=fraction, scope=scope, active=active)
    changes: list[FactorChange] = []
    by_layer: dict[str, list[int]] = {}
    for name, h in heads:
        if isinstance(h, bool) or not isinstance(h, Integral):
            raise ConfigError(f"head ({name!r}, {h!r}): the head index must be a whole number")
        if name not in layers or not 0 <= h < layers[name].num_heads:
            raise ConfigError(f"head ({name}, {h}) does not exist in this model")
        by_layer.setdefault(name, []).append(h)
    for name, hs in by_layer.items():
        for proj in layers[name].projections.values():
            changes.extend(proj.remove_heads(hs))
    if optimizer is not None:
        replace_in_optimizer(optimizer, changes)
    return list(heads)


def replace_in_optimizer(optimizer: torch.optim.Optimizer, changes: list[FactorChange]) -> None:
    """Put each rebuilt Parameter where the old one was in ``optimizer``'s groups and carry its state over: every
    state tensor shaped like the old Parameter keeps the slices that stayed; scalar entries (AdamW's step) are kept
    as they are. A dropped Parameter leaves the groups and the state. Optimizers whose state is shaped otherwise
    (Adafactor's factored moments, blockwise 8-bit states) are refused, the optimizer left as it was."""
    for c in changes:
        state = optimizer.state.get(c.old)
        odd = [k for k, v in (state or {}).items()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != c.old.shape]
        if odd and c.new is not None:
            raise ConfigError(f"{type(optimizer).__name__} keeps state {odd} not shaped like its parameters, which "
                              "cannot follow the heads that stay: use Adam, AdamW or SGD, or switch heads off before "
                              "creating the optimizer")
    by_old = {id(c.old): c for c in changes}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            c = by_old.get(id(p))
            if c is None:
                params.append(p)
            elif c.new is not None:
                params.append(c.new)
        group["params"] = params
    for c in changes:
        state = optimizer.state.pop(c.old, None)
        if state is None or c.new is None:
            continue
        optimizer.state[c.new] = {k: v.index_select(c.dim, c.keep.to(v.device))
                                  if isinstance(v, torch.Tensor) and v.shape == c.old.shape else v
                                  for k, v in state.items()}
