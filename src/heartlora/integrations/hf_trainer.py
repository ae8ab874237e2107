"""Heart-LoRA inside a ``transformers.Trainer`` script: attach heartlora's adapters to the model, add the callback.

The callback scores heads during the first ``warmup_steps`` optimizer steps and then switches the least responsive
off. Scores are read in ``on_pre_optimizer_step``: the Trainer calls it after the (accumulated) backward passes and
gradient clipping and before ``optimizer.step()`` and ``zero_grad()``, so the gradients of the step are there. Heads
are switched off in ``on_step_end`` with the Trainer's optimizer, which gets the rebuilt Parameters with AdamW's
state carried over for the heads that stay (``heartlora.method.deactivate_heads``). Two consequences: each warmup
step's scores are those of the clipped gradients (``max_grad_norm``, 1.0 by default, scales a step whose gradient
norm exceeds it; ``max_grad_norm=0`` gives the unclipped sum of the method and of ``heartlora train``), and the
Trainer must run in one process (under DDP its wrapper would keep the Parameters it was built with: refused).

Saving: the callback makes the transformers model's ``save_pretrained`` (what ``trainer.save_model`` and every
checkpoint call) write the model without heartlora (config.json, model.safetensors: the frozen backbone under its own
names and the trained classifier), ``adapter.safetensors`` (heartlora's adapter, with the callback's state), and a
PEFT folder beside them (adapter_config.json, adapter_model.safetensors) where PEFT can express the adapter. The
folder loads back with ``heartlora.load_adapter(DIR)``, with ``ViTForImageClassification.from_pretrained(DIR)``
(transformers loads the embedded PEFT adapter) or ``PeftModel.from_pretrained(base, DIR)``. Resuming from a
checkpoint restores the heads switched off, the adapter's weights and the optimizer's Parameters.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from heartlora.errors import ConfigError, UnsupportedBackboneError
from heartlora.integrations.peft import export_peft_transformers
from heartlora.method import NeChoice, ResponsivenessTracker, attention_layers, is_adapted, save_adapter
from heartlora.method.deactivate import SCOPES
from heartlora.method.heads_off import check_count, parse_heads_off, switch_off
from heartlora.method.layer import HeadLoRALinear
from heartlora.method.storage import (
    TRANSFORMERS_CONFIG_KEY,
    read_adapter,
    restore_adapter,
    transformers_config_facts,
)

# the callback's names of the heads-off settings (parse_heads_off's errors use them)
CALLBACK_NAMES = {"ne_fraction": "fraction", "ne_tolerance": "tolerance", "ne_refine": "refine"}

log = logging.getLogger(__name__)
ADAPTER_NAME = "adapter.safetensors"
STATE_KEY = "heartlora_trainer"  # the callback's state in the adapter file's extra metadata


def base_state_dict(model: torch.nn.Module, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model``'s state dict as the model without heartlora has it: each adapted Linear's weight and bias under
    its own names (the original weight while merged), no adapter factors."""
    root = getattr(model, "module", model)
    wrapped = {name: m for name, m in root.named_modules() if isinstance(m, HeadLoRALinear)}
    out = {}
    for key, value in (root.state_dict() if state_dict is None else state_dict).items():
        owner, sep, rest = key.rpartition(".base_layer.")
        if sep and owner in wrapped:  # a merged layer's state dict already holds its original weight
            out[f"{owner}.{rest}"] = value
        elif key.partition(".lora.")[0] not in wrapped:
            out[key] = value
    return out


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
        self._step = 0

    # -- saving: the Trainer's save_pretrained writes heartlora's and PEFT's adapter beside its own files

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._install_save(model)

    def _install_save(self, model: Any) -> None:
        root = getattr(model, "module", model)
        if root is None or not is_adapted(root) or not callable(getattr(root, "save_pretrained", None)):
            return
        original = getattr(root, "_heartlora_original_save", None) or root.save_pretrained
        root._heartlora_original_save = original
        root.save_pretrained = functools.partial(self._save_pretrained, root, original)

    def _save_pretrained(self, root: Any, original: Any, save_directory: Any, *args: Any,
                         state_dict: dict[str, Any] | None = None, is_main_process: bool = True,
                         **kwargs: Any) -> Any:
        result = original(save_directory, *args, state_dict=base_state_dict(root, state_dict),
                          is_main_process=is_main_process, **kwargs)
        if is_main_process:
            self.save_adapters(root, save_directory)
        return result

    def save_adapters(self, model: Any, directory: Any) -> None:
        """Write ``adapter.safetensors`` (with the callback's state, for resuming) and, where PEFT can express the
        adapter and peft is installed, PEFT's adapter_config.json and adapter_model.safetensors into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {"global_step": self._step, "heads_off": None if self.heads_off is None else
                 [list(h) for h in self.heads_off],
                 "tracker": None if self.tracker is None or self.heads_off is not None else
                 {"steps": self.tracker.steps, "scores": [a.tolist() for a in self.tracker.state_dict()["scores"]]}}
        extra: dict[str, Any] = {STATE_KEY: state}
        facts = transformers_config_facts(d / "config.json")  # save_pretrained wrote it just before
        if facts is not None:  # load_adapter(DIR) checks the folder's config.json against it
            extra[TRANSFORMERS_CONFIG_KEY] = facts
        save_adapter(model, d / ADAPTER_NAME, extra_metadata=extra)
        if importlib.util.find_spec("peft") is None:
            log.info("peft is not installed: %s holds heartlora's adapter only (pip install peft for the PEFT "
                     "folder)", d)
            return

        try:
            export_peft_transformers(model, d)
        except UnsupportedBackboneError as e:
            log.info("no PEFT folder in %s: %s", d, e)

    # -- resuming: the heads off, the adapter's weights and the optimizer's Parameters from the checkpoint

    def _resume(self, args: Any, state: Any, model: Any, optimizer: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_NAME
        if not path.is_file():
            raise ConfigError(f"resuming at step {state.global_step} needs {path}, which HeartLoRACallback writes "
                              "with each checkpoint: resume from a checkpoint of this output_dir saved with the "
                              "callback")
        contents = read_adapter(path)
        saved = (contents[0].get("extra") or {}).get(STATE_KEY)
        if not saved or saved.get("global_step") != state.global_step:
            raise ConfigError(f"{path} holds no HeartLoRACallback state for step {state.global_step}: resume from "
                              "a checkpoint the callback saved")
        if not _same_modules(model, contents):
            raise ConfigError(f"{path} is not the checkpoint being resumed: its classifier differs from the one the "
                              "Trainer loaded (another run's checkpoint of the same step?); resume with output_dir "
                              "set to the folder that holds the checkpoint")
        before = _factors(model)
        restore_adapter(model, path)
        _move_in_optimizer(optimizer, before, _factors(model))
        if saved["heads_off"] is not None:
            self.heads_off = [(name, int(h)) for name, h in saved["heads_off"]]
        elif saved["tracker"] is not None:
            self.tracker.load_state_dict({**self.tracker.state_dict(), "steps": saved["tracker"]["steps"],
                                          "scores": [torch.tensor(s, dtype=torch.float64)
                                                     for s in saved["tracker"]["scores"]]})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not is_adapted(model):
            raise ConfigError(f"HeartLoRACallback needs a model with heartlora adapters, got "
                              f"{type(model).__name__}: call heartlora.attach(model, config) before building the "
                              "Trainer (for a PEFT adapter: heartlora.integrations.import_peft)")
        processes = int(getattr(args, "world_size", 1) or 1)
        if processes > 1:  # measured: two gloo processes ended with different adapters and no error
            raise ConfigError(f"HeartLoRACallback runs in one process, and this Trainer runs {processes} (DDP): the "
                              "DistributedDataParallel wrapper keeps the Parameters it was built with, so the adapter "
                              "factors rebuilt when heads go off would train apart in each process; train in one "
                              "process, or with heartlora train under torchrun")
        self._install_save(model)
        if state.max_steps and self.warmup_steps >= state.max_steps:
            raise ConfigError(f"warmup_steps {self.warmup_steps} is not below the run's {state.max_steps} optimizer "
                              "steps: no step would train with the heads off; choose a smaller warmup_steps")
        check_count(self.ne, [layer.num_heads for layer in attention_layers(model)], self.scope,
                    names=CALLBACK_NAMES)
        self.tracker = ResponsivenessTracker(model, mode=self.mode, seed=getattr(args, "seed", 0))
        self.heads_off, self.scores, self._step = None, None, state.global_step
        if state.global_step > 0:
            self._resume(args, state, model, kwargs.get("optimizer"))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """``load_best_model_at_end``: the Trainer has put the best checkpoint's backbone and classifier back (its
        model.safetensors); the adapter and its heads come back here from the same checkpoint's adapter file, so the
        model is that checkpoint's, not its classifier on the last step's adapter."""
        best = getattr(state, "best_model_checkpoint", None)
        if not getattr(args, "load_best_model_at_end", False) or not best or model is None:
            return
        path = Path(best) / ADAPTER_NAME
        if not path.is_file():
            raise ConfigError(f"load_best_model_at_end: {path} is missing, so the best checkpoint's adapter cannot "
                              "join its classifier; the model holds the last step's adapter; load "
                              f"{best} with heartlora.load_adapter instead")
        contents = read_adapter(path)
        if not _same_modules(model, contents):  # the Trainer did not put the best model back (an Optuna trial pruned)
            return
        saved = (contents[0].get("extra") or {}).get(STATE_KEY) or {}
        if saved.get("heads_off") is None and self.heads_off is not None:
            raise ConfigError(f"load_best_model_at_end: the best checkpoint ({best}) was saved before the heads were "
                              f"switched off at step {self.warmup_steps}, so its adapter cannot return into this "
                              "model; load it with heartlora.load_adapter(DIR), or evaluate after the warmup only")
        restore_adapter(model, path)
        self.heads_off = None if saved.get("heads_off") is None else [(n, int(h)) for n, h in saved["heads_off"]]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.heads_off is None and state.global_step < self.warmup_steps:
            self.tracker.update()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        self._step = state.global_step
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


def _same_modules(model: Any, contents: Any) -> bool:
    """Whether the modules an adapter file saves (the classifier; ``contents``: the file as ``read_adapter`` gives it)
    equal the model's now: on resume the Trainer has loaded them from the checkpoint it resumes, so a file of another
    checkpoint differs (a file saving none: True)."""
    meta, tensors, _ = contents
    modules = dict(getattr(model, "module", model).named_modules())
    for name in meta.get("modules_to_save") or ():
        if name not in modules:
            return False
        for key, value in modules[name].state_dict().items():
            stored = tensors.get(f"modules.{name}.{key}")
            if stored is None or stored.shape != value.shape or not torch.equal(stored, value.detach().cpu()):
                return False
    return True


def _factors(model: Any) -> dict[tuple[str, str, str], torch.nn.Parameter]:
    return {(layer.name, target, name): p for layer in attention_layers(model)
            for target, proj in layer.projections.items() for name, p in proj.named_parameters()}


def _move_in_optimizer(optimizer: Any, before: dict, after: dict) -> None:
    """Put the Parameters rebuilt by a resume where the fresh ones were in ``optimizer``; the state it loaded from
    the checkpoint is already shaped like the rebuilt ones (it was saved after the heads were switched off)."""
    moved = {id(p): after.get(key) for key, p in before.items() if after.get(key) is not p}
    if not moved or optimizer is None:
        return
    if any(new is None for new in moved.values()):
        raise ConfigError("this checkpoint has a projection with every head switched off, whose factors the "
                          "Trainer's fresh optimizer still holds: such a run cannot be resumed; train from the start")
    for group in optimizer.param_groups:
        group["params"] = [moved.get(id(p), p) for p in group["params"]]
    for key, old in before.items():
        new = after[key]
        st = optimizer.state.pop(old, None) if new is not old else None
        if st is None:
            continue
        odd = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != new.shape]
        if odd:
            shape = tuple(st[odd[0]].shape)
            raise ConfigError(f"the checkpoint's optimizer state for {'.'.join(key)} is shaped {shape}, not "
                              f"{tuple(new.shape)}: resume from a checkpoint saved by the same run")
        optimizer.state[new] = st
