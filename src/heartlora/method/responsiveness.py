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
        self._kept = torch.zeros((), dtype=torch.int64, device=device)  # steps that added (an EMA's first is copied)

    @torch.no_grad()
    def step_scores(self) -> list[torch.Tensor]:
        """This step's per-head terms (before accumulation), one tensor per layer; not finite where the gradients
        overflowed."""
        out = []
        for layer, acc in zip(self.layers, self._acc):
            absolute = self.mode == "sum_abs"
            r = sum(p.head_products(absolute).to(acc.device) for p in layer.projections.values())
            if not absolute:
                r = r.abs()
            out.append(r.double())
        return out

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """Add this step's per-head scores (call after backward, before the optimizer clears the gradients).

        A step with any non-finite term, or ``skipped`` true (the fp16 gradient scaler's found-inf: it skips the
        optimizer step), adds nothing and leaves an EMA as it was: all or nothing for the whole step, decided on the
        device with no host sync."""
        if self.mode == "random":  # the ranking is drawn in scores(); only the steps are counted
            self.steps += 1
            return
        terms = self.step_scores()
        bad = ~torch.isfinite(torch.cat(terms)).all()
        if skipped is not None:
            bad = bad | torch.as_tensor(skipped, device=bad.device).bool().reshape(())
        for acc, r in zip(self._acc, terms):
            if self.ema is None:
                acc.add_(torch.where(bad, torch.zeros_like(r), r))
            else:
                new = torch.where(self._kept == 0, r, acc.mul(self.ema).add(r, alpha=1.0 - self.ema))
                acc.copy_(torch.where(bad, acc, new))
        self._kept += (~bad).long()
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
                "scores": [a.detach().cpu().clone() for a in self._acc], "kept": int(self._kept)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output; another model's (other layer count) is refused."""
        if len(state["scores"]) != len(self._acc):
            raise ConfigError("tracker state has a different number of layers than this model")
        self.mode, self.ema, self.steps = state["mode"], state["ema"], int(state["steps"])
        self.seed = int(state.get("seed", self.seed))  # checkpoints before the random control had none
        self._kept.fill_(int(state.get("kept", self.steps)))  # before skipped steps were told apart: every step added
        for acc, s in zip(self._acc, state["scores"]):
            acc.copy_(s.to(acc.device))
