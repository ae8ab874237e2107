"""What a training run depends on: ``TrainConfig``, its defaults, and ``resolve`` (defaults filled in and checked).

The dataclass is the one source of the settings: ``heartlora train``'s flags, their help and their defaults are
generated from its fields (``heartlora.cli.main.add_config_flags``), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heartlora.errors import ConfigError

# Defaults per profile. "paper" is the VTAB-1K protocol of the reference code (docs/METHOD.md §5); "cpu" fits a
# 2-core machine.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"img_size": 224, "epochs": 100, "batch_size": 64},
    "cpu": {"img_size": 112, "epochs": 10, "batch_size": 32},
}
# Without --ne or --ne-fraction, the number of heads switched off is chosen at the end of warmup from a fixed
# sample of training images (heartlora.method.auto_ne, docs/METHOD.md §3): the paper tunes ne per task on
# validation data, which a user running defaults does not do. --ne-fraction 1/6 was the fixed default before.
DEFAULT_NE_FRACTION = 1 / 6
# --ne auto's default, chosen on val200 over 0.05 at --scale 1 and checked again at today's --scale 4 (74.8 against
# 74.1 mean val200, docs/sweeps/defaults.md).
AUTO_TOLERANCE = 0.02
# A K-shot run trains for at least this many optimizer steps (its epochs are raised when the profile's epochs give
# fewer): 4 shots of 10 classes in batches of 32 are 2 steps an epoch, 20 steps in 10 epochs, too few to learn.
MIN_FEWSHOT_STEPS = 100
WARMUP_SHARE = 0.1  # warmup epochs = 10 % of the epochs, as 10 of 100 in the paper
PROTOCOLS = {"val": ("train800", "val200"), "final": ("train800val200", "test")}
PRECISIONS = ("auto", "bf16", "fp16", "tf32", "fp32")


def _opt(default: Any = None, help: str = "", group: str = "run", default_text: str | None = None,
         choices: tuple[str, ...] | None = None, runtime: bool = False, flag: str | None = None,
         hidden: bool = False, fill: Any = None) -> Any:
    """A TrainConfig field with what the CLI needs to offer it. ``fill``: the default ``resolve`` puts in place of
    None (shown in the flag's help); ``runtime``: the setting never changes the result (a resumed run may differ)."""
    meta = {"help": help, "group": group, "choices": choices, "runtime": runtime, "flag": flag, "hidden": hidden,
            "fill": fill, "default_text": default_text}
    return field(default=default, metadata=meta)


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
                                 "(cls+mean), or the backbone family's own convention (auto: cls+mean for DINOv2, cls "
                                 "for the others)", group="what to train", choices=("auto", "cls", "cls+mean"),
                            fill="auto")
    targets: tuple[str, ...] | None = _opt(help="projections to adapt, comma-separated from q,k,v,o", group="adapter",
                                           fill=("q", "v"), default_text="q,v")
    rank: int | None = _opt(help="LoRA rank", group="adapter", fill=8)
    scale: float | None = _opt(help="LoRA scale s of the update s·BA (chosen on val200, docs/sweeps/defaults.md)",
                               group="adapter", fill=4.0, default_text="4; 16 for the 1-bit methods")
    bits: int | None = _opt(help="adapter bits: 32 float, 1..8 quantized", group="adapter",
                            default_text="1 for *bi-lora, else 32")
    dropout: float | None = _opt(help="adapter input dropout", group="adapter", fill=0.0)
    ne: int | str | None = _opt(help="attention heads to switch off after warmup (heart-*): a count, or auto (the "
                                     "largest share whose switch-off does not raise the loss on sampled training "
                                     "images by more than --ne-tolerance)", group="adapter", default_text="auto")
    ne_fraction: float | None = _opt(help="share of attention heads to switch off instead of --ne", group="adapter")
    ne_tolerance: float | None = _opt(help="--ne auto: the relative loss increase on sampled training images a "
                                           "share of heads may cost", group="adapter", default_text="0.02")
    ne_refine: bool | None = _opt(help="--ne auto: do not try the share of heads halfway between the first share "
                                       "that fails and the last that passed (on by default: one more forward pass "
                                       "that can switch off 6 more of DINOv2-S's heads; docs/sweeps/ne_refine.md)",
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
    # Runtime only: never change the result.
    out: str | None = _opt(help="output folder", runtime=True, default_text="runs/<task>_<method>_<protocol>_s<seed>")
    resume: bool = _opt(False, help="continue the run in --out from its last checkpoint", runtime=True)
    overwrite: bool = _opt(False, help="replace the run files in --out", runtime=True)
    device: str = _opt("auto", help="cpu, cuda or auto", runtime=True)
    threads: int | None = _opt(help="CPU threads of this process (1 is often faster on a busy machine)", runtime=True,
                               default_text="PyTorch's, split across torchrun ranks")
    compile: bool = _opt(False, help="run the model under torch.compile", runtime=True)
    progress: bool = _opt(True, help="no progress bar", runtime=True, flag="--quiet")
    log_to: str | None = _opt(help="where to log every epoch, comma-separated from csv (metrics.csv), tensorboard "
                                   "(DIR/tensorboard, with the heads' scores), wandb, mlflow; the last three need "
                                   "their package", runtime=True, default_text="csv")
    # Testing aid: end after this epoch's checkpoint, as a kill would.
    stop_after_epoch: int | None = _opt(help="end after this epoch's checkpoint", runtime=True, hidden=True)
    notes: list[str] = field(default_factory=list, repr=False, metadata={"runtime": True, "hidden": True})

    def settings(self) -> dict[str, Any]:
        """The result-determining settings as a JSON-able dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("runtime")}
        d["targets"] = list(d["targets"]) if d["targets"] is not None else None
        return d


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("runtime"))
DEFAULTS: dict[str, Any] = {f.name: f.metadata["fill"] for f in dataclasses.fields(TrainConfig)
                            if f.metadata.get("fill") is not None}


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
        out[flag] = value
    return out


def write_config_file(path: str | os.PathLike, settings: dict[str, Any], command: str = "train") -> None:
    """``settings`` (flag name → value) as a YAML file, written atomically, that ``--config`` reads back."""
    import yaml

    from heartlora._paths import atomic_path

    text = (f"# heartlora {command} --config {Path(path).name} repeats this run; flags given on the command line "
            "win (e.g. --out)\n" + yaml.safe_dump(settings, sort_keys=False, default_flow_style=False,
                                                   allow_unicode=True))
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def check_threads(threads: int | None) -> None:
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads} (leave it out for torch's own choice)")


def resolve(cfg: TrainConfig, saved: dict[str, Any] | None = None) -> TrainConfig:
    """A copy of ``cfg`` with every default filled in and checked. With ``saved`` (a resumed run's settings) the
    saved values fill the gaps, and an explicit flag that disagrees with them is an error."""
    from heartlora.engine.methods import get_method, method_names

    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                          "--overwrite starts it again from the beginning; pass one of them")
    out = dataclasses.replace(cfg, notes=list(cfg.notes))
    if saved is not None:
        given = {k: v for k, v in cfg.settings().items() if v is not None}
        # the command line gives strings and "auto"s; the saved settings hold resolved values
        if "ne" in given:
            given["ne"] = _parse_ne(given["ne"])
        if isinstance(cfg.targets, str):
            given["targets"] = [t for t in re.split(r"[,\s]+", cfg.targets) if t]
        if given.get("pool") == "auto":
            from heartlora.backbones import conventional_pool

            given["pool"] = conventional_pool(given.get("backbone", saved.get("backbone", "")))
        clash = {k: (v, saved.get(k, DEFAULTS.get(k))) for k, v in given.items()
                 if _norm(v) != _norm(saved.get(k, DEFAULTS.get(k)))}
        if clash:
            what = ", ".join(f"--{k.replace('_', '-')} {a} (run has {b})" for k, (a, b) in clash.items())
            raise ConfigError(f"cannot resume with other settings: {what}; drop those flags, or start afresh with "
                              "--overwrite or a new --out")
        for k, v in saved.items():
            if hasattr(out, k):
                setattr(out, k, tuple(v) if k == "targets" and v is not None else v)
        for k, v in DEFAULTS.items():  # settings added after the run was started keep their old behaviour
            if getattr(out, k) is None and k not in saved:
                setattr(out, k, v)
        return out

    if out.task is None:
        raise ConfigError("no task given: pass --task NAME (`heartlora data list` shows them)")
    if out.method is None:
        out.method = DEFAULTS["method"]
    if out.method not in method_names():
        raise ConfigError(f"unknown method {out.method!r}: choose one of {', '.join(method_names())}")
    method = get_method(out.method)
    if out.scale is None and out.bits == 1 and method.bits != 1:  # a float method asked for 1-bit adapters
        from heartlora.engine.methods import BI_SCALE

        out.scale = BI_SCALE["scale"]
        out.notes.append(f"--bits 1: scale {out.scale:g}, the 1-bit methods' default (--scale sets it yourself)")
    for k, v in {**DEFAULTS, **method.defaults}.items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    if out.pool == "auto":
        from heartlora.backbones import conventional_pool

        out.pool = conventional_pool(out.backbone)
    if out.profile not in PROFILES:
        raise ConfigError(f"unknown profile {out.profile!r}: choose one of {', '.join(PROFILES)}")
    if out.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {out.protocol!r}: use val (train800 → val200) or final (→ test)")
    if out.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {out.precision!r}: choose one of {', '.join(PRECISIONS)}")
    profile = PROFILES[out.profile]
    filled = [k for k, v in profile.items() if getattr(out, k) is None]
    for k in filled:
        setattr(out, k, profile[k])
    if out.profile != "paper" and filled:
        out.notes.append(f"profile {out.profile}: " + ", ".join(f"{k.replace('_', '-')} {profile[k]}" for k in filled))
    if out.bits is None:
        out.bits = method.bits
    if not method.adapters and out.bits != 32:
        raise ConfigError(f"--bits applies to adapter methods only, not {out.method}")
    for k, v in method.forced.items():
        setattr(out, k, v)
    if isinstance(out.targets, str):
        out.targets = tuple(t for t in re.split(r"[,\s]+", out.targets) if t)
    out.targets = tuple(out.targets)
    if method.heart:
        out.ne = _parse_ne(out.ne)
        if out.ne is not None and out.ne_fraction is not None:
            raise ConfigError("give --ne or --ne-fraction, not both")
        if out.ne is None and out.ne_fraction is None:
            out.ne = "auto"
        if out.ne == "auto":
            out.ne_tolerance = AUTO_TOLERANCE if out.ne_tolerance is None else float(out.ne_tolerance)
            if out.ne_tolerance < 0:
                raise ConfigError(f"--ne-tolerance {out.ne_tolerance} must not be negative")
            out.ne_refine = True if out.ne_refine is None else bool(out.ne_refine)
        elif out.ne_tolerance is not None or out.ne_refine is not None:
            raise ConfigError(f"--ne-{'tolerance' if out.ne_tolerance is not None else 'refine'} applies to --ne auto "
                              "only")
        if isinstance(out.ne, int) and out.ne < 0:
            raise ConfigError(f"--ne {out.ne} must be 0 or more")
        if out.ne_fraction is not None and not 0.0 <= out.ne_fraction <= 1.0:
            raise ConfigError(f"--ne-fraction {out.ne_fraction} must be between 0 and 1")
    elif any(v is not None for v in (out.ne, out.ne_fraction, out.ne_tolerance, out.ne_refine)):
        heart = ", ".join(n for n in method_names() if get_method(n).heart)
        raise ConfigError(f"--ne/--ne-fraction switch attention heads off: use a method that does ({heart}), not "
                          f"{out.method}")
    if out.score_ema is not None and not (method.adapters and 0.0 <= out.score_ema < 1.0):
        raise ConfigError(f"--score-ema {out.score_ema} needs an adapter method and a decay in [0, 1)")
    if out.score_mode == "random" and (not method.heart or out.score_ema is not None):
        raise ConfigError("--score-mode random (a random ranking of the heads to switch off) needs a heart-* method "
                          "and no --score-ema (it ignores the scores)")
    if out.score_steps is not None and (not method.heart or int(out.score_steps) < 1):
        raise ConfigError(f"--score-steps {out.score_steps} needs a heart-* method and at least 1 step")
    if out.score_restart and out.score_steps is None:
        raise ConfigError("--score-restart restarts after a --score-steps probe: give --score-steps N too")
    for name in ("epochs", "batch_size", "img_size", "rank", "eval_every"):
        if int(getattr(out, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(out, name)}")
    if "epochs" in filled:
        _few_shot_floor(out, keep_evaluations=cfg.eval_every is None)
    if out.warmup_epochs is None:
        out.warmup_epochs = max(1, round(WARMUP_SHARE * out.epochs)) if out.epochs > 1 else 0
        if method.heart:
            out.warmup_epochs = max(1, out.warmup_epochs)
    if not 0 <= out.warmup_epochs <= out.epochs or (method.heart and out.warmup_epochs < 1):
        raise ConfigError(f"--warmup-epochs {out.warmup_epochs} must be between {1 if method.heart else 0} and "
                          f"--epochs {out.epochs}")
    check_threads(out.threads)
    if out.lr <= 0 or out.weight_decay < 0:
        raise ConfigError("--lr must be positive and --weight-decay not negative")
    if out.stop_after_epoch is not None and out.stop_after_epoch < 1:
        raise ConfigError(f"--stop-after-epoch {out.stop_after_epoch} must be at least 1")
    return out


def _parse_ne(value: Any) -> int | str | None:
    """--ne as given (a string from the command line): None, "auto" or a count."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--ne {value!r} is neither a number of attention heads nor auto") from None


def _few_shot_floor(out: TrainConfig, keep_evaluations: bool = False) -> None:
    """Raise the profile's epochs of a K-shot task so that it trains for at least MIN_FEWSHOT_STEPS steps. With
    ``keep_evaluations`` (no --eval-every given) the val200 evaluations stay as many as the profile's epochs: a
    4-shot epoch is 40 images, and evaluating 200 after each would take most of the run's time. Evaluation never
    changes training (its own data order, no gradients), and the last epoch is always evaluated."""
    m = re.search(r"@(\d+)shot$", str(out.task))
    if not m:
        return
    from heartlora.data import get_task

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
