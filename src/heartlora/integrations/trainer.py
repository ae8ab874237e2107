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
from heartlora.method import ResponsivenessTracker, attention_layers, deactivate_heads, is_adapted
from heartlora.method.deactivate import SCOPES, ne_limit


class HeartLoRACallback(TrainerCallback):
    """Score heads for ``warmup_steps`` optimizer steps, then switch off ``ne`` of them (or a ``fraction``).

    The model the Trainer trains must carry heartlora's adapters (``heartlora.attach(model, config)`` on the
    transformers model, or ``heartlora.integrations.import_peft`` for an existing PEFT adapter); a PEFT-wrapped
    model is refused, since its LoRA layers do not split by head. After training, ``heads_off`` lists the
    (layer, head) pairs and ``scores`` the responsiveness; ``heartlora.save_adapter(model, path)`` stores the result.
    """

    def __init__(self, warmup_steps: int, ne: int | None = None, fraction: float | None = None,
                 scope: str = "global", mode: str = "abs_sum") -> None:
        if warmup_steps < 1:
            raise ConfigError(f"warmup_steps {warmup_steps} must be at least 1: heads are scored during the warmup")
        if (ne is None) == (fraction is None):
            raise ConfigError("give exactly one of ne (a number of heads) or fraction (a share of heads)")
        if ne is not None and (isinstance(ne, bool) or not isinstance(ne, int) or ne < 0):
            raise ConfigError(f"ne {ne!r} must be a number of heads >= 0 (ne='auto' is not offered by the callback: it "
                              "needs a fixed sample of training batches; use heartlora train --ne auto, or a fraction)")
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ConfigError(f"fraction {fraction} must be in [0, 1): the share of heads to switch off")
        if scope not in SCOPES:
            raise ConfigError(f"scope {scope!r} is unknown: choose global or layer")
        self.warmup_steps, self.ne, self.fraction, self.scope, self.mode = warmup_steps, ne, fraction, scope, mode
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
        if self.ne is not None:
            limit = ne_limit([layer.num_heads for layer in attention_layers(model)], self.scope)
            if self.ne > limit:
                where = "attention heads" if self.scope == "global" else "heads in its smallest layer"
                raise ConfigError(f"ne {self.ne} is more than the model's {limit} {where}: choose ne <= {limit}")
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
        self.heads_off = deactivate_heads(model, self.scores, ne=self.ne, fraction=self.fraction, scope=self.scope,
                                          optimizer=optimizer)
