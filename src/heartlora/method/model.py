"""Attaching adapters to a model, and the operations on an adapted model as a whole."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from heartlora.errors import ConfigError
from heartlora.method.config import HeartLoRAConfig
from heartlora.method.layer import HeadLoRALinear, HeadLoRAProjection
from heartlora.method.layouts import find_attention

_STATE = "_heartlora"  # attribute on the adapted root module: config, layer names, fingerprint


@dataclass
class AttentionHeads:
    """One adapted attention layer: its name in the model, layout, head count and its projections' adapters."""

    name: str
    layout: str
    num_heads: int
    head_dim: int
    projections: dict[str, HeadLoRAProjection]

    def head_mask(self) -> list[bool]:
        return next(iter(self.projections.values())).head_mask()


@dataclass
class _AttachState:
    config: HeartLoRAConfig
    layers: list[AttentionHeads]
    fingerprint: str
    modules_to_save: tuple[str, ...]


def backbone_fingerprint(model: nn.Module, skip: Iterable[str] = ()) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer outside ``skip`` (module
    prefixes, e.g. the classifier). Computed before adapters are attached, so it names the frozen backbone."""
    skip = tuple(f"{s}." for s in skip)
    h = hashlib.sha256()
    for name, t in sorted(list(model.state_dict(keep_vars=False).items())):
        if name.startswith(skip) or not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def find_classifier(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier: timm's ``get_classifier()``, else an attribute named head, heads, classifier or fc."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        clf = get()
        for name, mod in model.named_modules():
            if mod is clf and name:
                return (name,)
    for attr in ("head", "heads", "classifier", "fc"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return (attr,)
    return ()


def attach(model: nn.Module, config: HeartLoRAConfig | None = None) -> nn.Module:
    """Add head-aware LoRA adapters to every attention layer of ``model`` (in place) and freeze everything else but
    ``config.modules_to_save`` (the classifier by default). Returns ``model``.

    >>> import timm, heartlora as hl
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    >>> vit = hl.attach(vit, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    >>> len(hl.attention_layers(vit))
    12
    """
    config = config or HeartLoRAConfig()
    if getattr(model, _STATE, None) is not None:
        raise ConfigError("this model already has heartlora adapters: attach them to a fresh backbone")
    save = config.modules_to_save if config.modules_to_save is not None else find_classifier(model)
    names = dict(model.named_modules())
    missing = [s for s in save if s not in names]
    if missing:
        raise ConfigError(f"modules_to_save {missing} are not in the model: name modules from model.named_modules()")
    fingerprint = backbone_fingerprint(model, skip=save)
    for p in model.parameters():
        p.requires_grad_(False)

    layers: list[AttentionHeads] = []
    for name, layout, module, parent, attr in find_attention(model):
        module, sites = layout.describe(module, parent, attr)
        projections: dict[str, HeadLoRAProjection] = {}
        for target in config.targets:
            site = sites.sites[target]
            wrapper = getattr(site.parent, site.attr)
            if not isinstance(wrapper, HeadLoRALinear):
                wrapper = HeadLoRALinear(wrapper, dropout=config.dropout, mode=site.mode)
                setattr(site.parent, site.attr, wrapper)
            base = wrapper.base_layer
            proj = HeadLoRAProjection(target, name, site.index, base.in_features, base.out_features, config.rank,
                                      config.scale, config.bits, config.init_b_std)
            proj.to(device=base.weight.device, dtype=base.weight.dtype if base.weight.is_floating_point()
                    else torch.float32)
            wrapper.lora[target] = proj
            projections[target] = proj
        layers.append(AttentionHeads(name, layout.name, sites.num_heads, sites.head_dim, projections))

    for s in save:
        for p in names[s].parameters():
            p.requires_grad_(True)
    setattr(model, _STATE, _AttachState(config, layers, fingerprint, tuple(save)))
    return model


def _state(model: nn.Module) -> _AttachState:
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    state = getattr(model, _STATE, None)
    if state is None:
        raise ConfigError("this model has no heartlora adapters: call heartlora.attach(model, config) first")
    return state


def is_adapted(model: nn.Module) -> bool:
    return getattr(getattr(model, "module", model), _STATE, None) is not None


def adapter_config(model: nn.Module) -> HeartLoRAConfig:
    return _state(model).config


def attention_layers(model: nn.Module) -> list[AttentionHeads]:
    """The adapted attention layers, in module order."""
    return _state(model).layers


def head_masks(model: nn.Module) -> dict[str, list[bool]]:
    """Layer name → one bool per head (True = on)."""
    return {layer.name: layer.head_mask() for layer in attention_layers(model)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter Parameters still in use (off heads excluded), in a stable order."""
    params: list[nn.Parameter] = []
    for layer in attention_layers(model):
        for proj in layer.projections.values():
            params.extend(p for p in proj.parameters())
    return params


def wrappers(model: nn.Module) -> list[HeadLoRALinear]:
    return [m for m in getattr(model, "module", model).modules() if isinstance(m, HeadLoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Write every adapter delta into its base weight; the adapters stop computing. :func:`unmerge` restores the
    original weights exactly (they are kept aside)."""
    for w in wrappers(model):
        w.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for w in wrappers(model):
        w.unmerge()
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn the adapters' deltas on or off (the base model alone when off)."""
    for w in wrappers(model):
        w.enabled = enabled
    return model


def remove_from_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Drop Parameters from an optimizer's groups and state, so nothing is kept or stepped for them."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in list(optimizer.state.keys()):
        if id(p) in gone:
            del optimizer.state[p]
