"""Heart-LoRA inside a ``transformers.Trainer`` script: attach heartlora's adapters to the model, add the callback.

The callback scores heads during the first ``warmup_steps`` optimizer steps and then switches the least responsive
off. Scores are read in ``on_pre_optimizer_step``: the Trainer calls it after the (accumulated) backward passes and
gradient clipping and before ``optimizer.step()`` and ``zero_grad()``, so the gradients of the step are there. Heads
are switched off in ``on_step_end`` with the Trainer's optimizer, which gets the rebuilt Parameters with AdamW's
state carried over for the heads that stay (``heartlora.method.deactivate_heads``).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from heartlora.errors import ConfigError
from heartlora.method import NeChoice, ResponsivenessTracker, attention_layers, is_adapted
from heartlora.method.deactivate import SCOPES
from heartlora.method.heads_off import check_count, parse_heads_off, switch_off

# the callback's names of the heads-off settings (parse_heads_off's errors use them)
CALLBACK_NAMES = {"ne_fraction": "fraction", "ne_tolerance": "tolerance", "ne_refine": "refine"}


class HeartLoRACallback(TrainerCallback):
    """Score heads for ``warmup_steps`` optimizer steps, then switch off ``ne`` of them (or a ``fraction``). With
    ``ne="auto"`` the count is chosen then as ``heartlora train --ne auto`` chooses it (``heartlora.choose_ne``, at
    ``tolerance`` and ``refine``), on ``heldout``: a few (pixel_values, labels) batches sampled from the training set.

    The model the Trainer trains must carry heartlora's adapters (``heartlora.attach(model, config)`` on the
    transformers model, or ``heartlora.integrations.import_peft`` for an existing PEFT adapter); a PEFT-wrapped
    model is refused, since its LoRA layers do not split by head. After training, ``heads_off`` lists the
    (layer, head) pairs and ``scores`` the responsiveness; ``heartlora.save_adapter(model, path)`` stores the result.
    """

    def __init__(self, warmup_steps: int, ne: int | str | None = None, fraction: float | None = None,
                 scope: str = "global", mode: str = "abs_sum", tolerance: float | None = None,
                 refine: bool | None = None, heldout: list[tuple[Any, Any]] | None = None) -> None:
        if warmup_steps < 1:
            raise ConfigError(f"warmup_steps {warmup_steps} must be at least 1: heads are scored during the warmup")
        self.rule = parse_heads_off(ne, fraction, tolerance, refine, default=None, names=CALLBACK_NAMES)
        heldout = None if heldout is None else list(heldout)
        if self.rule.auto and not heldout:
            raise ConfigError("ne='auto' chooses the count on a fixed sample of training images: pass heldout=[(pixel_"
                              "values, labels), …] (a few batches of the training set), or give ne or fraction")
        if heldout and not self.rule.auto:
            raise ConfigError("heldout= is what ne='auto' chooses on: leave it out with a fixed ne or fraction")
        if scope not in SCOPES:
            raise ConfigError(f"scope {scope!r} is unknown: choose global or layer")
        self.warmup_steps, self.scope, self.mode = warmup_steps, scope, mode
        self.ne, self.fraction, self.heldout = self.rule.ne, self.rule.fraction, heldout
        self.choice: NeChoice | None = None  # ne='auto': the count chosen and the evidence
        self.tracker: ResponsivenessTracker | None = None
        self.heads_off: list[tuple[str, int]] | None = None
        self.scores: dict[str, Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not is_adapted(model):
            raise ConfigError(f"HeartLoRACallback needs a model with heartlora adapters, got "
                              f"{type(model).__name__}: call heartlora.attach(model, config) before building the "
                              "Trainer (for a PEFT adapter: heartlora.integrations.import_peft)")
        if state.global_step > 0:
            raise ConfigError("HeartLoRACallback cannot resume a Trainer run from a checkpoint (the heads that were "
                              "switched off are not in it): train from the start")
        if state.max_steps and self.warmup_steps >= state.max_steps:
            raise ConfigError(f"warmup_steps {self.warmup_steps} is not below the run's {state.max_steps} optimizer "
                              "steps: no step would train with the heads off; choose a smaller warmup_steps")
        check_count(self.ne, [layer.num_heads for layer in attention_layers(model)], self.scope,
                    names=CALLBACK_NAMES)
        self.tracker = ResponsivenessTracker(model, mode=self.mode, seed=getattr(args, "seed", 0))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.heads_off is None and state.global_step < self.warmup_steps:
            self.tracker.update()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if self.heads_off is not None or state.global_step < self.warmup_steps:
            return
        if optimizer is None:
            raise ConfigError("the Trainer passed no optimizer to HeartLoRACallback: its state cannot follow the "
                              "switched-off heads")
        self.scores = self.tracker.scores()
        heldout = None
        if self.rule.auto:
            device = next(model.parameters()).device
            heldout = [(x.to(device), y.to(device)) for x, y in self.heldout]
        self.heads_off, self.choice = switch_off(model, self.scores, self.rule, scope=self.scope, optimizer=optimizer,
                                                 heldout=heldout, forward=_logits, names=CALLBACK_NAMES)


def _logits(model: Any, x: Any) -> Any:
    """The logits of a transformers model's output (or of a model that returns them)."""
    out = model(x)
    return getattr(out, "logits", out)
