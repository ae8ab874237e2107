"""Head responsiveness: the first-order Taylor estimate of the loss change when a head's adapter is removed
(docs/METHOD.md §2), accumulated after each backward() from the weights each head owns. No extra forward or
backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from heartlora.errors import ConfigError
from heartlora.method.model import attention_layers

MODES = ("abs_sum", "sum_abs", "random")


class ResponsivenessTracker:
    """Accumulates ``R[l, h]`` over training steps.

    ``abs_sum`` (default): ``R = Σ_t |Σ_θ θ_t·g_t|`` over the weights θ head h of layer l owns (its B rows for q, k,
    v; its A columns for o). ``sum_abs``: ``Σ_t Σ_θ |θ_t·g_t|``. ``ema=β`` replaces the running sum with an
    exponential moving average ``R ← β R + (1 - β) r_t``. ``random``: a control, not a method: every head gets a
    uniform random score drawn from ``seed`` (the same on every rank, whatever the training did), so that switching
    off a random set of heads can be compared with switching off the least responsive ones at the same count.

    Call :meth:`update` after ``loss.backward()`` and before ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, mode: str = "abs_sum", ema: float | None = None, seed: int = 0) -> None:
        if mode not in MODES:
            raise ConfigError(f"responsiveness mode {mode!r} is unknown: choose one of {', '.join(MODES)}")
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ConfigError(f"ema {ema} must be in [0, 1)")
        self.model, self.mode, self.ema, self.seed = model, mode, ema, int(seed)
        self.layers = attention_layers(model)
        # The device of any adapter factor: a layer whose heads are all off has none (and may come first).
        factors = (p for layer in self.layers for proj in layer.projections.values() for p in proj.parameters())
        first = next(factors, None)
        if first is None:
            first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        self._acc = [torch.zeros(layer.num_heads, dtype=torch.float64, device=device) for layer in self.layers]
        self.steps = 0

    @torch.no_grad()
    def step_scores(self) -> list[torch.Tensor]:
        """This step's per-head terms (before accumulation), one tensor per layer."""
        out = []
        for layer, acc in zip(self.layers, self._acc):
            absolute = self.mode == "sum_abs"
            r = sum(p.head_products(absolute).to(acc.device) for p in layer.projections.values())
            if not absolute:
                r = r.abs()
            # a step whose gradients overflowed (fp16 loss scaling skips it) adds nothing; no host sync
            out.append(torch.where(torch.isfinite(r), r, torch.zeros_like(r)).double())
        return out

    @torch.no_grad()
    def update(self) -> None:
        """Add this step's per-head scores (call after backward, before the optimizer clears the gradients)."""
        if self.mode == "random":  # the ranking is drawn in scores(); only the steps are counted
            self.steps += 1
            return
        for acc, r in zip(self._acc, self.step_scores()):
            if self.ema is None:
                acc.add_(r)
            elif self.steps == 0:
                acc.copy_(r)
            else:
                acc.mul_(self.ema).add_(r, alpha=1.0 - self.ema)
        self.steps += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """Layer name → per-head score (float64, CPU). Under torch.distributed the ranks' scores are averaged, so
        every rank ranks the heads the same way."""
        flat = torch.cat(self._acc)
        if self.mode == "random":  # own generator: the training's random state is not touched; no rank averages
            flat = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.clone()
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        parts = flat.cpu().split([a.numel() for a in self._acc])
        return {layer.name: p.clone() for layer, p in zip(self.layers, parts)}

    def state_dict(self) -> dict[str, Any]:
        """Mode, EMA, steps, seed and the scores so far, to resume a warmup."""
        return {"mode": self.mode, "ema": self.ema, "steps": self.steps, "seed": self.seed,
                "scores": [a.detach().cpu().clone() for a in self._acc]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output; another model's (other layer count) is refused."""
        if len(state["scores"]) != len(self._acc):
            raise ConfigError("tracker state has a different number of layers than this model")
        self.mode, self.ema, self.steps = state["mode"], state["ema"], int(state["steps"])
        self.seed = int(state.get("seed", self.seed))  # checkpoints before the random control had none
        for acc, s in zip(self._acc, state["scores"]):
            acc.copy_(s.to(acc.device))
