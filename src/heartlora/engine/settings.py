"""What a training run depends on: ``TrainConfig``, its defaults, and ``resolve`` (defaults filled in and checked).

The dataclass is the one source of the settings: ``heartlora train``'s flags, their help and their defaults are
generated from its fields (``heartlora.cli.common.add_config_flags``), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heartlora._paths import atomic_path
from heartlora.data import get_task
from heartlora.engine.training_methods import get_method, method_names
from heartlora.errors import ConfigError, SettingError
from heartlora.method.auto_ne import DEFAULT_TOLERANCE
from heartlora.method.config import FLOAT_BITS, TARGETS, HeartLoRAConfig
from heartlora.method.heads_off import parse_heads_off, parse_ne
from heartlora.method.storage import MAX_IMG_SIZE, MAX_RANK, store_dtype

# Defaults per profile. "paper" is the VTAB-1K protocol of the reference code (docs/METHOD.md §5); "cpu" fits a
# 2-core machine.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"img_size": 224, "epochs": 100, "batch_size": 64},
    "cpu": {"img_size": 112, "epochs": 10, "batch_size": 32},
}
# The heads-off settings (ne, ne_fraction, ne_tolerance, ne_refine) are parsed and checked by
# heartlora.method.heads_off, which holds their defaults: without a count or a share, the count is chosen at the end
# of warmup on a fixed sample of training images (heartlora.method.auto_ne, docs/METHOD.md §3).
# A K-shot run trains for at least this many optimizer steps (its epochs are raised when the profile's epochs give
# fewer): 4 shots of 10 classes in batches of 32 are 2 steps an epoch, 20 steps in 10 epochs, too few to learn.
MIN_FEWSHOT_STEPS = 100
WARMUP_SHARE = 0.1  # warmup epochs = 10 % of the epochs, as 10 of 100 in the paper
PROTOCOLS = {"val": ("train800", "val200"), "final": ("train800val200", "test")}
PRECISIONS = ("auto", "bf16", "fp16", "tf32", "fp32")
# the help of two flags every command shares, so that train and the others say the same
QUIET_HELP = "print only the results, notes and errors (no progress bars or banners)"
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: CUDA when present, else CPU)"


def _opt(default: Any = None, help: str = "", group: str = "run", default_text: str | None = None,
         choices: tuple[str, ...] | None = None, runtime: bool = False, flag: str | None = None,
         hidden: bool = False, fill: Any = None, recorded_unless_default: bool = False) -> Any:
    """A TrainConfig field with what the CLI needs to offer it. ``fill``: the default ``resolve`` puts in place of
    None (shown in the flag's help); ``runtime``: the setting never changes the result (a resumed run may differ);
    ``recorded_unless_default``: a setting added after runs were recorded is in ``settings()`` only when it is not its
    default, so that the runs made before it existed (their checkpoints, metrics.json and records) still match."""
    meta = {"help": help, "group": group, "choices": choices, "runtime": runtime, "flag": flag, "hidden": hidden,
            "fill": fill, "default_text": default_text, "recorded_unless_default": recorded_unless_default}
    return field(default=default, metadata=meta)


_ADAPTER = {f.name: f for f in dataclasses.fields(HeartLoRAConfig)}
# The adapter settings a run takes: HeartLoRAConfig declares them, their help and their defaults (the one source);
# here None means "HeartLoRAConfig's default for the method's bits".
ADAPTER_FIELDS = ("targets", "rank", "scale", "bits", "dropout")


def _adapter_opt(name: str, cli: str = "", default_text: str | None = None) -> Any:
    """A TrainConfig field for HeartLoRAConfig's setting ``name``, with its help (plus ``cli``) and its default."""
    f = _ADAPTER[name]
    shown = f.metadata.get("default_text") or (",".join(f.default) if isinstance(f.default, tuple) else f.default)
    return _opt(help=f.metadata["help"] + cli, group="adapter", default_text=default_text or str(shown))


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the default of the profile / protocol / method" (see
    ``resolve``), so that flags given explicitly can be told apart from defaults."""

    task: str | None = _opt(help="task name (`heartlora data list`), vtab:/path/to/folder, or NAME@Kshot",
                            group="what to train")
    method: str | None = _opt(help="training method", group="what to train", fill="heart-lora")
    backbone: str | None = _opt(help="timm name, hf:<id or dir>, or a shortcut", group="what to train",
                                fill="dinov2_small")
    pretrained: bool | None = _opt(help="random backbone weights (tests, architecture checks)", group="what to train",
                                   flag="--no-pretrained", fill=True)
    pool: str | None = _opt(help="classifier input: the class token (cls), class token and mean patch token "
                                 "(cls+mean), a timm model's own pre-logits feature (own), or the backbone family's "
                                 "own convention (auto: cls+mean for DINOv2, own for timm's BEiT and EVA-02, cls for "
                                 "the others)", group="what to train", choices=("auto", "cls", "cls+mean", "own"),
                            fill="auto")
    targets: tuple[str, ...] | None = _adapter_opt("targets", cli=", comma-separated")
    rank: int | None = _adapter_opt("rank")
    scale: float | None = _adapter_opt("scale")
    bits: int | None = _adapter_opt("bits", default_text="1 for *bi-lora, else 32")
    dropout: float | None = _adapter_opt("dropout")
    ne: int | str | None = _opt(help="attention heads to switch off after warmup (heart-*): a count, or auto (the "
                                     "largest share whose switch-off does not raise the loss on sampled training "
                                     "images by more than --ne-tolerance)", group="adapter", default_text="auto")
    ne_fraction: float | None = _opt(help="share of attention heads to switch off instead of --ne", group="adapter")
    ne_tolerance: float | None = _opt(help="--ne auto: the relative loss increase on sampled training images a "
                                           "share of heads may cost", group="adapter",
                                      default_text=f"{DEFAULT_TOLERANCE:g}")
    ne_refine: bool | None = _opt(help="--ne auto: do not try the share of heads halfway between the first share "
                                       "that fails and the last that passed (on by default: one more forward pass "
                                       "that can switch off 6 more of DINOv2-S's heads; "
                                       "docs/research/sweeps/ne_refine.md)",
                                  group="adapter", flag="--no-ne-refine")
    scope: str | None = _opt(help="rank attention heads over the model or per layer", group="adapter",
                             choices=("global", "layer"), fill="global",
                             default_text="global; layer for heart-lora-layer")
    score_mode: str | None = _opt(help="responsiveness: |Σ θ·g| per head (abs_sum) or Σ |θ·g| (sum_abs); random: a "
                                       "control, a seeded random ranking (what the Taylor score adds over chance)",
                                  group="adapter", choices=("abs_sum", "sum_abs", "random"), fill="abs_sum")
    score_ema: float | None = _opt(help="responsiveness as an exponential moving average with this decay in [0, 1) "
                                        "instead of the running sum", group="adapter", default_text="the running sum")
    score_steps: int | None = _opt(help="heart-*: score heads over the first N optimizer steps, then switch them off "
                                        "(instead of over the whole warmup epochs; the LR schedule is unchanged)",
                                   group="adapter", default_text="the warmup epochs' steps")
    score_restart: bool | None = _opt(help="with --score-steps: after the probe, train from the step-0 weights, "
                                           "optimizer and schedule with those heads off (the probe costs N steps)",
                                      group="adapter", fill=False)
    profile: str | None = _opt(help="default schedule", group="schedule", choices=tuple(PROFILES), fill="paper",
                               default_text="paper: 224 px, 100 epochs, batch 64; cpu: 112 px, 10 epochs, batch 32; "
                                            "flags given explicitly win")
    epochs: int | None = _opt(help="training epochs", group="schedule", default_text="the profile's")
    warmup_epochs: int | None = _opt(help="LR warmup = responsiveness scoring", group="schedule",
                                     default_text="10%% of epochs")
    lr: float | None = _opt(help="AdamW learning rate", group="schedule", fill=1e-3)
    min_lr_ratio: float | None = _opt(help="the cosine schedule ends at this share of --lr", group="schedule",
                                      fill=0.01)
    weight_decay: float | None = _opt(help="AdamW weight decay", group="schedule", fill=1e-4)
    batch_size: int | None = _opt(help="global batch (split over ranks under torchrun)", group="schedule",
                                  default_text="the profile's")
    img_size: int | None = _opt(help="image side in pixels", group="schedule", default_text="the profile's")
    drop_path: float | None = _opt(help="stochastic depth rate", group="schedule", fill=0.0)
    seed: int | None = _opt(help="random seed (initialisation, data order, dropout)", group="schedule", fill=42)
    eval_every: int | None = _opt(help="epochs between val200 evaluations (protocol val)", group="schedule", fill=1)
    protocol: str | None = _opt(help="val: train800 → val200 (choose settings); final: train800val200 → test, once",
                                group="run", choices=tuple(PROTOCOLS), fill="val")
    precision: str | None = _opt(help="auto: bf16 autocast on CUDA GPUs that support it, else fp32; fp16 uses a "
                                      "gradient scaler; tf32: fp32 with TF32 matrix products on CUDA; adapter "
                                      "weights and optimizer state stay fp32",
                                 group="run", choices=PRECISIONS, fill="auto")
    save_dtype: str | None = _opt(help="store the adapter's values as float32, float16 or bfloat16 (fp32, fp16, bf16; "
                                       "fp16 halves a float adapter's bytes); the accuracy reported is the stored "
                                       "adapter's, evaluated with its values rounded as the file holds them",
                                  group="run", fill="float32", recorded_unless_default=True)
    # Runtime only: never change the result.
    out: str | None = _opt(help="output folder", runtime=True, default_text="runs/<task>_<method>_<protocol>_s<seed>")
    resume: bool = _opt(False, help="continue the run in --out from its last checkpoint", runtime=True)
    overwrite: bool = _opt(False, help="replace the run files in --out", runtime=True)
    device: str = _opt("auto", help=DEVICE_HELP, runtime=True)
    threads: int | None = _opt(help="CPU threads of this process (1 is often faster on a busy machine)", runtime=True,
                               default_text="PyTorch's, split across torchrun ranks")
    compile: bool = _opt(False, help="run the model under torch.compile", runtime=True)
    progress: bool = _opt(True, help=QUIET_HELP, runtime=True, flag="--quiet")
    log_to: str | None = _opt(help="where to log every epoch, comma-separated from csv (metrics.csv), tensorboard "
                                   "(DIR/tensorboard, with the heads' scores), wandb, mlflow; the last three need "
                                   "their package", runtime=True, default_text="csv")
    # Testing aid: end after this epoch's checkpoint, as a kill would.
    stop_after_epoch: int | None = _opt(help="end after this epoch's checkpoint", runtime=True, hidden=True)
    notes: list[str] = field(default_factory=list, repr=False, metadata={"runtime": True, "hidden": True})

    def adapter_config(self) -> HeartLoRAConfig:
        """The adapter these settings attach (HeartLoRAConfig's defaults where none is given)."""
        return HeartLoRAConfig(**{k: getattr(self, k) for k in ADAPTER_FIELDS if getattr(self, k) is not None})

    def settings(self) -> dict[str, Any]:
        """The result-determining settings as a JSON-able dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("runtime")
             and not (f.metadata["recorded_unless_default"] and getattr(self, f.name) in (None, f.metadata["fill"]))}
        d["targets"] = list(d["targets"]) if d["targets"] is not None else None
        return d


# Settings that act only when a run finishes (the dtype its adapter is stored at, and evaluated at before that):
# a run that has not finished may be resumed with another value, which the run then records.
FINISH_ONLY = ("save_dtype",)
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("runtime"))
DEFAULTS: dict[str, Any] = {f.name: f.metadata["fill"] for f in dataclasses.fields(TrainConfig)
                            if f.metadata.get("fill") is not None}


FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag")}


def setting_error(template: str) -> SettingError:
    """An error about TrainConfig settings: ``{name}`` is the field in Python, the flag in the CLI."""
    return SettingError(template, flags=FLAGS)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``lo`` ≤ value ≤ ``hi`` (``lo`` < value with ``above``), finite."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    above: bool = False
    below: bool = False  # value < hi
    hint: str = ""
    only: tuple[int, ...] = ()  # when given, the only valid values (``hint`` then says which)

    def check(self, flag: str, value: Any) -> Any:
        """``value`` (a number, or the text of a flag) as ``kind``, or a one-line ConfigError naming ``flag``."""
        what = f"{flag} {value}"
        if isinstance(value, str):
            try:
                value = self.kind(value.strip()) if self.kind is int else float(value)
            except ValueError:
                raise ConfigError(f"{what} is not {'a whole number' if self.kind is int else 'a number'}"
                                  f"{self._want()}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int
                                                                              and not isinstance(value, int)):
            raise ConfigError(f"{what} is not {'a whole number' if self.kind is int else 'a number'}{self._want()}")
        if not math.isfinite(value):
            raise ConfigError(f"{what} is not a finite number{self._want()}")
        if ((self.lo is not None and (value <= self.lo if self.above else value < self.lo))
                or (self.hi is not None and (value >= self.hi if self.below else value > self.hi))
                or (self.only and value not in self.only)):
            raise ConfigError(f"{what} is out of range{self._want()}")
        return value

    def _want(self) -> str:
        if self.only:
            return f": give {self.hint}"

        def show(v: float) -> str:
            return str(int(v)) if self.kind is int or float(v).is_integer() else f"{v:g}"

        lo = None if self.lo is None else f"{'more than' if self.above else 'at least'} {show(self.lo)}"
        hi = None if self.hi is None else f"{'less than' if self.below else 'at most'} {show(self.hi)}"
        text = " and ".join(x for x in (lo, hi) if x)
        return (f": give {text}" if text else "") + (f" {self.hint}" if self.hint else "")


# The one definition of a valid numeric setting, for the writer and the readers alike: the CLI checks every flag
# with it as it parses, resolve() checks the API's TrainConfig with it, and the readers of a run's files
# (heartlora.engine.inference) check the same fields against it.
MAX_SEED = 2**63 - 1
RANGES: dict[str, Range] = {
    "rank": Range(int, 1, MAX_RANK), "scale": Range(float, 0, None, above=True),
    "bits": Range(int, 1, 32, only=(1, 2, 3, 4, 5, 6, 7, 8, 32), hint="32 (float) or 1 to 8 (quantized)"),
    "dropout": Range(float, 0, 1, below=True), "ne_fraction": Range(float, 0, 1), "ne_tolerance": Range(float, 0),
    "score_ema": Range(float, 0, 1, below=True), "score_steps": Range(int, 1), "epochs": Range(int, 1, 100_000),
    "warmup_epochs": Range(int, 0, 100_000), "lr": Range(float, 0, 10, above=True), "min_lr_ratio": Range(float, 0, 1),
    "weight_decay": Range(float, 0, 10), "batch_size": Range(int, 1, 1_000_000),
    "img_size": Range(int, 1, MAX_IMG_SIZE, hint="pixels"), "drop_path": Range(float, 0, 1, below=True),
    "seed": Range(int, 0, MAX_SEED), "eval_every": Range(int, 1), "threads": Range(int, 1, 4096),
    "stop_after_epoch": Range(int, 1),
}


def check_setting(name: str, value: Any) -> Any:
    """``value`` checked against ``RANGES[name]``: a one-line SettingError naming the field in Python and the flag
    in the CLI."""
    try:
        return RANGES[name].check("{" + name + "}", value)
    except SettingError:
        raise
    except ConfigError as exc:
        raise setting_error(str(exc)) from None


CONFIG_NAME = "config.yaml"  # a run's resolved settings, as `heartlora train --config FILE` reads them


def flag_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that decide a run's result, keyed by their ``heartlora train`` flag (without the dashes), as
    ``--config FILE`` reads them: a switch ``--no-X`` is written as ``no-X: true|false``, targets as ``q,v``, and a
    setting left to its default (None after ``resolve``) is left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.metadata.get("runtime") or f.metadata.get("hidden") or value is None:
            continue
        flag = (f.metadata.get("flag") or "--" + f.name.replace("_", "-"))[2:]
        if isinstance(value, bool) and flag.startswith("no-"):
            value = not value
        elif isinstance(value, tuple):
            value = ",".join(value)
        elif f.name in ("task", "backbone"):
            value = portable(value, bare_folder=f.name == "backbone")
        out[flag] = value
    return out


def portable(value: str, bare_folder: bool = False) -> str:
    """A ``vtab:`` or ``hf:`` value whose local path is relative, or (``bare_folder``: a backbone) a relative local
    model folder named bare (a directory with a config.json), with the path made absolute (a run's config.yaml
    repeats the run from any directory); a ``NAME@Kshot`` suffix is kept, and anything else (a task name, a hub id
    that is no local path) is returned as it is."""
    prefix = next((p for p in ("vtab:", "hf:") if value.startswith(p)), None)
    if prefix is None:
        if not bare_folder:
            return value
        bare = Path(value).expanduser()
        local = not bare.is_absolute() and bare.is_dir() and (bare / "config.json").is_file()
        return str(bare.resolve()) if local else value
    rest, shot = value[len(prefix):], ""
    if (m := re.search(r"@\d+shot$", rest)) is not None:
        rest, shot = rest[:m.start()], m.group()
    path = Path(rest).expanduser()
    if path.is_absolute() or not path.exists():
        return value
    return f"{prefix}{path.resolve()}{shot}"


def write_config_file(path: str | os.PathLike, settings: dict[str, Any], command: str = "train") -> None:
    """``settings`` (flag name → value) as a YAML file, written atomically, that ``--config`` reads back."""
    text = (f"# heartlora {command} --config {Path(path).name} repeats this run; flags given on the command line "
            "win (e.g. --out)\n" + yaml.safe_dump(settings, sort_keys=False, default_flow_style=False,
                                                   allow_unicode=True))
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def check_threads(threads: int | None) -> None:
    if threads is not None:
        check_setting("threads", threads)


def resolve(cfg: TrainConfig, saved: dict[str, Any] | None = None, unfinished: bool = False) -> TrainConfig:
    """A copy of ``cfg`` with every default filled in and checked, in named steps: the method's defaults (and the
    adapter's, from HeartLoRAConfig), the profile's, the checks, the few-shot floor, the warmup. With ``saved`` (a
    resumed run's settings) the saved values fill the gaps instead, and an explicit setting that disagrees with them
    is an error. Errors name the TrainConfig field (``SettingError``; the CLI shows the flag)."""
    if cfg.resume and cfg.overwrite:
        raise setting_error("{resume} and {overwrite} contradict each other: {resume} continues the run in {out}, "
                     "{overwrite} starts it again from the beginning; pass one of them")
    for name in RANGES:  # the API's values are checked as the CLI's flags are
        if getattr(cfg, name) is not None:
            check_setting(name, getattr(cfg, name))
    out = dataclasses.replace(cfg, notes=list(cfg.notes))
    if saved is not None:
        return _with_saved(cfg, out, saved, FINISH_ONLY if unfinished else ())
    method = _method_defaults(out)
    filled = _profile_defaults(out)
    _check(out, method)
    if "epochs" in filled:
        _few_shot_floor(out, keep_evaluations=cfg.eval_every is None)
    _warmup(out, method)
    return out


def _with_saved(cfg: TrainConfig, out: TrainConfig, saved: dict[str, Any], may_change: tuple[str, ...] = ()
                ) -> TrainConfig:
    """Resume: the saved settings fill ``out``; a setting given that disagrees with them is an error, except those
    of ``may_change`` (settings that act only when the run finishes, given to a run that has not), which replace
    the saved value."""
    given = {k: v for k, v in cfg.settings().items() if v is not None}
    # the command line gives strings and "auto"s; the saved settings hold resolved values
    if "ne" in given:
        given["ne"] = parse_ne(given["ne"])
    if cfg.save_dtype is not None:  # read from cfg: settings() leaves float32 out, and float32 may be what is asked
        given["save_dtype"] = _save_dtype(cfg.save_dtype)
    if isinstance(cfg.targets, str):
        given["targets"] = [t for t in re.split(r"[,\s]+", cfg.targets) if t]
    if "targets" in given and saved.get("targets") is not None:  # the same projections in any order: the same run
        given["targets"] = [t for t in TARGETS if t in given["targets"]]
        was = {**saved, "targets": [t for t in TARGETS if t in saved["targets"]]}
    else:
        was = saved
    if given.get("pool") == "auto":
        from heartlora.backbones import conventional_pool

        given["pool"] = conventional_pool(given.get("backbone", saved.get("backbone", "")))
    for k in ("task", "backbone"):  # a relative folder and its absolute path (as config.yaml writes it) agree
        if isinstance(given.get(k), str) and isinstance(was.get(k), str):
            bare = k == "backbone"
            given[k], was = portable(given[k], bare), {**was, k: portable(was[k], bare)}
    clash = {k: (v, was.get(k, DEFAULTS.get(k))) for k, v in given.items()
             if k not in may_change and _norm(v) != _norm(was.get(k, DEFAULTS.get(k)))}
    if clash:
        what = ", ".join(f"{{{k}}} {a} (run has {b})" for k, (a, b) in clash.items())
        # a setting of FINISH_ONLY clashes only with a finished run (an unfinished one may change it)
        done = (f"; the run has finished: `heartlora export {cfg.out} DIR --format heartlora --dtype …` stores its "
                "adapter at another dtype") if "save_dtype" in clash else ""
        raise setting_error(f"cannot resume with other settings: {what}; drop those, or start afresh with "
                            "{overwrite} or a new {out}" + done)
    for k, v in saved.items():
        if hasattr(out, k):
            setattr(out, k, tuple(v) if k == "targets" and v is not None else v)
    for k, v in DEFAULTS.items():  # settings added after the run was started keep their old behaviour
        if getattr(out, k) is None and k not in saved:
            setattr(out, k, v)
    for k in may_change:  # read from cfg: settings() leaves a default out, and float32 may be what is asked
        if getattr(cfg, k) is not None:
            setattr(out, k, getattr(cfg, k))
    if "save_dtype" in may_change and cfg.save_dtype is not None:  # a new value is checked as a new run's would be
        _check_save_dtype(out, get_method(out.method))
    out.save_dtype = _save_dtype(out.save_dtype)  # given again as fp32 to a run that recorded none: its name
    return out


def _method_defaults(out: TrainConfig) -> Any:
    """Step 1: the method and what it decides: the global and the method's defaults, the backbone's pool, the
    adapter (HeartLoRAConfig's defaults for the method's bits) and the heads-off rule. Returns the method."""
    if out.task is None:
        raise setting_error("no task given: set {task} (`heartlora data list` shows the task names)")
    if out.method is None:
        out.method = DEFAULTS["method"]
    if out.method not in method_names():
        raise setting_error(f"unknown {{method}} {out.method!r}: choose one of {', '.join(method_names())}")
    method = get_method(out.method)
    for k, v in {**DEFAULTS, **method.defaults}.items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    if out.pool == "auto":
        from heartlora.backbones import conventional_pool

        out.pool = conventional_pool(out.backbone)
    for k, v in method.forced.items():
        setattr(out, k, v)
    if out.bits is None:
        out.bits = method.bits
    if not method.adapters and out.bits != FLOAT_BITS:
        raise setting_error(f"{{bits}} applies to adapter methods only, not {out.method}")
    adapter = out.adapter_config()
    if out.scale is None and adapter.bits == 1 and method.bits != 1:  # a float method asked for 1-bit adapters
        out.notes.append(f"--bits 1: scale {adapter.scale:g}, the 1-bit adapters' default (--scale sets it "
                         "yourself)")
    for k in ADAPTER_FIELDS:
        setattr(out, k, getattr(adapter, k))
    if method.heart:
        rule = parse_heads_off(out.ne, out.ne_fraction, out.ne_tolerance, out.ne_refine)
        out.ne, out.ne_fraction, out.ne_tolerance, out.ne_refine = rule.ne, rule.fraction, rule.tolerance, rule.refine
    elif any(v is not None for v in (out.ne, out.ne_fraction, out.ne_tolerance, out.ne_refine)):
        heart = ", ".join(n for n in method_names() if get_method(n).heart)
        raise setting_error(f"{{ne}} and {{ne_fraction}} switch attention heads off: use a method that does ({heart}), "
                     f"not {out.method}")
    return method


def _profile_defaults(out: TrainConfig) -> list[str]:
    """Step 2: the profile's schedule where none is given; returns the settings it filled."""
    if out.profile not in PROFILES:
        raise setting_error(f"unknown {{profile}} {out.profile!r}: choose one of {', '.join(PROFILES)}")
    profile = PROFILES[out.profile]
    filled = [k for k, v in profile.items() if getattr(out, k) is None]
    for k in filled:
        setattr(out, k, profile[k])
    if out.profile != "paper" and filled:
        out.notes.append(f"profile {out.profile}: " + ", ".join(f"{k.replace('_', '-')} {profile[k]}" for k in filled))
    return filled


def _check(out: TrainConfig, method: Any) -> None:
    """Step 3: the settings that no default fixes, checked."""
    if out.protocol not in PROTOCOLS:
        raise setting_error(f"unknown {{protocol}} {out.protocol!r}: use val (train800 → val200) or final (→ test)")
    if out.precision not in PRECISIONS:
        raise setting_error(f"unknown {{precision}} {out.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if out.score_ema is not None and not (method.adapters and 0.0 <= out.score_ema < 1.0):
        raise setting_error(f"{{score_ema}} {out.score_ema} needs an adapter method and a decay in [0, 1)")
    if out.score_mode == "random" and (not method.heart or out.score_ema is not None):
        raise setting_error("{score_mode} random (a random ranking of the heads to switch off) needs a heart-* "
                            "method and no {score_ema} (it ignores the scores)")
    if out.score_steps is not None and (not method.heart or int(out.score_steps) < 1):
        raise setting_error(f"{{score_steps}} {out.score_steps} needs a heart-* method and at least 1 step")
    if out.score_restart and out.score_steps is None:
        raise setting_error("{score_restart} restarts after a {score_steps} probe: give {score_steps} too")
    _check_save_dtype(out, method)
    # the numeric ranges (epochs, batch size, image size, lr, threads, …) were checked against RANGES in resolve()


def _check_save_dtype(out: TrainConfig, method: Any) -> None:
    """--save-dtype named (float32, float16, bfloat16) and possible for the method: a new run's, or a new value given
    to a resumed run that has not finished."""
    out.save_dtype = _save_dtype(out.save_dtype)
    if out.save_dtype != "float32" and not method.adapters:
        raise setting_error(f"{{save_dtype}} {out.save_dtype} applies to adapter methods only: {out.method} stores "
                            "plain float32 weights")
    if out.save_dtype != "float32" and "dtype" not in inspect.signature(method.save).parameters:
        raise setting_error(f"{{save_dtype}} {out.save_dtype}: method {out.method}'s save() takes no dtype, so it "
                            "would store float32 (give its save a dtype parameter, as TrainingMethod.save has)")


def _save_dtype(value: Any) -> str:
    """--save-dtype's value as a storage dtype's name (float32, float16, bfloat16), or one line naming the flag."""
    try:
        return store_dtype(value)
    except ConfigError:
        raise setting_error(f"unknown {{save_dtype}} {value!r}: choose float32, float16 or bfloat16 (fp32, fp16, "
                            "bf16)") from None


def _warmup(out: TrainConfig, method: Any) -> None:
    """Step 5 (after the few-shot floor, which may raise the epochs): the warmup epochs, filled and checked."""
    if out.warmup_epochs is None:
        out.warmup_epochs = max(1, round(WARMUP_SHARE * out.epochs)) if out.epochs > 1 else 0
        if method.heart:
            out.warmup_epochs = max(1, out.warmup_epochs)
    if not 0 <= out.warmup_epochs <= out.epochs or (method.heart and out.warmup_epochs < 1):
        raise setting_error(f"{{warmup_epochs}} {out.warmup_epochs} must be between {1 if method.heart else 0} and "
                     f"{{epochs}} {out.epochs}")


def _few_shot_floor(out: TrainConfig, keep_evaluations: bool = False) -> None:
    """Step 4: raise the profile's epochs of a K-shot task so that it trains for at least MIN_FEWSHOT_STEPS steps. With
    ``keep_evaluations`` (no --eval-every given) the val200 evaluations stay as many as the profile's epochs: a
    4-shot epoch is 40 images, and evaluating 200 after each would take most of the run's time. Evaluation never
    changes training (its own data order, no gradients), and the last epoch is always evaluated."""
    m = re.search(r"@(\d+)shot$", str(out.task))
    if not m:
        return

    images = int(m.group(1)) * get_task(out.task).num_classes
    steps_per_epoch = max(1, math.ceil(images / out.batch_size))
    if out.epochs * steps_per_epoch < MIN_FEWSHOT_STEPS:
        before = out.epochs
        out.epochs = math.ceil(MIN_FEWSHOT_STEPS / steps_per_epoch)
        out.notes.append(f"few-shot: {images} training images are {steps_per_epoch} step(s) an epoch, so epochs go "
                         f"from {before} to {out.epochs} (at least {MIN_FEWSHOT_STEPS} optimizer steps; --epochs "
                         "sets them yourself)")
        if keep_evaluations:
            out.eval_every = math.ceil(out.epochs / before)
            out.notes.append(f"few-shot: val200 is evaluated every {out.eval_every} epochs and after the last "
                             "(--eval-every sets it yourself)")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def default_out(cfg: TrainConfig) -> str:
    """``runs/<task>_<method>_<protocol>_s<seed>`` (a vtab: path contributes its folder name)."""
    task = Path(str(cfg.task).split(":", 1)[-1].rstrip("/")).name or "task"
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9_.@-]+", "-", f"{task}_{cfg.method}_{cfg.protocol}_s{cfg.seed}"))
