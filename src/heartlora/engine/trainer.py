"""The training loop: warmup (all heads train, responsiveness accumulates) → switch heads off → train on.

One code path for one process and for torchrun's many (``heartlora.engine.distributed``). Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heartlora.engine import checkpoint as ckpt
from heartlora.engine.distributed import DistInfo, all_reduce_sum, broadcast_object, setup, shard, teardown
from heartlora.engine.inference import RUN_KEY, save_weights
from heartlora.engine.metrics import accuracy, read_metrics, write_metrics
from heartlora.errors import ConfigError, HeartLoRAError
from heartlora.method.model import backbone_fingerprint


@dataclass(frozen=True)
class Method:
    """What a method name means: which weights train, how many bits adapters have, whether heads are switched off."""

    adapters: bool
    bits: int = 32
    heart: bool = False
    full: bool = False
    description: str = ""


METHODS: dict[str, Method] = {
    "linear": Method(adapters=False, description="classifier only, backbone frozen (linear probe)"),
    "full": Method(adapters=False, full=True, description="every weight trains"),
    "lora": Method(adapters=True, description="LoRA on the target projections, all heads"),
    "bi-lora": Method(adapters=True, bits=1, description="1-bit quantized LoRA (Bi-LoRA), all heads"),
    "heart-lora": Method(adapters=True, heart=True, description="LoRA; least responsive heads off after warmup"),
    "heart-bi-lora": Method(adapters=True, bits=1, heart=True, description="1-bit LoRA with heads switched off"),
}

# Defaults per profile. "paper" is SPEC §5 (the VTAB-1K protocol of the reference code); "cpu" fits a 2-core machine.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"img_size": 224, "epochs": 100, "batch_size": 64},
    "cpu": {"img_size": 112, "epochs": 10, "batch_size": 32},
}
DEFAULTS: dict[str, Any] = {
    "method": "heart-lora", "backbone": "dinov2_small", "targets": ("q", "v"), "rank": 8, "scale": 1.0,
    "dropout": 0.0, "scope": "global", "lr": 1e-3, "weight_decay": 1e-4, "drop_path": 0.1, "seed": 42,
    "protocol": "val", "profile": "paper", "pool": "cls", "score_mode": "abs_sum", "pretrained": True,
    "min_lr_ratio": 0.01, "eval_every": 1,
}
# Without --ne or --ne-fraction, a sixth of the heads goes off: a share rather than a count, so the default fits any
# backbone and both scopes (1 of 6 heads per layer of DINOv2-S, 2 of 12 in ViT-B). The paper tunes ne per task on
# validation data; so should a user (--protocol val).
DEFAULT_NE_FRACTION = 1 / 6
WARMUP_SHARE = 0.1  # warmup epochs = 10 % of the epochs, as 10 of 100 in the paper
PROTOCOLS = {"val": ("train800", "val200"), "final": ("train800val200", "test")}
RUN_FILES = ("metrics.json", "adapter.safetensors", "responsiveness.png", "curves.png", "train.log",
             "checkpoint.pt")
# Settings that do not change the result, so a resumed run may differ in them.
RUNTIME_FIELDS = ("out", "resume", "overwrite", "device", "threads", "progress", "stop_after_epoch")
STOP_ENV = "HEARTLORA_STOP_AFTER_EPOCH"  # testing aid: end the process after this epoch's checkpoint, like a kill


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the default of the profile / protocol" (see
    ``resolve``), so that flags given explicitly can be told apart from defaults."""

    task: str | None = None
    method: str | None = None
    backbone: str | None = None
    targets: tuple[str, ...] | None = None
    rank: int | None = None
    scale: float | None = None
    bits: int | None = None
    dropout: float | None = None
    ne: int | None = None
    ne_fraction: float | None = None
    scope: str | None = None
    score_mode: str | None = None
    warmup_epochs: int | None = None
    epochs: int | None = None
    lr: float | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    img_size: int | None = None
    drop_path: float | None = None
    pool: str | None = None
    pretrained: bool | None = None
    seed: int | None = None
    protocol: str | None = None
    profile: str | None = None
    eval_every: int | None = None
    # Runtime only: never change the result.
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    threads: int | None = None  # CPU threads of this process (None: PyTorch's choice, split across torchrun ranks)
    progress: bool = True
    stop_after_epoch: int | None = None
    notes: list[str] = field(default_factory=list, repr=False)

    def settings(self) -> dict[str, Any]:
        """The result-determining settings as a JSON-able dict."""
        skip = set(RUNTIME_FIELDS) | {"notes"}
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d["targets"] = list(d["targets"]) if d["targets"] is not None else None
        return d


def resolve(cfg: TrainConfig, saved: dict[str, Any] | None = None) -> TrainConfig:
    """A copy of ``cfg`` with every default filled in and checked. With ``saved`` (a resumed run's settings) the
    saved values fill the gaps, and an explicit flag that disagrees with them is an error."""
    out = dataclasses.replace(cfg, notes=list(cfg.notes))
    if saved is not None:
        given = {k: v for k, v in cfg.settings().items() if v is not None}
        clash = {k: (v, saved.get(k)) for k, v in given.items() if _norm(v) != _norm(saved.get(k))}
        if clash:
            what = ", ".join(f"--{k.replace('_', '-')} {a} (run has {b})" for k, (a, b) in clash.items())
            raise ConfigError(f"cannot resume with other settings: {what}; drop those flags, or start afresh with "
                              "--overwrite or a new --out")
        for k, v in saved.items():
            if hasattr(out, k):
                setattr(out, k, tuple(v) if k == "targets" and v is not None else v)
        return out

    for k, v in DEFAULTS.items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    if out.task is None:
        raise ConfigError("no task given: pass --task NAME (`heartlora data list` shows them)")
    if out.method not in METHODS:
        raise ConfigError(f"unknown method {out.method!r}: choose one of {', '.join(METHODS)}")
    if out.profile not in PROFILES:
        raise ConfigError(f"unknown profile {out.profile!r}: choose one of {', '.join(PROFILES)}")
    if out.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {out.protocol!r}: use val (train800 → val200) or final (→ test)")
    profile = PROFILES[out.profile]
    filled = [k for k, v in profile.items() if getattr(out, k) is None]
    for k in filled:
        setattr(out, k, profile[k])
    if out.profile != "paper" and filled:
        out.notes.append(f"profile {out.profile}: " + ", ".join(f"{k.replace('_', '-')} {profile[k]}" for k in filled))
    method = METHODS[out.method]
    if out.bits is None:
        out.bits = method.bits
    if not method.adapters and out.bits != 32:
        raise ConfigError(f"--bits applies to adapter methods only, not {out.method}")
    if out.method == "linear":
        out.drop_path = 0.0  # the backbone is frozen: dropping its paths would only add noise to fixed features
    if isinstance(out.targets, str):
        out.targets = tuple(t for t in re.split(r"[,\s]+", out.targets) if t)
    out.targets = tuple(out.targets)
    if method.heart:
        if out.ne is not None and out.ne_fraction is not None:
            raise ConfigError("give --ne or --ne-fraction, not both")
        if out.ne is None and out.ne_fraction is None:
            out.ne_fraction = DEFAULT_NE_FRACTION
            out.notes.append("a sixth of the heads will be switched off (default --ne-fraction 0.1667; tune --ne or "
                             "--ne-fraction on val200 with --protocol val)")
        if out.ne is not None and out.ne < 0:
            raise ConfigError(f"--ne {out.ne} must be 0 or more")
        if out.ne_fraction is not None and not 0.0 <= out.ne_fraction <= 1.0:
            raise ConfigError(f"--ne-fraction {out.ne_fraction} must be between 0 and 1")
    elif out.ne is not None or out.ne_fraction is not None:
        raise ConfigError(f"--ne/--ne-fraction switch heads off: use method heart-lora or heart-bi-lora, "
                          f"not {out.method}")
    for name in ("epochs", "batch_size", "img_size", "rank", "eval_every"):
        if int(getattr(out, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(out, name)}")
    if out.warmup_epochs is None:
        out.warmup_epochs = max(1, round(WARMUP_SHARE * out.epochs)) if out.epochs > 1 else 0
        if method.heart:
            out.warmup_epochs = max(1, out.warmup_epochs)
    if not 0 <= out.warmup_epochs <= out.epochs or (method.heart and out.warmup_epochs < 1):
        raise ConfigError(f"--warmup-epochs {out.warmup_epochs} must be between {1 if method.heart else 0} and "
                          f"--epochs {out.epochs}")
    if out.lr <= 0 or out.weight_decay < 0:
        raise ConfigError("--lr must be positive and --weight-decay not negative")
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def default_out(cfg: TrainConfig) -> str:
    """``runs/<task>_<method>_<protocol>_s<seed>`` (a vtab: path contributes its folder name)."""
    task = Path(str(cfg.task).split(":", 1)[-1].rstrip("/")).name or "task"
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9_.@-]+", "-", f"{task}_{cfg.method}_{cfg.protocol}_s{cfg.seed}"))


# ---------------------------------------------------------------------------------------------------------------------
# The output folder


def _inspect_out(cfg: TrainConfig) -> dict[str, Any]:
    """Decide what to do with the output folder, without changing it: start, resume (with the checkpoint) or report
    a finished run. Errors come back as a message so that every rank can raise the same one."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        return {"error": f"--out {out} is a file, not a folder: choose another --out"}
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if cfg.overwrite or not present:
        return {"mode": "fresh", "present": present}
    if not cfg.resume:
        listed = ", ".join(present[:4]) + (", …" if len(present) > 4 else "")
        return {"error": f"output folder {out} already holds files ({listed}): pass --resume to continue that run, "
                         "--overwrite to replace its files, or choose another --out"}
    if "checkpoint.pt" not in present:
        return {"error": f"output folder {out} holds no checkpoint.pt to resume from: choose another --out, "
                         "or --overwrite to start there afresh"}
    try:
        state = ckpt.load_checkpoint(out / "checkpoint.pt")
    except HeartLoRAError as exc:
        return {"error": str(exc)}
    done = state.get("finished", False) and "metrics.json" in present
    return {"mode": "done" if done else "resume", "state": state}


def _readable(out: Path) -> None:
    """Atomic writes go through mkstemp files (mode 0600); give the run's files the usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    for name in RUN_FILES:
        if (out / name).is_file():
            os.chmod(out / name, 0o666 & ~umask)


def _clear_run_files(out: Path) -> None:
    """--overwrite: remove this project's run files only; anything else the user keeps there stays."""
    for name in RUN_FILES:
        p = out / name
        if p.is_file():
            p.unlink()


# ---------------------------------------------------------------------------------------------------------------------
# Building the model for a method


def _lr_lambda(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to the base rate over the warmup epochs, then cosine down to ``min_ratio`` of it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose state is plain numbers (no function objects), so checkpoints load with weights_only."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
        self.shape = (warmup_steps, total_steps, min_ratio)
        super().__init__(optimizer, lambda s: _lr_lambda(s, *self.shape))

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "base_lrs": list(self.base_lrs),
                "_last_lr": list(self._last_lr)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch, self._step_count = int(state["last_epoch"]), int(state["_step_count"])
        self.base_lrs, self._last_lr = list(state["base_lrs"]), list(state["_last_lr"])
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * _lr_lambda(self.last_epoch, *self.shape)


def _count_heads(model: nn.Module) -> tuple[int, list[int]]:
    """(total heads, heads per attention layer) for an adapted model; (0, []) when there is no adapter."""
    from heartlora.method import attention_layers

    try:
        layers = attention_layers(model)
    except HeartLoRAError:
        return 0, []
    return sum(layer.num_heads for layer in layers), [layer.num_heads for layer in layers]


def _check_ne(cfg: TrainConfig, per_layer: list[int]) -> None:
    """Refuse an impossible --ne before any training time is spent (the core would refuse it only after warmup)."""
    if not METHODS[cfg.method].heart or cfg.ne is None:
        return
    limit = sum(per_layer) if cfg.scope == "global" else min(per_layer)
    where = f"the {limit} heads of {cfg.backbone}" if cfg.scope == "global" else f"the {limit} heads per layer"
    if cfg.ne > limit:
        raise ConfigError(f"--ne {cfg.ne} is more than {where}: choose --ne ≤ {limit} (or --ne-fraction)")


def _build(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone with the method applied; also facts for the run file (fingerprint, …)."""
    from heartlora.backbones import create_backbone

    torch.manual_seed(cfg.seed)  # random inits (tests, --no-pretrained) must be the same on resume and on load
    model = create_backbone(cfg.backbone, num_classes=num_classes, img_size=cfg.img_size, pretrained=cfg.pretrained,
                            pool=cfg.pool, drop_path=cfg.drop_path)
    method = METHODS[cfg.method]
    extra: dict[str, Any] = {}
    if method.adapters:
        from heartlora.method import HeartLoRAConfig, attach

        attach(model, HeartLoRAConfig(targets=cfg.targets, rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout,
                                      bits=cfg.bits))
    elif not method.full:
        head = _classifier(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        extra["fingerprint"] = backbone_fingerprint(model, skip=("head",))  # the same check adapter files get
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, extra


def _classifier(model: nn.Module) -> nn.Module:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"backbone {type(model).__name__} has no `head` classifier for a linear probe")
    return head


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes during training: the trainable Parameters and every buffer (head masks may live there)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _masks(model: nn.Module) -> dict[str, list[bool]]:
    """Layer name → heads on, for an adapted model; {} otherwise."""
    from heartlora.method import head_masks, is_adapted

    return head_masks(model) if is_adapted(model) else {}


def _wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


# ---------------------------------------------------------------------------------------------------------------------
# Training


class _Run:
    """State shared by the steps of one training run (kept together so the loop reads top to bottom)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out)
        self.log = logging.getLogger(f"heartlora.train.{id(self)}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False

    def start_log(self, append: bool) -> None:
        if not self.info.is_main:
            return
        handler = logging.FileHandler(self.out / "train.log", mode="a" if append else "w", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.log.addHandler(handler)

    def say(self, msg: str, echo: bool = True) -> None:
        """Log to train.log (rank 0) and, with progress output on, to stderr."""
        if not self.info.is_main:
            return
        self.log.info(msg)
        if echo and self.cfg.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def close(self) -> None:
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, write the output folder (rank 0) and return the metrics (every rank).

    Under torchrun (WORLD_SIZE set) this joins the process group and leaves it at the end.
    """
    info = setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    joined = info.enabled
    try:
        return _train(cfg, info)
    finally:
        if joined:
            teardown()


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=default_out(resolve(cfg)))
    if cfg.stop_after_epoch is None and os.environ.get(STOP_ENV):
        cfg = dataclasses.replace(cfg, stop_after_epoch=int(os.environ[STOP_ENV]))
    # Rank 0 looks at the folder; every rank acts on the same answer (and raises the same error).
    decision = broadcast_object(_inspect_out(cfg) if info.is_main else None, info)
    if "error" in decision:
        raise ConfigError(decision["error"])
    state = decision.get("state")
    if decision["mode"] == "done":
        resolve(cfg, json.loads(state["settings"]))  # a flag that contradicts the finished run is still an error
        metrics = broadcast_object(read_metrics(Path(cfg.out) / "metrics.json") if info.is_main else None, info)
        metrics["already_finished"] = True
        return metrics
    cfg = resolve(cfg, json.loads(state["settings"]) if state else None)
    method = METHODS[cfg.method]

    # Everything that can fail on bad input happens before the folder is touched.
    from heartlora.data import get_task

    task = get_task(cfg.task)
    train_split, eval_split = PROTOCOLS[cfg.protocol]
    train_x, train_y = task.load(train_split, img_size=cfg.img_size, seed=cfg.seed)
    model, extra = _build(cfg, task.num_classes)
    heads_total, per_layer = _count_heads(model) if method.adapters else (0, [])
    _check_ne(cfg, per_layer)
    eval_x, eval_y = (task.load(eval_split, img_size=cfg.img_size, seed=cfg.seed) if cfg.protocol == "val"
                      else (None, None))

    if info.is_main and not state:
        notes = list(cfg.notes)
        if cfg.profile == "paper" and info.device.type == "cpu" and cfg.img_size >= 224:
            notes.append("the paper profile (224 px, 100 epochs) is very slow on a CPU; --profile cpu sets CPU-sized "
                         "defaults")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    run = _Run(cfg, info)
    if info.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not state:
            _clear_run_files(run.out)
    run.start_log(append=state is not None)
    try:
        metrics = _loop(run, task, model, extra, state, (train_x, train_y), (eval_x, eval_y), heads_total, t_start)
    finally:
        run.close()
    return metrics


def _loop(run: _Run, task: Any, model: nn.Module, extra: dict[str, Any], state: dict[str, Any] | None,
          train_data: tuple[torch.Tensor, torch.Tensor], eval_data: tuple[Any, Any], heads_total: int,
          t_start: float) -> dict[str, Any]:
    cfg, info = run.cfg, run.info
    method = METHODS[cfg.method]
    device = info.device
    train_x, train_y = train_data
    n = len(train_x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    model.to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)  # uint8: 1,000 images at 112 px are 38 MB

    tracker = None
    if method.adapters:
        from heartlora.method import ResponsivenessTracker

        tracker = ResponsivenessTracker(model, mode=cfg.score_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = _Schedule(optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch,
                         cfg.min_lr_ratio)

    scores: dict[str, torch.Tensor] | None = None
    off: list[tuple[str, int]] = []
    history: list[dict[str, Any]] = []
    start_epoch, train_time, images_seen, wall_before = 0, 0.0, 0, 0.0
    if state is not None:
        if state.get("scores") is not None:
            scores = {k: v for k, v in state["scores"].items()}
        off = [(str(name), int(h)) for name, h in state.get("heads_off", [])]
        if off:
            from heartlora.method import deactivate_heads

            deactivate_heads(model, heads=off, optimizer=optimizer)
        missing = [k for k in state["model"] if k not in model.state_dict()]
        if missing:
            raise ConfigError(f"checkpoint in {cfg.out} does not fit this model ({missing[0]}): start a new --out")
        model.load_state_dict({k: v.to(device) for k, v in state["model"].items()}, strict=False)
        if state.get("head_masks") and _masks(model) != state["head_masks"]:
            raise ConfigError(f"checkpoint in {cfg.out} does not match the heads switched off again on resume: "
                              "start a new --out")
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if tracker is not None and state.get("tracker") is not None:
            tracker.load_state_dict(state["tracker"])
        ckpt.set_rng_state(state["rng"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        train_time, images_seen = float(state["train_time"]), int(state["images_seen"])
        wall_before = float(state["wall_s"])
        run.say(f"resumed {cfg.out} after epoch {start_epoch}/{cfg.epochs}")
    else:
        run.say(f"train {cfg.method} on {cfg.task} ({train_split_of(cfg)}, {n} images) with {cfg.backbone} at "
                f"{cfg.img_size} px, {cfg.epochs} epochs (warmup {cfg.warmup_epochs}), batch {cfg.batch_size}, "
                f"device {device}, {info.world_size} process(es)", echo=False)
        run.say("settings " + json.dumps(cfg.settings()), echo=False)

    ddp = _wrap(model, info)
    from tqdm import tqdm

    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, unit="step",
               disable=not (cfg.progress and info.is_main), dynamic_ncols=True, file=sys.stderr, leave=False)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for epoch in range(start_epoch, cfg.epochs):
        scoring = tracker is not None and epoch < cfg.warmup_epochs
        ddp.train()
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}" + (" (warmup, scoring heads)" if scoring else ""))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        # Running sums stay on the device: reading them every step would stall a GPU.
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        correct_acc = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        t0 = time.perf_counter()
        for step in range(steps_per_epoch):
            batch = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(batch) < info.world_size:
                continue  # a last batch smaller than the number of ranks would leave a rank idle: skip it
            mine = shard(batch, info).to(device)
            x = train_x[mine].float().div_(255.0)
            y = train_y[mine]
            logits = ddp(x)
            batch_loss = loss_fn(logits, y)
            # DDP averages gradients over ranks; scaling by W / global batch makes that the mean over the batch.
            (batch_loss * (info.world_size / len(batch))).backward()
            if scoring:
                tracker.update()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_acc += batch_loss.detach()
            correct_acc += (logits.detach().argmax(1) == y).sum()
            seen += len(mine)
            bar.update(1)
            if not bar.disable and (step % 5 == 0 or step == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{float(loss_acc) / max(seen, 1):.3f}",
                                acc=f"{float(correct_acc) / max(seen, 1):.3f}")
        epoch_time = time.perf_counter() - t0
        loss_sum, correct, seen = all_reduce_sum([float(loss_acc), float(correct_acc), float(seen)], info)
        train_time += epoch_time
        images_seen += int(seen)

        if tracker is not None and epoch + 1 == cfg.warmup_epochs:
            scores = tracker.scores()  # averaged over ranks: every rank picks the same heads
            if method.heart:
                from heartlora.method import deactivate_heads

                off = deactivate_heads(model, scores, ne=cfg.ne, fraction=cfg.ne_fraction, scope=cfg.scope,
                                       optimizer=optimizer)
                ddp = _wrap(model, info)  # the Parameters changed: DDP must be built again
                run.say(f"end of warmup: switched off {len(off)} of {heads_total} heads: "
                        + ", ".join(f"{name}[{h}]" for name, h in off[:12]) + (" …" if len(off) > 12 else ""))

        eval_acc = None
        last = epoch + 1 == cfg.epochs
        if cfg.protocol == "val" and ((epoch + 1) % cfg.eval_every == 0 or last):
            eval_acc = accuracy(ddp.module if info.enabled else ddp, eval_data[0], eval_data[1], info)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                  "eval_acc": eval_acc, "eval_split": PROTOCOLS[cfg.protocol][1] if eval_acc is not None else None,
                  "lr": optimizer.param_groups[0]["lr"], "time_s": epoch_time, "images_per_s": seen / epoch_time}
        history.append(record)
        run.say(f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} train acc {record['train_acc']:.4f}"
                + (f" {record['eval_split']} acc {eval_acc:.4f}" if eval_acc is not None else "")
                + f" ({seen / epoch_time:.1f} img/s)", echo=False)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_acc']:.3f}")

        if info.is_main:
            ckpt.save_checkpoint(run.out / "checkpoint.pt", {
                "settings": json.dumps(cfg.settings()), "epoch": epoch + 1, "finished": False,
                "model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": ckpt.rng_state(),
                "tracker": tracker.state_dict() if tracker is not None else None,
                "scores": scores, "heads_off": [[name, h] for name, h in off], "head_masks": _masks(model),
                "history": history,
                "train_time": train_time, "images_seen": images_seen,
                "wall_s": wall_before + time.perf_counter() - t_start,
            })
        if cfg.stop_after_epoch is not None and epoch + 1 == cfg.stop_after_epoch and not last:
            bar.close()
            run.say(f"stopped after epoch {epoch + 1} (checkpoint written); continue with --resume")
            return {"stopped_after_epoch": epoch + 1, "out": str(run.out)}
    bar.close()

    final_acc = history[-1]["eval_acc"] if cfg.protocol == "val" else None
    if cfg.protocol == "final":
        # The one and only look at test, after training: nothing is chosen on it.
        test_x, test_y = task.load("test", img_size=cfg.img_size, seed=cfg.seed)
        final_acc = accuracy(model, test_x, test_y, info)
    wall_s = wall_before + time.perf_counter() - t_start
    metrics = _finish(run, task, model, extra, optimizer, scores, off, history, heads_total, final_acc,
                      wall_s, images_seen / max(train_time, 1e-9))
    return metrics


def train_split_of(cfg: TrainConfig) -> str:
    return PROTOCOLS[cfg.protocol][0]


def _finish(run: _Run, task: Any, model: nn.Module, extra: dict[str, Any], optimizer: torch.optim.Optimizer,
            scores: dict[str, torch.Tensor] | None, off: list[tuple[str, int]], history: list[dict[str, Any]],
            heads_total: int, final_acc: float, wall_s: float, images_per_s: float) -> dict[str, Any]:
    """Write the model file, the plots and metrics.json (rank 0), mark the checkpoint finished, return metrics."""
    cfg, info = run.cfg, run.info
    method = METHODS[cfg.method]
    train_split, eval_split = PROTOCOLS[cfg.protocol]
    masks: dict[str, list[bool]] = {}
    if method.adapters:
        from heartlora.method import head_masks

        masks = head_masks(model)
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    run_facts = {"backbone_spec": dict(model.spec), "pretrained": cfg.pretrained, "init_seed": cfg.seed,
                 "task": cfg.task, "class_names": list(task.class_names), "method": cfg.method,
                 "img_size": cfg.img_size, "protocol": cfg.protocol,
                 "responsiveness": {k: [float(x) for x in v] for k, v in (scores or {}).items()}, **extra}
    metrics: dict[str, Any] = {
        "task": cfg.task, "method": cfg.method, "backbone": cfg.backbone, "protocol": cfg.protocol,
        "seed": cfg.seed, "settings": cfg.settings(),
        "accuracy": final_acc, "accuracy_split": eval_split, "train_split": train_split,
        "selection": "none: the last epoch is reported; test is evaluated once, after training",
        "adapter_bytes": 0, "adapter_file_bytes": None, "trainable_params": trainable,
        "heads_total": heads_total, "heads_off": [[name, h] for name, h in off], "heads_off_count": len(off),
        "head_masks": masks, "responsiveness": run_facts["responsiveness"] or None,
        "wall_s": wall_s, "train_images_per_s": images_per_s, "epochs": cfg.epochs,
        "warmup_epochs": cfg.warmup_epochs, "final_train_loss": history[-1]["train_loss"],
        "final_train_acc": history[-1]["train_acc"], "history": history, "world_size": info.world_size,
        "device": str(info.device.type), "num_classes": task.num_classes,
        "files": {"adapter": "adapter.safetensors", "responsiveness_plot": None, "curves_plot": "curves.png",
                  "log": "train.log", "checkpoint": "checkpoint.pt"},
    }
    if info.is_main:
        out = run.out
        adapter_path = out / "adapter.safetensors"
        if method.adapters:
            from heartlora.method import save_adapter

            report = save_adapter(model, adapter_path, extra_metadata={RUN_KEY: run_facts})
            metrics["adapter_bytes"] = int(report.adapter_bytes)
        else:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            if method.full:
                names = list(model.state_dict())
            save_weights(model, adapter_path, names, run_facts)
            head = {f"head.{n}" for n, _ in _classifier(model).named_parameters()}
            # Full fine-tuning stores a whole backbone per task: count it as that method's per-task bytes.
            metrics["adapter_bytes"] = (sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                                            if name not in head) if method.full else 0)
        metrics["adapter_file_bytes"] = adapter_path.stat().st_size
        from heartlora.engine.plots import responsiveness_heatmap, training_curves

        if masks:
            responsiveness_heatmap(out / "responsiveness.png", run_facts["responsiveness"] or None, masks,
                                   title=f"{cfg.task} · {cfg.method} · {cfg.backbone}")
            metrics["files"]["responsiveness_plot"] = "responsiveness.png"
        training_curves(out / "curves.png", history, cfg.warmup_epochs if method.adapters else 0,
                        title=f"{cfg.task} · {cfg.method} · {cfg.backbone}")
        write_metrics(out / "metrics.json", metrics)
        _readable(out)
        state = ckpt.load_checkpoint(out / "checkpoint.pt")
        state["finished"] = True
        ckpt.save_checkpoint(out / "checkpoint.pt", {k: v for k, v in state.items() if k != "format"})
        run.say(f"done: {eval_split} accuracy {final_acc:.4f}, adapter {metrics['adapter_bytes']} bytes, "
                f"{len(off)}/{heads_total} heads off, {wall_s:.0f} s", echo=False)
    return broadcast_object(metrics, info)


__all__ = ["METHODS", "PROFILES", "PROTOCOLS", "RUN_FILES", "TrainConfig", "default_out", "resolve", "train"]
