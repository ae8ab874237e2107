"""Attaching adapters to a model, and the operations on an adapted model as a whole."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heartlora.errors import ConfigError, UnsupportedBackboneError
from heartlora.method.config import HeartLoRAConfig
from heartlora.method.layer import HeadLoRALinear, HeadLoRAProjection, wrap_projection
from heartlora.method.layouts import Unadapted, find_attention, scan_attention

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
        """Which of the layer's heads are on (every adapted projection of a layer shares one mask)."""
        return next(iter(self.projections.values())).head_mask()


@dataclass
class Coverage:
    """Which attention modules attach adapted, which projections it could not reach, and which modules it left."""

    adapted: list[str]
    layouts: dict[str, str]  # adapted module -> layout name
    partial: dict[str, dict[str, str]]  # adapted module -> {projection asked for but absent: why}
    unadapted: list[Unadapted] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Attention modules found, adapted or not."""
        return len(self.adapted) + len(self.unadapted)

    def summary(self) -> str:
        """One line, e.g. ``adapted 12 of 14 attention modules; not adapted: 2 × OutlookAttention (…)``."""
        line = f"adapted {len(self.adapted)} of {self.total} attention modules"
        if self.partial:
            whys = sorted({f"{p}: {why}" for miss in self.partial.values() for p, why in miss.items()})
            line += f"; {len(self.partial)} without some projections ({'; '.join(whys)})"
        if self.unadapted:
            groups: dict[tuple[str, str], int] = {}
            for u in self.unadapted:
                groups[(u.cls, u.reason)] = groups.get((u.cls, u.reason), 0) + 1
            line += "; not adapted: " + "; ".join(f"{n} × {cls} ({why})" for (cls, why), n in groups.items())
        return line


@dataclass
class AttachState:
    """What ``attach`` records on the model it adapted (``attach_state(model)`` reads it)."""

    config: HeartLoRAConfig
    layers: list[AttentionHeads]
    fingerprint: str
    modules_to_save: tuple[str, ...]
    coverage: Coverage | None = None


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
    """Module names of the classifier(s): timm's ``get_classifier()`` plus a distilled model's ``head_dist``, else
    the attributes named head, head_dist, heads, classifier or fc that exist."""
    names = {id(m): n for n, m in model.named_modules() if n}
    found: list[str] = []
    get = getattr(model, "get_classifier", None)
    if callable(get):
        clf = get()
        clfs = clf if isinstance(clf, (tuple, list)) else (clf,)  # timm DeiT distilled returns (head, head_dist)
        found = [names[id(c)] for c in clfs if isinstance(c, nn.Module) and id(c) in names]
    if not found:
        found = [a for a in ("head", "heads", "classifier", "fc") if isinstance(getattr(model, a, None), nn.Module)][:1]
    dist = getattr(model, "head_dist", None)
    if found and isinstance(dist, nn.Module) and "head_dist" not in found:
        found.append("head_dist")
    return tuple(found)


def attach(model: nn.Module, config: HeartLoRAConfig | None = None, *, verify: bool = True,
           example_input: Any = None, fingerprint: str | None = None) -> nn.Module:
    """Add head-aware LoRA adapters to every attention layer of ``model`` (in place) and freeze everything else but
    ``config.modules_to_save`` (the classifier by default). Returns ``model``; :func:`coverage` says what was adapted.

    With ``verify`` (the default) attach then proves the adapters are live: one forward and backward pass on
    ``example_input`` (or a dummy input of the model's own size), with the zero factors set nonzero for the
    duration, must change the output and give every adapted projection a gradient; otherwise it raises
    UnsupportedBackboneError naming the modules. The adapters are restored bit for bit afterwards.
    ``fingerprint``: the backbone's :func:`backbone_fingerprint` (classifier skipped) when the caller has it already,
    e.g. an AdapterBank loading many files onto one backbone; else it is computed here.

    >>> import timm, heartlora as hl
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    >>> vit = hl.attach(vit, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    >>> len(hl.attention_layers(vit)), hl.coverage(vit).summary()
    (12, 'adapted 12 of 12 attention modules')
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach needs a torch.nn.Module (a timm, transformers or torchvision model), got "
                          f"{type(model).__name__}")
    if isinstance(config, dict):
        config = HeartLoRAConfig(**config)
    elif config is not None and not isinstance(config, HeartLoRAConfig):
        raise ConfigError(f"config must be a HeartLoRAConfig (or a dict of its fields), got {type(config).__name__}")
    config = config or HeartLoRAConfig()
    if getattr(model, _STATE, None) is not None:
        raise ConfigError("this model already has heartlora adapters: attach them to a fresh backbone")
    save = config.modules_to_save if config.modules_to_save is not None else find_classifier(model)
    names = dict(model.named_modules())
    missing = [s for s in save if s not in names]
    if missing:
        raise ConfigError(f"modules_to_save {missing} are not in the model: name modules from model.named_modules()")
    find_attention(model)  # refuse a model with no attention before touching it
    if verify and example_input is None:
        example_input = dummy_input(model)
    fingerprint = fingerprint or backbone_fingerprint(model, skip=save)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)

    found, unadapted = scan_attention(model)
    layers: list[AttentionHeads] = []
    cover = Coverage([], {}, {}, unadapted)
    for name, layout, module, parent, attr in found:
        module, sites = layout.describe(module, parent, attr)
        projections: dict[str, HeadLoRAProjection] = {}
        for target in config.targets:
            site = sites.sites.get(target)
            if site is None:
                why = sites.missing.get(target, f"{layout.name} has no {target} projection")
                cover.partial.setdefault(name, {})[target] = why
                continue
            if site.mode == "weight" and config.dropout > 0:
                raise ConfigError(f"{name} ({type(module).__name__}) reads its projection's weight directly, so "
                                  f"adapter dropout cannot reach its input: use dropout=0 for this backbone")
            wrapper = getattr(site.parent, site.attr)
            if not isinstance(wrapper, HeadLoRALinear):
                wrapper = wrap_projection(wrapper, dropout=config.dropout, mode=site.mode)
                setattr(site.parent, site.attr, wrapper)
            base = wrapper.base_layer
            proj = HeadLoRAProjection(target, name, site.index, wrapper.in_features, wrapper.out_features,
                                      config.rank, config.scale, config.bits, config.init_b_std)
            proj.to(device=base.weight.device, dtype=base.weight.dtype if base.weight.is_floating_point()
                    else torch.float32)
            wrapper.lora[target] = proj
            wrapper.train(base.training)  # a new module trains by default: an eval model's adapters would drop out
            projections[target] = proj
        if not projections:
            whys: dict[str, list[str]] = {}
            for target, why in cover.partial.pop(name).items():
                whys.setdefault(why, []).append(target)
            cover.unadapted.append(Unadapted(name, type(module).__name__, f"none of the targets "
                                             f"{', '.join(config.targets)} exists here: "
                                             + "; ".join(f"{', '.join(ts)}: {why}" for why, ts in whys.items())))
            continue
        layers.append(AttentionHeads(name, layout.name, sites.num_heads, sites.head_dim, projections))
        cover.adapted.append(name)
        cover.layouts[name] = layout.name
    if not layers:
        raise UnsupportedBackboneError(f"{type(model).__name__}: none of its attention modules has the projections "
                                       f"{', '.join(config.targets)}: {cover.summary()}")

    for s in save:
        for p in names[s].parameters():
            p.requires_grad_(True)
    setattr(model, _STATE, AttachState(config, layers, fingerprint, tuple(save), cover))
    if verify:
        try:
            verify_adapters(model, example_input)
        except BaseException:
            remove_adapters(model)
            for p in trainable:
                p.requires_grad_(True)
            raise
    return model


def coverage(model: nn.Module) -> Coverage:
    """What :func:`attach` adapted and what it left, with reasons; ``coverage(model).summary()`` is one line."""
    return attach_state(model).coverage


def dummy_input(model: nn.Module) -> torch.Tensor:
    """One input of the model's own size: an image batch of 1 (timm ``patch_embed.img_size`` or pretrained_cfg
    ``input_size``, Hugging Face ``config.image_size``/``num_channels``, an ``img_size``/``image_size`` attribute),
    or token ids for a text config. ConfigError when the size cannot be told."""
    g = torch.Generator().manual_seed(0)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32

    def image(chans: int, h: int, w: int) -> torch.Tensor:
        return torch.rand(1, chans, h, w, generator=g).to(device=device, dtype=dtype)

    for m in model.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and type(m).__module__.startswith("heartlora"):
            return image(3, size, size)  # an ImageClassifier: images in [0, 1]
        pe = getattr(m, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
            return image(chans, *size)
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            size = getattr(cfg, "image_size", None)
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
                return image(int(getattr(cfg, "num_channels", 3)), int(h), int(w))
            vocab = getattr(cfg, "vocab_size", None)
            if isinstance(vocab, int):
                return torch.randint(0, vocab, (1, 8), generator=g).to(device)
        size = getattr(m, "image_size", None)  # torchvision VisionTransformer
        if isinstance(size, int) and not isinstance(size, bool):
            return image(3, size, size)
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return image(*[int(s) for s in cfg["input_size"]])
    raise ConfigError(f"cannot tell the input size of {type(model).__name__} to check the adapters: pass "
                      "example_input= (one batch the model accepts) or verify=False")


def float_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output (a tensor, or dicts, lists and tuples of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in float_tensors(o)]
    return []


def call_model(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    """``model`` called on ``example_input`` (keyword arguments for a dict, positional ones for a tuple or list, else
    the one input), its floating-point outputs as ``float_tensors`` lists them."""
    if isinstance(example_input, dict):
        return float_tensors(model(**example_input))
    if isinstance(example_input, (tuple, list)):
        return float_tensors(model(*example_input))
    return float_tensors(model(example_input))


def verify_adapters(model: nn.Module, example_input: Any) -> None:
    """One forward + backward in eval mode with every all-zero adapter factor set to small random values: each
    adapted attention module's output must change and every adapted projection must get a nonzero gradient
    (through its own module's output, so a zero-initialised classifier does not hide it). Everything is restored
    exactly (factors bit for bit, train/eval flags) and no ``.grad`` is left behind."""
    layers = attention_layers(model)
    projs = [(layer.name, t, p) for layer in layers for t, p in layer.projections.items()]
    params = [q for _, _, p in projs for q in p.parameters()]
    saved = [q.detach().clone() for q in params]
    modes = {m: m.training for m in model.modules()}
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            seen.setdefault(name, float_tensors(out))  # the first call, if a module runs twice
        return hook

    hooks = [model.get_submodule(layer.name).register_forward_hook(record(layer.name)) for layer in layers]
    g = torch.Generator().manual_seed(0)
    model.eval()
    try:
        with torch.enable_grad():
            try:
                with torch.no_grad():
                    enabled = {w: w.enabled for w in wrappers(model)}
                    for w in enabled:  # the reference is the base model: k-bit adapters start nonzero
                        w.enabled = False
                    try:
                        call_model(model, example_input)
                    finally:
                        for w, on in enabled.items():
                            w.enabled = on
                    base = {n: [t.detach().clone() for t in ts] for n, ts in seen.items()}
                    seen.clear()
                    for q in params:
                        if not q.detach().any():
                            q.copy_((torch.randn(q.shape, generator=g) * 0.1).to(q))
                call_model(model, example_input)
            except Exception as e:
                raise UnsupportedBackboneError(
                    f"attach could not run {type(model).__name__} on its check input ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}): pass example_input= or verify=False") from e
            gen = torch.Generator().manual_seed(1)
            outs = [t for ts in seen.values() for t in ts if t.requires_grad]
            loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
            grads = torch.autograd.grad(loss, params, allow_unused=True) if outs else [None] * len(params)
        still = [layer.name for layer in layers
                 if layer.name not in seen or all(torch.equal(a.detach(), b) for a, b in zip(seen[layer.name],
                                                                                         base.get(layer.name, [])))]
        dead, i = [], 0
        for name, target, p in projs:
            n = len(list(p.parameters()))
            if not all(gr is not None and bool(gr.any()) for gr in grads[i:i + n]):
                dead.append(f"{name}.{target}")
            i += n
        constant = [n for n in still if seen.get(n) and all(bool((t == t.reshape(-1)[0]).all()) for t in seen[n])]
        if constant:
            shown = ", ".join(constant[:4]) + (f" and {len(constant) - 4} more" if len(constant) > 4 else "")
            raise UnsupportedBackboneError(
                f"the output of {shown} is constant, so attach cannot check its adapters (an untrained model whose "
                "last norm weight starts at zero, e.g. timm LeViT): attach to trained weights, or pass verify=False")
        if dead or still:
            bad = dead or still
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            why = f"no gradient reaches {shown}" if dead else f"the output of {shown} does not change"
            raise UnsupportedBackboneError(
                f"attach wrapped the projections but {why} when the adapters are nonzero: the attention bypasses "
                f"the wrapped Linears (e.g. it reads their weight directly); add a layout for it in "
                f"heartlora/method/layouts.py, or report the family")
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for q, s in zip(params, saved):
                q.copy_(s)
        for m, flag in modes.items():
            m.training = flag


def remove_adapters(model: nn.Module) -> None:
    """Undo ``attach``'s wrapping: every wrapped Linear back to its base layer, the attach state dropped (used when an
    attach or a load fails, so the caller keeps a usable model). ``requires_grad`` flags stay as they are."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, HeadLoRALinear):
                setattr(parent, attr, child.base_layer)
    delattr(model, _STATE)


def attach_state(model: nn.Module) -> AttachState:
    """What ``attach`` recorded on ``model`` (its config, layers, fingerprint, saved modules); a ConfigError when it
    has no adapters."""
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    state = getattr(model, _STATE, None)
    if state is None:
        raise ConfigError("this model has no heartlora adapters: call heartlora.attach(model, config) first")
    return state


def is_adapted(model: nn.Module) -> bool:
    """Whether ``attach`` has adapted this model (or the model a DDP / DataParallel wrapper holds)."""
    return getattr(getattr(model, "module", model), _STATE, None) is not None


def adapter_config(model: nn.Module) -> HeartLoRAConfig:
    """The HeartLoRAConfig an adapted model was attached with; refused in one line for a model attach never saw."""
    return attach_state(model).config


def attention_layers(model: nn.Module) -> list[AttentionHeads]:
    """The adapted attention layers, in module order."""
    return attach_state(model).layers


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


def adapted_wrappers(model: nn.Module, what: str) -> list[HeadLoRALinear]:
    """``wrappers(model)``, or a ConfigError naming ``what`` (the caller) when the model has none."""
    found = wrappers(model)
    if not found:
        raise ConfigError(f"{what}: the model has no heartlora adapters; attach or load an adapter first")
    return found


def merge(model: nn.Module) -> nn.Module:
    """Write every adapter delta into its base weight; the adapters stop computing. :func:`unmerge` restores the
    original weights exactly (they are kept aside). Refused while the adapters are disabled (the merged model would
    not be the disabled one)."""
    found = adapted_wrappers(model, "merge")
    if not all(w.enabled for w in found):
        raise ConfigError("merge: the adapters are disabled; set_adapters_enabled(model, True) first, or keep the "
                          "model unmerged")
    for w in found:
        w.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights :func:`merge` changed, bit for bit."""
    for w in adapted_wrappers(model, "unmerge"):
        w.unmerge()
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn the adapters' deltas on or off (the base model alone when off). Refused on a merged model, whose
    weights already hold the deltas: :func:`unmerge` it first."""
    found = adapted_wrappers(model, "set_adapters_enabled")
    if any(w.merged for w in found):
        raise ConfigError("set_adapters_enabled: the adapters are merged into the base weights, so they cannot be "
                          "switched off there; call unmerge(model) first")
    for w in found:
        w.enabled = bool(enabled)
    return model


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, and afterwards each module back in its own mode (``model.train(was)``
    would put every module in the model's mode, undoing a frozen BatchNorm kept in eval mode while the adapters
    train)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


STATISTICS_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def train_adapters_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except the normalisation layers with running statistics (BatchNorm) that train no
    Parameter of their own: they stay in eval mode. Their statistics are the frozen backbone's, which an adapter file
    does not store: updated by the training batches, they would give the run an accuracy its stored adapter, loaded
    on the backbone, does not have (and batch statistics at inference change the adapted model's output)."""
    model.train()
    for m in model.modules():
        if isinstance(m, STATISTICS_NORMS) and m.track_running_stats \
                and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()
    return model


def remove_from_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Drop Parameters from an optimizer's groups and state, so nothing is kept or stepped for them."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in list(optimizer.state.keys()):
        if id(p) in gone:
            del optimizer.state[p]
