"""Training methods: what trains, what happens at the end of warmup, and what is stored. One registry.

A method is a small object (``TrainingMethod``); the trainer calls its hooks and knows nothing else about it. Other
code adds its own in one of two ways: ``register_method`` at run time, or, so that ``heartlora train --method NAME``
finds it too, an entry point of the group ``heartlora.methods`` in the package that defines it (``NAME =
"module:object"``, the object a ``TrainingMethod`` or its class), loaded the first time NAME is asked for. The
benchmarks' package (benchmarks/pyproject.toml) installs PEFT's LoRA as ``peft-lora`` this way, so that only the
adapter implementation differs between it and ``lora``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from heartlora.errors import ConfigError
from heartlora.method import ResponsivenessTracker, attach, save_adapter
from heartlora.method.heads_off import parse_heads_off, switch_off
from heartlora.method.model import backbone_fingerprint, train_adapters_mode

Heads = list[tuple[str, int]]  # (attention layer name, head index)


class TrainingMethod:
    """The hooks a method gives the trainer. Subclasses override what differs; the defaults train every Parameter
    that ``prepare`` left with ``requires_grad`` and store it as a plain weights file."""

    name: str = ""
    description: str = ""
    adapters: bool = False  # heartlora's per-head adapters: heads are scored during warmup and stored per head
    bits: int = 32
    heart: bool = False  # switches attention heads off at the end of warmup
    defaults: ClassVar[dict[str, Any]] = {}  # settings this method fills before the global defaults (flags still win)
    forced: ClassVar[dict[str, Any]] = {}  # settings this method always uses, whatever was asked

    def prepare(self, model: nn.Module, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        """Make the wanted weights trainable (in place, or wrap the model); returns (model, facts for the file)."""
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode for an epoch. By default a frozen BatchNorm stays in eval mode
        (``train_adapters_mode``): the file ``save`` writes holds the trained Parameters, not the backbone's running
        statistics, so they must stay the backbone's."""
        train_adapters_mode(model)

    def param_groups(self, model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
        """What the optimizer updates, in the order of ``model.parameters()``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def tracker(self, model: nn.Module, cfg: Any) -> Any:
        """A responsiveness tracker for the warmup epochs, or None."""
        return None

    def end_of_warmup(self, model: nn.Module, cfg: Any, scores: dict[str, torch.Tensor] | None,
                      optimizer: torch.optim.Optimizer, heldout: Callable[[], list] | None = None,
                      record: dict[str, Any] | None = None) -> Heads:
        """Called once, after the last warmup epoch; returns the attention heads switched off. ``heldout()`` gives
        (images, labels) batches of sampled training data for choices made on data; what was decided and why goes
        into ``record`` (it ends up in metrics.json)."""
        return []

    def restore(self, model: nn.Module, off: Heads, optimizer: torch.optim.Optimizer) -> None:
        """On resume: switch the same heads off again before the saved weights are loaded."""

    def save(self, model: nn.Module, path: Path, run_facts: dict[str, Any], dtype: str = "float32") -> int:
        """Write the trained model file; returns its per-task bytes (the ``adapter_bytes`` of metrics.json).
        ``dtype`` (``--save-dtype``, adapter methods only): what the adapter's values are stored as."""
        from heartlora.engine.inference import save_weights  # not at the top: inference → config → this module

        save_weights(model, path, [n for n, p in model.named_parameters() if p.requires_grad], run_facts)
        return 0


def classifier_of(model: nn.Module) -> nn.Module:
    """The model's classifier (the ``head`` of ``create_backbone``'s ImageClassifier)."""
    classifier = getattr(model, "head", None)
    if not isinstance(classifier, nn.Module):
        raise ConfigError(f"backbone {type(model).__name__} has no classifier (`head`): use create_backbone's models")
    return classifier


class LinearProbe(TrainingMethod):
    description = "classifier only, backbone frozen (linear probe)"
    # The backbone is frozen: dropping its paths would only add noise to fixed features.
    forced: ClassVar[dict[str, Any]] = {"drop_path": 0.0}

    def prepare(self, model: nn.Module, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        classifier = classifier_of(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in classifier.parameters():
            p.requires_grad_(True)
        return model, {"fingerprint": backbone_fingerprint(model, skip=("head",))}  # as adapter files get


class FullFineTune(TrainingMethod):
    description = "every weight trains"

    def prepare(self, model: nn.Module, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        for name, p in model.named_parameters():
            # a mask token serves masked-image pre-training only: a classifier's forward never reads it, and DDP
            # refuses a trainable parameter that gets no gradient (DINOv2's, under torchrun, at the second step)
            p.requires_grad_(not name.rpartition(".")[2] == "mask_token")
        return model, {}

    def train_mode(self, model: nn.Module) -> None:
        model.train()  # the whole state dict is stored, BatchNorm statistics with it: they adapt to the task

    def save(self, model: nn.Module, path: Path, run_facts: dict[str, Any], dtype: str = "float32") -> int:
        from heartlora.engine.inference import save_weights  # not at the top: inference → config → this module

        save_weights(model, path, list(model.state_dict()), run_facts)
        classifier = {f"head.{n}" for n, _ in classifier_of(model).named_parameters()}
        # A whole backbone per task: that is this method's per-task storage.
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in classifier)


class HeadLoRA(TrainingMethod):
    """heartlora's per-head LoRA (float or k-bit); ``heart`` switches the least responsive heads off."""

    adapters = True

    def __init__(self, description: str, bits: int = 32, heart: bool = False,
                 defaults: dict[str, Any] | None = None) -> None:
        self.description, self.bits, self.heart, self.defaults = description, bits, heart, defaults or {}

    def prepare(self, model: nn.Module, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        attach(model, cfg.adapter_config())
        return model, {}

    def tracker(self, model: nn.Module, cfg: Any) -> Any:
        return ResponsivenessTracker(model, mode=cfg.score_mode, ema=cfg.score_ema, seed=cfg.seed)

    def end_of_warmup(self, model: nn.Module, cfg: Any, scores: dict[str, torch.Tensor] | None,
                      optimizer: torch.optim.Optimizer, heldout: Callable[[], list] | None = None,
                      record: dict[str, Any] | None = None) -> Heads:
        if not self.heart:
            return []

        rule = parse_heads_off(cfg.ne, cfg.ne_fraction, cfg.ne_tolerance, cfg.ne_refine)
        off, choice = switch_off(model, scores, rule, scope=cfg.scope, optimizer=optimizer,
                                 heldout=heldout() if rule.auto and heldout is not None else None)
        if choice is not None and record is not None:
            record["ne_choice"] = choice.to_dict()
        return off

    def restore(self, model: nn.Module, off: Heads, optimizer: torch.optim.Optimizer) -> None:
        if off:
            from heartlora.method import deactivate_heads

            deactivate_heads(model, heads=off, optimizer=optimizer)

    def save(self, model: nn.Module, path: Path, run_facts: dict[str, Any], dtype: str = "float32") -> int:
        from heartlora.engine.inference import RUN_KEY  # not at the top: inference → config → this module

        return int(save_adapter(model, path, extra_metadata={RUN_KEY: run_facts}, dtype=dtype).adapter_bytes)


_REGISTRY: dict[str, TrainingMethod] = {}


def register_method(name: str, method: TrainingMethod, replace: bool = False) -> TrainingMethod:
    """Make ``method`` available as ``TrainConfig(method=name)`` / ``--method name``."""
    if name in _REGISTRY and not replace and _REGISTRY[name] is not method:
        raise ConfigError(f"a training method named {name!r} is already registered: pick another name")
    method.name = name
    _REGISTRY[name] = method
    return method


ENTRY_POINT_GROUP = "heartlora.methods"


def _installed(name: str | None = None) -> list[Any]:
    """The ``heartlora.methods`` entry points of the installed packages (those named ``name``)."""
    found = entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def get_method(name: str) -> TrainingMethod:
    """The method registered as ``name``, else the one an installed package declares under that name."""
    if name not in _REGISTRY:
        for ep in _installed(name):
            where = getattr(ep.dist, "name", None) or ep.value
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 (any import failure of a plug-in is reported the same way)
                raise ConfigError(f"method {name!r} of the installed package {where} failed to load "
                                  f"({type(exc).__name__}: {exc}): install what it needs, or uninstall it") from None
            method = obj() if isinstance(obj, type) else obj
            if not isinstance(method, TrainingMethod):
                raise ConfigError(f"method {name!r} of the installed package {where} is a {type(method).__name__}, "
                                  "not a heartlora TrainingMethod: its entry point must name one")
            register_method(name, method)
            break
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Every method's name: the registered ones, then those installed packages declare (not loaded yet)."""
    return list(_REGISTRY) + sorted({ep.name for ep in _installed()} - set(_REGISTRY))


register_method("linear", LinearProbe())
register_method("full", FullFineTune())
register_method("lora", HeadLoRA("LoRA on the target projections, all attention heads"))
# The 1-bit methods' adapters get HeartLoRAConfig's scale for 1 bit (16; 4 for the float ones, both chosen on val200).
register_method("bi-lora", HeadLoRA("1-bit quantized LoRA (Bi-LoRA), all attention heads", bits=1))
register_method("heart-lora", HeadLoRA("LoRA; least responsive attention heads off after warmup", heart=True))
register_method("heart-lora-layer", HeadLoRA("heart-lora ranking heads within each layer (the paper's "
                                             "Heart-LoRA†)", heart=True, defaults={"scope": "layer"}))
register_method("heart-bi-lora", HeadLoRA("1-bit LoRA with attention heads switched off", bits=1, heart=True))

METHODS = _REGISTRY  # name → method, live: registered baselines appear here too

__all__ = ["METHODS", "FullFineTune", "HeadLoRA", "LinearProbe", "TrainingMethod",
           "classifier_of", "get_method", "method_names", "register_method"]
