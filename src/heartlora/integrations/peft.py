"""PEFT LoRA folders in and out, and head pruning of an adapter trained with PEFT.

A folder written here is for the transformers image classifier of the backbone's family
(``ViTForImageClassification``, ``Dinov2ForImageClassification``): ``PeftModel.from_pretrained(model, DIR)`` on that
class, whose inner model (``model.vit`` / ``model.dinov2``) holds the backbone's weights, gives heartlora's logits for
the same normalised pixels. A heartlora head on DINOv2's class token alone becomes a classifier over (class token,
mean patch token) whose second half is zero, so the logits stay the same.

The conversion is exact: PEFT's ``lora_B`` (out × r) holds an adapted q, k or v projection's rows in head order, so a
head switched off is a block of zero rows; for o it is a block of zero columns of ``lora_A``. k-bit adapters are
written as the decoded float values the forward uses. Reading goes the other way: every LoRA pair becomes one
heartlora projection, PEFT's per-module scaling folded into B where it differs from the common one, smaller ranks
padded with zeros; what it cannot convert exactly (another saved module, an init that rewrites the base weights, a
LoraConfig field it does not know, a tensor of another shape than the model's) is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from heartlora._paths import atomic_path
from heartlora.backbones import create_backbone, list_backbones, refuse_download
from heartlora.backbones.hf_family import HFClassifier
from heartlora.data import get_task
from heartlora.engine import load_trained
from heartlora.engine.inference import RUN_KEY
from heartlora.engine.metrics import predict_logits
from heartlora.errors import AdapterFileError, ConfigError, UnsupportedBackboneError
from heartlora.method import (
    HeartLoRAConfig,
    ResponsivenessTracker,
    adapter_config,
    attach,
    attention_layers,
    deactivate_heads,
    head_masks,
    save_adapter,
)
from heartlora.method.auto_ne import HELDOUT_IMAGES
from heartlora.method.heads_off import parse_heads_off, switch_off
from heartlora.method.layer import HeadLoRALinear, HeadLoRAProjection
from heartlora.method.layouts import scan_attention
from heartlora.method.model import attach_state, evaluating
from heartlora.method.storage import MAX_RANK

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
# transformers model class (heartlora's backbone) → the image classifier PEFT loads the folder into, the attribute
# that holds the inner model, and what its classifier reads.
HF_CLASSIFIERS = {"ViTModel": ("ViTForImageClassification", "cls"),
                  "Dinov2Model": ("Dinov2ForImageClassification", "cls+mean")}


def _need_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ConfigError("PEFT folders need the peft package: pip install 'peft>=0.13.2' (heartlora's peft "
                          "extra)") from e
    return peft


@dataclass
class PeftExport:
    """What :func:`export_peft` wrote: the folder, the class to load it into, and the LoRA bytes (float32)."""

    path: str
    model_class: str
    lora_bytes: int
    heads_on: int
    heads_total: int


def _hf_target(root: nn.Module) -> tuple[str, str, str]:
    """(ForImageClassification class name, its inner-model attribute, its pooling) for heartlora's classifier."""
    backbone = getattr(root, "backbone", None)
    kind = type(backbone).__name__
    if not isinstance(root, HFClassifier) and hasattr(root, "config") and hasattr(root, "base_model_prefix"):
        raise UnsupportedBackboneError(
            f"PEFT export reads the Hugging Face models heartlora builds (hl.create_backbone('hf:DIR'), or heartlora "
            f"train --backbone hf:DIR), whose classifier layout it knows; this {type(root).__name__} was attached "
            "directly: keep the heartlora adapter file (save_adapter), or build the backbone with create_backbone")
    if not isinstance(root, HFClassifier) or kind not in HF_CLASSIFIERS:
        name = getattr(root, "spec", {}).get("name", type(root).__name__)
        raise UnsupportedBackboneError(
            f"PEFT export is for Hugging Face ViT / DINOv2 backbones (separate q/k/v/o Linears in a transformers "
            f"*ForImageClassification model); {name!r} ({kind or type(root).__name__}) has no such transformers "
            f"class to load the folder into: keep the heartlora adapter file")
    cls_name, pool = HF_CLASSIFIERS[kind]
    return cls_name, backbone.base_model_prefix, pool


def _full_factors(proj: HeadLoRAProjection) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A r×in, B out×r) for one projection: the active heads' factor scattered to its rows (q, k, v) or
    columns (o) of the Linear, zeros for heads that are off; the values the forward uses (decoded for k-bit)."""
    r = proj.rank
    a_full = torch.zeros(r, proj.in_features)
    b_full = torch.zeros(proj.out_features, r)
    heads = proj.active_heads()
    if not heads:
        return a_full, b_full
    with torch.no_grad():
        a, b = (t.detach().float().cpu() for t in proj.effective_weights())
    rows = proj.index[heads].reshape(-1).cpu()
    if proj.per_head_is_B:
        a_full.copy_(a)
        b_full[rows] = b
    else:
        a_full[:, rows] = a
        b_full.copy_(b)
    return a_full, b_full


def _load_model(source: str | os.PathLike | nn.Module) -> nn.Module:
    if isinstance(source, nn.Module):
        return source

    path = Path(source)
    path = path / "adapter.safetensors" if path.is_dir() else path
    model, info = load_trained(path, "cpu")
    if info["kind"] != "adapter":
        raise ConfigError(f"{path} holds plain weights (method {info['run'].get('method')}), not a LoRA adapter: "
                          "only heartlora adapters export to PEFT")
    return model


def export_peft(source: str | os.PathLike | nn.Module, out_dir: str | os.PathLike) -> PeftExport:
    """Write a heartlora adapter (a file, a run folder or an adapted model) as a PEFT LoRA folder for the backbone's
    transformers image classifier (``PeftExport.model_class``). Refuses, in one line, a backbone without one."""
    _need_peft()
    model = _load_model(source)
    root = getattr(model, "module", model)
    cls_name, prefix, pool = _hf_target(root)
    if root.pool != pool and not (pool == "cls+mean" and root.pool == "cls"):
        raise UnsupportedBackboneError(f"{cls_name} classifies the class token only; this adapter's head reads "
                                       f"{root.pool!r}: train with pool 'cls' to export it")
    tensors, targets = _lora_entries(root, lambda name: prefix + name[len("backbone"):])
    head = root.head
    w, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
    if root.pool == "cls" and pool == "cls+mean":  # the mean-patch half of the classifier's input is ignored
        w = torch.cat([w, torch.zeros_like(w)], dim=1)
    tensors[f"{PREFIX}classifier.weight"] = w.contiguous()
    tensors[f"{PREFIX}classifier.bias"] = bias.contiguous()
    saved = _saved_modules(model, root, prefix)
    for name, module in saved.items():
        tensors.update(_module_tensors(name, module))
    spec = root.spec
    # The heartlora entry lets `heartlora prune` rebuild the same backbone.
    out = _write_peft(out_dir, model, tensors, targets, ["classifier", *saved], spec["name"].removeprefix("hf:"),
                      {"heartlora_backbone": json.dumps(spec)})
    masks = head_masks(model)
    lora_bytes = sum(t.numel() * 4 for k, t in tensors.items() if ".lora_" in k)
    return PeftExport(str(out), cls_name, lora_bytes, sum(sum(m) for m in masks.values()),
                      sum(len(m) for m in masks.values()))


def _saved_modules(model: nn.Module, root: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """heartlora's saved modules other than the head (which becomes ``classifier``), under their names in the
    transformers classifier (``backbone.X`` → ``<prefix>.X``). Refuses, in one line, one that a PEFT saved module
    cannot hold exactly: outside the backbone, or holding (or inside) an adapted projection."""
    adapted = [n for n, m in root.named_modules() if isinstance(m, HeadLoRALinear)]
    saved = {}
    for name in attach_state(model).modules_to_save:
        if name == "head":
            continue
        lora = _overlapping(name, adapted)
        if not name.startswith("backbone.") or lora:
            why = f"it holds the LoRA of {lora}" if lora else "the transformers classifier has no such module"
            raise UnsupportedBackboneError(f"modules_to_save {name!r} cannot be written as a PEFT saved module ({why})"
                                           ": keep the heartlora adapter file, or train without saving it")
        saved[prefix + name[len("backbone"):]] = root.get_submodule(name)
    return saved


def _overlapping(name: str, adapted: Iterable[str]) -> str | None:
    """The first adapted projection (by name) that module ``name`` is, holds or sits inside, or None."""
    return next((a for a in sorted(adapted) if a == name or a.startswith(name + ".") or name.startswith(a + ".")),
                None)


def _module_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A saved module's state as PEFT stores it (``base_model.model.<name>.<key>``), floats as float32."""
    return {f"{PREFIX}{name}.{k}": (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in module.state_dict().items()}


def _lora_entries(root: nn.Module, rename: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's lora_A / lora_B tensors of every adapted Linear (``rename``: heartlora module name → PEFT's), and the
    target module names. Refuses, in one line, what PEFT's one LoRA pair per Linear cannot express."""
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for name, mod in root.named_modules():
        if not isinstance(mod, HeadLoRALinear):
            continue
        if len(mod.lora) != 1 or mod.mode != "forward":
            raise UnsupportedBackboneError(f"{name} computes {len(mod.lora)} projections or is read by weight: PEFT "
                                           "adds one LoRA pair in a Linear's forward")
        (proj,) = mod.lora.values()
        target = rename(name)
        a, b = _full_factors(proj)
        tensors[f"{PREFIX}{target}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{target}.lora_B.weight"] = b.contiguous()
        targets.append(target)
    return tensors, targets


def _write_peft(out_dir: str | os.PathLike, model: nn.Module, tensors: dict[str, torch.Tensor], targets: list[str],
                modules_to_save: list[str], base_ref: str | None, metadata: dict[str, str]) -> Path:
    """Write adapter_model.safetensors and adapter_config.json into ``out_dir``: both to temporary files first, then
    each renamed into place, so a failed write leaves the old pair, and a link in the folder is replaced, never
    written through. The config is PEFT's own JSON (``LoraConfig.save_pretrained``'s)."""
    peft = _need_peft()
    cfg = adapter_config(model)
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.scale * cfg.rank, lora_dropout=cfg.dropout,
                           target_modules=sorted(targets), modules_to_save=list(modules_to_save), bias="none",
                           base_model_name_or_path=base_ref, inference_mode=True)
    config = {k: sorted(v, key=str) if isinstance(v, set) else v for k, v in lora.to_dict().items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as weights_tmp, atomic_path(out / CONFIG_NAME) as config_tmp:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt", **metadata})  # PEFT reads "format"
        config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return out


def export_peft_transformers(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the adapter of a transformers model adapted directly (``heartlora.attach`` on a
    ``*ForImageClassification``) as a PEFT folder for that same class: target and saved-module names are the
    model's own. Used by :class:`heartlora.integrations.HeartLoRACallback` for the folders the Trainer saves."""
    root = getattr(model, "module", model)
    tensors, targets = _lora_entries(root, lambda name: name)
    saved = list(attach_state(model).modules_to_save)
    for name in saved:
        tensors.update(_module_tensors(name, root.get_submodule(name)))
    base_ref = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    return _write_peft(out_dir, model, tensors, targets, saved, base_ref, {})


# ---------------------------------------------------------------------------------------------------------------------
# Reading a PEFT folder


def read_peft(peft_dir: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor], dict[str, str]]:
    """(LoraConfig, tensors, safetensors metadata) of a PEFT LoRA folder, checked for what heartlora can express."""
    peft = _need_peft()
    d = Path(peft_dir)
    if not (d / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{d} has no {CONFIG_NAME}: name a folder written by PEFT's save_pretrained")
    if not (d / WEIGHTS_NAME).is_file():
        raise AdapterFileError(f"{d} has no {WEIGHTS_NAME}: save the PEFT adapter with safe_serialization=True")
    cfg, raw = _read_config(peft, d)
    why = None
    if str(getattr(cfg, "peft_type", "")).rsplit(".", 1)[-1] != "LORA":
        why = f"it is a {cfg.peft_type} adapter, not LoRA"
    elif getattr(cfg, "use_dora", False):
        why = "it uses DoRA (a magnitude vector per column)"
    elif getattr(cfg, "bias", "none") != "none" or getattr(cfg, "lora_bias", False):
        why = "it trains biases"
    elif getattr(cfg, "fan_in_fan_out", False):
        why = "it is for Conv1D (fan_in_fan_out) layers"
    elif getattr(cfg, "alpha_pattern", None):
        why = "it sets lora_alpha per module (alpha_pattern)"
    else:
        why = _unconverted_setting(cfg, raw, peft.__version__)
    if why:
        raise ConfigError(f"{d}: heartlora cannot convert this adapter exactly: {why}")
    try:
        with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise AdapterFileError(f"{d / WEIGHTS_NAME} is not a readable safetensors file ({_first_line(exc)}): save "
                               "the adapter again with PEFT's save_pretrained") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(f"{d / WEIGHTS_NAME}: tensor {bad[0]} holds NaN or infinite values; the folder is "
                               "damaged: save the adapter again")
    return cfg, tensors, meta


# LoraConfig fields whose every value heartlora converts exactly (those with a rule of their own are checked in
# _unconverted_setting): the LoRA arithmetic (r, lora_alpha, rsLoRA, ranks per module), which modules carry it (the
# tensors say it too), dropout (off in inference), facts about the folder. Every other field must keep LoraConfig's
# default: a setting heartlora does not know (layer_replication, trainable_token_indices, a newer PEFT's) may change
# what PEFT computes.
CONVERTED_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern",
                    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "target_parameters",
                    "runtime_config", "init_lora_weights", "eva_config", "modules_to_save"}
# Defaults, other than None / False / empty, of fields newer than the oldest peft heartlora supports: a folder that
# a newer PEFT wrote holds them, and an older peft does not know them.
LATER_DEFAULTS = {"qalora_group_size": 16}
# init_lora_weights values that only choose the starting A and B (EVA: from activations; the base weights stay).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Inits that rewrite the base weights, which PEFT's save_pretrained can turn into a LoRA on the original weights.
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")
# The classifier's root name among the saved modules: the transformers name or heartlora's. (Entries of
# modules_to_save that save nothing, such as the "score" PEFT's SEQ_CLS model adds, are left alone: the tensors say
# what was saved.)
CLASSIFIERS = ("classifier", "head")


def _unconverted_setting(cfg: Any, raw: dict[str, Any], version: str) -> str | None:
    """Why a LoRA config holds a setting heartlora cannot convert exactly (with what to do), or None."""
    init = getattr(cfg, "init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
        if isinstance(init, str) and init.startswith(CONVERTIBLE_INITS):
            return (f"init_lora_weights={init!r} makes PEFT rewrite the base weights, heartlora adds LoRA to the "
                    "original ones: save it with PEFT's save_pretrained(DIR, "
                    "path_initial_model_for_weight_conversion=INIT_DIR), a plain LoRA, and import that")
        return (f"init_lora_weights={_shown(init)} is not an initialisation heartlora converts (LoftQ rewrites the "
                "base weights): import an adapter trained with init_lora_weights=True")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name, f in fields.items():
        if name in CONVERTED_FIELDS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, name, default)
        if value != default:
            return (f"it sets {name}={_shown(value)} (default {_shown(default)}), which heartlora does not "
                    f"convert: train the adapter without {name}")
    unknown = [k for k, v in raw.items() if k not in fields and v not in (None, False, [], {}, "")
               and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])]
    if unknown:
        return (f"it sets {unknown[0]}={_shown(raw[unknown[0]])}, which the installed peft {version} does not "
                "know (a newer PEFT wrote it): upgrade peft, or save the adapter with this one")
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What a PEFT folder cannot prove about itself: it carries no checksum, so a value changed to another legal value
# (lora_alpha doubled, a weight edited to another finite number) reads as that value. prune names these.
UNCHECKED = "lora_alpha, lora_dropout and the values of the weights (a PEFT folder carries no checksum)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:100] if text else type(exc).__name__)


def _read_config(peft: Any, d: Path) -> tuple[Any, dict[str, Any]]:
    """adapter_config.json as PEFT reads it, with its numbers checked (r, lora_alpha, lora_dropout), and as JSON:
    one line for a file that is not JSON, not a PEFT config, or holds a value no LoRA adapter has."""
    path = d / CONFIG_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{path} cannot be read ({_first_line(exc)}): save the adapter again with PEFT's "
                               "save_pretrained") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(raw).__name__}, not a PEFT config: save the adapter again")
    try:
        cfg = peft.PeftConfig.from_pretrained(str(d))
    except Exception as exc:  # PEFT raises many kinds (TypeError, ValueError, KeyError) for a config it cannot use
        newer = isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc)  # an older peft's LoraConfig
        advice = (f"a newer PEFT wrote it: upgrade peft (installed {peft.__version__})" if newer else
                  "save the adapter again with PEFT's save_pretrained")
        raise AdapterFileError(f"{path} is not a config PEFT can read ({type(exc).__name__}: {_first_line(exc)}): "
                               f"{advice}") from None
    r, alpha = getattr(cfg, "r", None), getattr(cfg, "lora_alpha", None)
    dropout = getattr(cfg, "lora_dropout", 0.0) or 0.0
    ok = (type(r) is int and 1 <= r <= MAX_RANK and isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
          and math.isfinite(alpha) and alpha > 0 and isinstance(dropout, (int, float)) and 0 <= dropout < 1)
    if str(getattr(cfg, "peft_type", "")).rsplit(".", 1)[-1] == "LORA" and not ok:
        raise AdapterFileError(f"{path}: r {r!r}, lora_alpha {alpha!r} or lora_dropout {dropout!r} is not a LoRA "
                               f"setting (r from 1 to {MAX_RANK}, lora_alpha a finite number > 0, lora_dropout in "
                               "[0, 1)): the folder is damaged")
    return cfg, raw


def _pairs(tensors: dict[str, torch.Tensor], where: Any) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                  dict[str, torch.Tensor]]:
    """{module name: (A, B)} and the other (saved-module) tensors, names without PEFT's prefix. The factors' shapes
    are checked against the model's projections later (:func:`_check_factors`)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        for factor in ("lora_A", "lora_B"):
            tail = f".{factor}.weight"
            if name.endswith(tail):
                pairs.setdefault(name[:-len(tail)], {})[factor] = t
                break
        else:
            if ".lora_" in name:
                raise ConfigError(f"{where}: tensor {key} is not a plain LoRA factor (embedding or magnitude "
                                  "vector): heartlora cannot convert it")
            rest[name] = t
    broken = [n for n, p in pairs.items() if set(p) != {"lora_A", "lora_B"}]
    if broken:
        raise AdapterFileError(f"{where}: {broken[0]} has only one LoRA factor; the folder is damaged")
    for n, p in pairs.items():
        a, b = p["lora_A"], p["lora_B"]
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterFileError(f"{where}: the LoRA factors of {n} are {a.dtype} and {b.dtype}, not floating "
                                   "point; the folder is damaged")
    return {n: (p["lora_A"].float(), p["lora_B"].float()) for n, p in pairs.items()}, rest


def _key(tensors: dict[str, torch.Tensor], name: str) -> str:
    """The file's key of a tensor named without PEFT's prefix."""
    return name if name in tensors and PREFIX + name not in tensors else PREFIX + name


def _classifier(rest: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                where: Any) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """The saved classifier (modules_to_save): its root name (``classifier`` or heartlora's ``head``) and tensors."""
    for name in CLASSIFIERS:
        w = rest.get(f"{name}.weight")
        if w is None:
            continue
        if w.dim() != 2 or not w.is_floating_point():
            raise AdapterFileError(f"{where}: tensor {_key(tensors, name + '.weight')} has shape {tuple(w.shape)} "
                                   f"({w.dtype}), expected (classes, features) floats; the folder is damaged")
        return name, w.float(), rest.get(f"{name}.bias")
    raise ConfigError(f"{where} stores no classifier (modules_to_save=['classifier']): heartlora needs the trained "
                      "classifier to score heads; save the adapter with its classifier")


def _saved_modules_of(where: Any, tensors: dict[str, torch.Tensor], rest: dict[str, torch.Tensor], head: str,
                      prefix: str, modules: dict[str, nn.Module], adapted: set[str]) -> dict[str, dict[str, Any]]:
    """The saved modules besides the classifier (PEFT's modules_to_save: a layernorm, say), as heartlora module name
    → its state, each the whole state of that module at its shapes. Refused in one line: a tensor of a module this
    backbone does not have, of a module holding (or inside) an adapted projection, or a module saved in part."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in rest.items():
        if key in (f"{head}.weight", f"{head}.bias"):
            continue
        owner, _, leaf = key.rpartition(".")
        hl_name = "backbone" + owner[len(prefix):] if owner.startswith(prefix + ".") else None
        module = modules.get(hl_name) if hl_name else None
        own = {k: v for k, v in module.state_dict().items() if "." not in k} if module is not None else {}
        if leaf not in own:
            raise ConfigError(f"{where}: it saves {_key(tensors, key)}, which this backbone does not have: use the "
                              "backbone the adapter was trained on")
        lora = _overlapping(hl_name, adapted)
        if lora:
            raise ConfigError(f"{where}: it saves {owner} whole, and heartlora adapts {lora} there: save the adapter "
                              "without that module in modules_to_save")
        if tuple(t.shape) != tuple(own[leaf].shape) or t.is_floating_point() != own[leaf].is_floating_point():
            raise AdapterFileError(f"{where}: tensor {_key(tensors, key)} has shape {tuple(t.shape)} ({t.dtype}), "
                                   f"this backbone's {tuple(own[leaf].shape)} ({own[leaf].dtype}): the folder is "
                                   "damaged or for another backbone")
        states.setdefault(hl_name, {})[leaf] = t
    for hl_name, state in states.items():
        missing = sorted(k for k in modules[hl_name].state_dict() if "." not in k and k not in state)
        if missing:
            raise AdapterFileError(f"{where}: it saves {hl_name.removeprefix('backbone.')} without its {missing[0]}; "
                                   "the folder is damaged")
    return states


def _check_factors(where: Any, tensors: dict[str, torch.Tensor], name: str, a: torch.Tensor, b: torch.Tensor,
                   linear: nn.Module, r: int) -> None:
    """A must be (rank, in_features) and B (out_features, rank) of the projection: PEFT would refuse other shapes,
    and a broadcast would hide them."""
    if a.dim() == 2 and 1 <= a.shape[0] <= MAX_RANK:
        r = a.shape[0]
    for factor, t, shape in (("lora_A", a, (r, linear.in_features)), ("lora_B", b, (linear.out_features, r))):
        if tuple(t.shape) != shape:
            raise AdapterFileError(f"{where}: tensor {_key(tensors, f'{name}.{factor}.weight')} has shape "
                                   f"{tuple(t.shape)}, expected {shape} for a rank-{r} LoRA on this "
                                   f"{linear.in_features}→{linear.out_features} projection: the folder is damaged or "
                                   "for another backbone")


def _check_classifier(where: Any, tensors: dict[str, torch.Tensor], name: str, w: torch.Tensor,
                      b: torch.Tensor | None, head: nn.Module) -> None:
    """The classifier's weight must be the model head's shape, its bias (classes,) and present when the head has
    one (a missing bias would leave the head's random one)."""
    key_w, key_b = _key(tensors, f"{name}.weight"), _key(tensors, f"{name}.bias")
    if tuple(w.shape) != tuple(head.weight.shape):
        raise ConfigError(f"{where}: tensor {key_w} has shape {tuple(w.shape)}, this model's head "
                          f"{tuple(head.weight.shape)}: build the backbone with the adapter's number of classes and "
                          "pool")
    shape = (head.weight.shape[0],)
    if b is None and head.bias is not None:
        raise AdapterFileError(f"{where}: tensor {key_b} is missing, expected shape {shape} (the classifier's bias); "
                               "the folder is damaged: save the adapter again")
    if b is not None and head.bias is None:
        raise ConfigError(f"{where}: tensor {key_b} is a bias, and this model's head has none: build the backbone "
                          "with create_backbone")
    if b is not None and (tuple(b.shape) != shape or not b.is_floating_point()):
        raise AdapterFileError(f"{where}: tensor {key_b} has shape {tuple(b.shape)} ({b.dtype}), expected {shape} "
                               "floats; the folder is damaged")


def import_peft(peft_dir: str | os.PathLike, model: nn.Module | None = None, *, backbone: str | None = None,
                img_size: int | None = None, switch_off_zero_heads: bool = True) -> nn.Module:
    """A heartlora-adapted classifier with the PEFT LoRA adapter of ``peft_dir`` (same logits as PEFT's model).

    ``model``: a heartlora ``ImageClassifier`` without adapters (built from ``backbone``, default the folder's
    ``base_model_name_or_path``, when None; a backbone the folder names is never downloaded). The folder may be for
    the transformers image classifier (``vit.…``, ``dinov2.…``, ``classifier``) or for heartlora's own classifier
    (``backbone.…``, ``head``). Heads whose adapter weights are zero in every projection of their layer (a pruned
    export) are switched off. Other saved modules (PEFT's ``modules_to_save``: a layernorm, say) are loaded and kept
    as heartlora's ``modules_to_save``. Refused in one line: a saved module holding an adapted projection or unknown
    to this backbone, and tensors whose shapes are not the model's."""
    cfg, tensors, meta = read_peft(peft_dir)
    pairs, rest = _pairs(tensors, peft_dir)
    if not pairs:
        raise ConfigError(f"{peft_dir} has no LoRA factors")
    head_name, head_w, head_b = _classifier(rest, tensors, peft_dir)
    if model is None:
        model = _build_backbone(cfg, meta, backbone, img_size, head_w, peft_dir)
    root = getattr(model, "module", model)
    inner = getattr(root, "backbone", None)
    prefix = "backbone" if head_name == "head" else getattr(inner, "base_model_prefix", "")
    if root.pool == "cls" and head_w.shape[1] == 2 * root.num_features and prefix != "backbone":
        raise ConfigError(f"{peft_dir}: its classifier reads 2×{root.num_features} features (class token and mean "
                          "patch token): build the backbone with pool='cls+mean'")
    modules = dict(root.named_modules())
    found: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in pairs.items():
        if not name.startswith(prefix + "."):
            raise ConfigError(f"{peft_dir}: LoRA on {name}, outside the {prefix!r} model this backbone provides")
        hl_name = "backbone" + name[len(prefix):]
        if hl_name not in modules:
            raise ConfigError(f"{peft_dir}: LoRA on {name}, which this backbone does not have: use the backbone the "
                              "adapter was trained on")
        found[hl_name] = (name, a, b)
    targets = _targets(model, set(found), peft_dir)
    for hl_name, (name, a, b) in found.items():
        _check_factors(peft_dir, tensors, name, a, b, modules[hl_name], cfg.r)
    ranks = {a.shape[0] for _, a, _ in found.values()}
    if not getattr(cfg, "rank_pattern", None) and ranks != {cfg.r}:
        shown = sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)
        raise AdapterFileError(f"{peft_dir}: its LoRA factors have rank {shown}, its {CONFIG_NAME} says r={cfg.r}; "
                               "the folder is damaged")
    _check_classifier(peft_dir, tensors, head_name, head_w, head_b, root.head)
    saved = _saved_modules_of(peft_dir, tensors, rest, head_name, prefix, modules, set(found))
    mapped = {hl_name: (a, b, _scaling(cfg, a.shape[0])) for hl_name, (_, a, b) in found.items()}
    scalings = {s for _, _, s in mapped.values()}
    scale = scalings.pop() if len(scalings) == 1 else 1.0
    rank = max(a.shape[0] for a, _, _ in mapped.values())
    model = attach(model, HeartLoRAConfig(targets=targets, rank=rank, scale=scale,
                                          dropout=float(getattr(cfg, "lora_dropout", 0.0) or 0.0),
                                          modules_to_save=("head", *sorted(saved)) if saved else None))
    _fill(model, mapped, scale, rank)
    with torch.no_grad():
        root.head.weight.copy_(head_w)
        if head_b is not None:
            root.head.bias.copy_(head_b.float())
        for hl_name, state in saved.items():  # what PEFT's saved copy holds replaces the base model's
            own = modules[hl_name].state_dict()
            modules[hl_name].load_state_dict({k: state.get(k, v).to(v.dtype) for k, v in own.items()})
    if switch_off_zero_heads:
        zero = [(layer.name, h) for layer in attention_layers(model) for h, on in enumerate(layer.head_mask()) if on
                and all(not bool(p.head_weights(h).any()) for p in layer.projections.values())]
        if zero and len(zero) < sum(layer.num_heads for layer in attention_layers(model)):
            deactivate_heads(model, heads=zero)
    return model


def _scaling(cfg: Any, r: int) -> float:
    alpha = float(cfg.lora_alpha)
    return alpha / math.sqrt(r) if getattr(cfg, "use_rslora", False) else alpha / r


def _targets(model: nn.Module, adapted: set[str], where: Any) -> tuple[str, ...]:
    """Which of q, k, v, o the PEFT adapter covers, from a probe attach that only locates the projections."""
    found, _ = scan_attention(model)
    targets = set()
    located = set()
    root = getattr(model, "module", model)
    full = {id(m): n for n, m in root.named_modules()}
    for _, layout, module, parent, attr in found:
        _, sites = layout.describe(module, parent, attr)
        for target, site in sites.sites.items():
            name = full[id(getattr(site.parent, site.attr))]
            located.add(name)
            if name in adapted:
                targets.add(target)
    stray = sorted(adapted - located)
    if stray:
        raise ConfigError(f"{where}: LoRA on {stray[0]}, which is not an attention projection: heartlora adapts "
                          "attention q, k, v, o only")
    return tuple(t for t in ("q", "k", "v", "o") if t in targets)


def _fill(model: nn.Module, mapped: dict[str, tuple[torch.Tensor, torch.Tensor, float]], scale: float,
          rank: int) -> None:
    """Copy each LoRA pair into its heartlora projection (rank padded with zeros, scaling folded into B); the
    projections PEFT did not adapt get zero factors (no change to the output)."""
    root = getattr(model, "module", model)
    with torch.no_grad():
        for name, mod in root.named_modules():
            if not isinstance(mod, HeadLoRALinear):
                continue
            (proj,) = mod.lora.values()
            a_full = torch.zeros(rank, proj.in_features)
            b_full = torch.zeros(proj.out_features, rank)
            if name in mapped:
                a, b, s = mapped[name]
                a_full[:a.shape[0]] = a
                b_full[:, :b.shape[1]] = b if s == scale else b * (s / scale)
            rows = proj.index[proj.active_heads()].reshape(-1).cpu()
            if proj.per_head_is_B:
                proj.lora_A.copy_(a_full)
                proj.lora_B.copy_(b_full[rows])
            else:
                proj.lora_A.copy_(a_full[:, rows])
                proj.lora_B.copy_(b_full)


def _build_backbone(cfg: Any, meta: dict[str, str], backbone: str | None, img_size: int | None,
                    head_w: torch.Tensor, where: Any) -> nn.Module:
    spec: dict[str, Any] = {}
    if meta.get("heartlora_backbone"):
        try:
            spec = dict(json.loads(meta["heartlora_backbone"]))
        except ValueError:
            spec = {}
    name = backbone or spec.get("name") or getattr(cfg, "base_model_name_or_path", None)
    if not name:
        raise ConfigError(f"{where} names no base model (base_model_name_or_path): pass --backbone")

    shortcuts = {n for n, _ in list_backbones()}
    if backbone is None and name not in shortcuts and not name.startswith("hf:") and not Path(name).is_dir():
        name = f"hf:{name}"  # a hub id, as PEFT records it
    if backbone is None:  # a folder never makes heartlora reach the network; the user's --backbone may
        refuse_download(name, True, str(where))
    spec.update(name=name, num_classes=int(head_w.shape[0]))
    if img_size:
        spec["img_size"] = int(img_size)
    model = create_backbone(**{k: spec[k] for k in ("name", "num_classes", "img_size", "drop_path") if k in spec})
    if head_w.shape[1] == 2 * model.num_features and model.pool == "cls":
        spec["pool"] = "cls+mean"
        model = create_backbone(**{k: spec[k] for k in ("name", "num_classes", "img_size", "pool", "drop_path")
                                   if k in spec})
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and pruning


def score_heads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], mode: str = "abs_sum",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Taylor responsiveness of every head from one forward and backward per batch (images in [0, 1]); no weight
    changes. The model is in eval mode meanwhile (no dropout), gradients are cleared afterwards. ``mode`` is the
    tracker's (``abs_sum``, ``sum_abs``, or ``random``: the control, a uniform score per head drawn from ``seed``,
    with no pass over the batches)."""
    tracker = ResponsivenessTracker(model, mode=mode, seed=seed)
    if mode == "random":
        return tracker.scores()
    with evaluating(model):
        for x, y in batches:
            with torch.enable_grad():
                F.cross_entropy(model(x), y).backward()
            tracker.update()
            model.zero_grad(set_to_none=True)
    return tracker.scores()


# score_and_prune's and prune_peft's names of the heads-off settings (parse_heads_off's errors use them)
PRUNE_NAMES = {"ne_tolerance": "tolerance"}


def score_and_prune(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], ne: int | str = "auto",
                    heldout: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                    scope: str = "global", mode: str = "abs_sum", seed: int = 0,
                    tolerance: float | None = None) -> dict[str, Any]:
    """Score heads on ``batches`` and switch off ``ne`` of them (``"auto"``: :func:`choose_ne` on ``heldout``
    training batches, at ``tolerance``, else its default). ``mode="random"`` switches off a random set drawn from
    ``seed`` instead (a control).
    Returns the scores, the heads switched off, the count (None where layers of uneven head counts lost uneven
    counts: ``NeChoice.ne``) and the ne choice."""
    if not batches:
        raise ConfigError("scoring needs at least one batch of training images")
    rule = parse_heads_off(ne, tolerance=tolerance, names=PRUNE_NAMES)
    scores = score_heads(model, batches, mode=mode, seed=seed)
    if rule.auto and not heldout:
        raise ConfigError("ne='auto' needs batches of training images held out from scoring: pass heldout= or "
                          "a number for ne")
    off, choice = switch_off(model, scores, rule, scope=scope, heldout=heldout, names=PRUNE_NAMES)
    count = choice.ne if choice is not None else rule.ne
    return {"scores": {k: v.tolist() for k, v in scores.items()}, "heads_off": off,
            "ne": None if count is None else int(count),
            "ne_choice": choice.to_dict() if choice else None}


def prune_peft(peft_dir: str | os.PathLike, task: str, ne: int | str = "auto", *, batches: int = 8,
               batch_size: int = 32, split: str = "val200", out: str | os.PathLike | None = None,
               peft_out: str | os.PathLike | None = None, backbone: str | None = None, img_size: int | None = None,
               scope: str = "global", heldout_images: int = HELDOUT_IMAGES, seed: int = 0, score_mode: str = "abs_sum",
               score_seed: int | None = None, tolerance: float | None = None) -> dict[str, Any]:
    """Import a PEFT LoRA adapter, score its heads on ``batches`` batches of ``task``'s training split, switch off
    the least responsive, and report accuracy on ``split`` before and after. Writes a heartlora adapter to ``out``
    and, when asked, a PEFT folder to ``peft_out``. ``seed`` samples the scoring and held-out images (and a few-shot
    task's split: keep the adapter's training seed); ``score_mode="random"`` ranks the heads at random instead, drawn
    from ``score_seed`` (else ``seed``): with a number for ``ne``, the control that says whether the Taylor ranking
    beats chance at the same count (with ``"auto"``, the count is chosen for the random ranking). ``tolerance``:
    ``ne="auto"``'s (:func:`choose_ne`; relative to the training loss, which a converged adapter has near 0)."""
    rule = parse_heads_off(ne, tolerance=tolerance, names=PRUNE_NAMES)  # before any time is spent
    t = get_task(task)
    model = import_peft(peft_dir, backbone=backbone, img_size=img_size)
    root = getattr(model, "module", model)
    if t.num_classes != root.spec["num_classes"]:
        raise ConfigError(f"task {t.name} has {t.num_classes} classes, the adapter's classifier "
                          f"{root.spec['num_classes']}: prune on the task it was trained for")
    size = root.img_size
    train_x, train_y = t.load("train800", img_size=size, seed=seed)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_score = min(batches * batch_size, len(order))
    score_idx, held_idx = order[:n_score], order[n_score:n_score + heldout_images]
    if rule.auto and not len(held_idx):  # every image went to scoring: decide on a fixed sample of them
        held_idx = order[:heldout_images]

    def to_batches(idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(train_x[i].float().div(255.0), train_y[i]) for i in idx.split(batch_size)]

    eval_x, eval_y = t.load(split, img_size=size, seed=seed)

    def acc() -> float:
        return float((predict_logits(model, eval_x, torch.device("cpu"), 128).argmax(1) == eval_y).float().mean())

    before = acc()
    heads_on_before = sum(sum(m) for m in head_masks(model).values())  # heads already off: all-zero rows in the file
    result = score_and_prune(model, to_batches(score_idx), ne, heldout=to_batches(held_idx), scope=scope,
                             mode=score_mode, seed=seed if score_seed is None else score_seed, tolerance=tolerance)
    after = acc()
    _, tensors, _ = read_peft(peft_dir)
    peft_bytes = sum(v.numel() * v.element_size() for k, v in tensors.items() if ".lora_" in k)
    result.update(task=t.name, split=split, images=len(eval_y), accuracy_before=before, accuracy_after=after,
                  unchecked=UNCHECKED,
                  heads_total=sum(layer.num_heads for layer in attention_layers(model)), peft_lora_bytes=peft_bytes,
                  scoring_images=0 if score_mode == "random" else int(n_score), score_mode=score_mode, seed=seed,
                  score_seed=seed if score_seed is None else score_seed,
                  heads_on_before=heads_on_before,
                  heads_on=sum(sum(m) for m in head_masks(model).values()))
    if out is not None:
        run = {"task": t.name, "method": "peft-lora, heads pruned by heartlora", "img_size": size,
               "class_names": list(getattr(t, "class_names", []) or []), "backbone_spec": root.spec,
               "pretrained": True, "init_seed": seed}  # eval's default sample of a few-shot task
        if len(run["class_names"]) != root.spec["num_classes"]:
            run["class_names"] = []
        report = save_adapter(model, out, extra_metadata={RUN_KEY: run})
        result.update(out=str(out), adapter_bytes=report.adapter_bytes, file_bytes=report.file_bytes)
    if peft_out is not None:
        exp = export_peft(model, peft_out)
        result.update(peft_out=exp.path, peft_model_class=exp.model_class)
    result["model"] = model
    return result
