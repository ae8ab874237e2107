"""``train(TrainConfig)``: warmup (all heads train, responsiveness accumulates) → switch heads off → train on.

The parts, in the order a run uses them: ``resolve`` (config.py) → the run folder's decision and lock
(runfolder.py) → ``Trainer`` builds the model through the method's hooks (methods.py) → one epoch at a time
(``train_epoch``, ``end_of_warmup``, ``evaluate``, ``save_checkpoint`` via ``TrainState``, state.py) → ``finish``
writes the model file, the plots, and metrics.json last.

One code path for one process and for torchrun's many (distributed.py). Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from heartlora._paths import file_sha256
from heartlora.backbones import create_backbone
from heartlora.data import get_task
from heartlora.engine import checkpoint as ckpt
from heartlora.engine.settings import (
    CONFIG_NAME,
    DEFAULTS,
    FINISH_ONLY,
    PROTOCOLS,
    TrainConfig,
    check_threads,
    default_out,
    flag_settings,
    resolve,
    setting_error,
    write_config_file,
)
from heartlora.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_object,
    gather_object,
    setup,
    shard,
    teardown,
)
from heartlora.engine.loggers import RunLoggers, parse_log_to
from heartlora.engine.training_methods import TrainingMethod, get_method
from heartlora.engine.metrics import accuracy, write_metrics
from heartlora.engine.precision import compiled, exact_fp32, matmul_precision, resolve_precision
from heartlora.engine.runfolder import RUN_FILES, RunFolder, inspect_out
from heartlora.engine.state import TrainState
from heartlora.errors import CheckpointError, ConfigError, HeartLoRAError, RunFolderError, SettingError, TaskError
from heartlora.method import attention_layers, coverage, head_masks, is_adapted
from heartlora.method.auto_ne import HELDOUT_IMAGES
from heartlora.method.heads_off import check_count
from heartlora.method.model import backbone_fingerprint

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, write the output folder (rank 0) and return the metrics (every rank).

    The result always has metrics.json's keys plus ``status``: "finished", "already_finished" (the folder held a
    finished run: its metrics) or "stopped" (``stop_after_epoch``: the checkpoint is written, metrics so far).
    Under torchrun (WORLD_SIZE set) this joins the process group and leaves it at the end, unless the caller had
    already joined one; the CPU thread count it changes is restored.
    """
    check_threads(cfg.threads)
    threads_before = torch.get_num_threads()
    had_group = dist.is_available() and dist.is_initialized()
    info = setup(cfg.device)
    finished = False
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        result = _train(cfg, info)
        finished = True
        return result
    finally:
        if info.enabled and not had_group:
            teardown(barrier=finished)
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=default_out(resolve(cfg)))
    out = Path(cfg.out)
    # Rank 0 looks at the folder; every rank acts on the same answer (and raises the same error).
    decision = broadcast_object(_look(out, cfg) if info.is_main else None, info)
    if "error" in decision:
        raise _error(decision)
    if decision.get("restart"):  # --resume of a run killed before its first checkpoint: it starts again
        why = f"{out} holds no checkpoint yet (the run stopped before its first one)"
        if cfg.task is None:
            raise ConfigError(f"{why}, so there is nothing to resume from: run the command that started it (its "
                              "--task and flags) again with --resume")
        if info.is_main:
            print(f"note: {why}: starting it from the beginning", file=sys.stderr)
    state = TrainState.from_checkpoint(decision["state"]) if "state" in decision else None
    if decision["mode"] == "done":
        resolve(cfg, state.settings)  # a flag that contradicts the finished run is still an error
        metrics = decision["metrics"]  # read and checked by inspect_out (rank 0), broadcast with the decision
        return {**metrics, "status": "already_finished"}
    cfg = resolve(cfg, state.settings if state else None, unfinished=True)
    trainer = Trainer(cfg, info, t_start)  # everything that can fail on bad input fails here, before any write
    if state is not None:
        trainer.check_identity(state)
    folder = RunFolder(out)
    if info.is_main:
        for note in trainer.notes(state is None):
            print(f"note: {note}", file=sys.stderr)
    claimed = broadcast_object(_claim(folder, cfg, state is None) if info.is_main else None, info)
    if "error" in claimed:
        raise _error(claimed)
    handler = _log_to(folder.log) if info.is_main else None
    try:
        return trainer.run(folder, state)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if info.is_main:
            folder.release()


def _look(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    try:
        RunFolder(out).check_free()
    except RunFolderError as exc:
        return {"error": str(exc), "kind": "folder"}
    return inspect_out(out, cfg.resume, cfg.overwrite)


def _claim(folder: RunFolder, cfg: TrainConfig, fresh: bool) -> dict[str, Any]:
    """Rank 0: create and lock the folder, remove what a kill left behind, and clear it for --overwrite."""
    try:
        folder.acquire()
        with folder.writing("the run files"):
            folder.clean_temporary_files()
            if cfg.overwrite and fresh:
                folder.clear_run_files()
        folder.log = folder.open_log(append=not fresh)
    except HeartLoRAError as exc:
        folder.release()
        return {"error": str(exc), "kind": "folder"}
    return {}


# a folder decision's settings as Python names them (TrainConfig's fields) and, from SettingError, as flags (--resume)
_FOLDER_SETTINGS = {"resume": "resume=True", "overwrite": "overwrite=True", "out": "out"}


def _error(decision: dict[str, Any]) -> HeartLoRAError:
    if decision.get("settings"):
        return SettingError(decision["error"], names=_FOLDER_SETTINGS)
    return (RunFolderError if decision.get("kind") == "folder" else ConfigError)(decision["error"])


class _LogFile(logging.StreamHandler):
    """A handler that owns its stream (train.log, opened by RunFolder.open_log without following a link)."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def _log_to(stream: Any) -> logging.Handler:
    """train.log: this module's records (they also propagate to the application's handlers)."""
    handler = _LogFile(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to the base rate over the warmup epochs, then cosine down to ``min_ratio`` of it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The stock LambdaLR; a ``functools.partial`` (not a lambda) keeps its state plain numbers for weights_only."""
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def count_heads(model: nn.Module) -> list[int]:
    """Attention heads per adapted layer ([] when the model has no adapter)."""
    try:
        return [layer.num_heads for layer in attention_layers(model)]
    except HeartLoRAError:
        return []


def _masks(model: nn.Module) -> dict[str, list[bool]]:
    return head_masks(model) if is_adapted(model) else {}


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of rank ``rank``'s random stream (rank 0 keeps the run's: one process draws as it always did)."""
    return (seed + 1_000_003 * rank + 7_919 * epoch) % 2**63


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes during training: the trainable Parameters and every buffer (head masks may live there)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


class Trainer:
    """One run: the data, the model prepared by its method, the optimization parts, and the epochs."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, t_start: float) -> None:
        self.cfg, self.info, self.t_start = cfg, info, t_start
        self.log_to = parse_log_to(cfg.log_to)  # a logger whose package is missing: refused before any work
        self.loggers: RunLoggers | None = None
        self.method: TrainingMethod = get_method(cfg.method)
        self.task = get_task(cfg.task)
        train_split, eval_split = PROTOCOLS[cfg.protocol]
        self.train_x, self.train_y = self.task.load(train_split, img_size=cfg.img_size, seed=cfg.seed)
        self.model, self.facts = self._build_model()
        self.per_layer = count_heads(self.model) if self.method.adapters else []
        self._check_ne()
        self._check_score_steps()
        self.eval_x, self.eval_y = (self.task.load(eval_split, img_size=cfg.img_size, seed=cfg.seed)
                                    if cfg.protocol == "val" else (None, None))
        if cfg.protocol == "final":  # test is decoded once, after training: a missing image is refused before it
            self.task.check("test", seed=cfg.seed)
        self.precision = resolve_precision(cfg.precision, info.device)

    def _build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        """The backbone prepared by the method, as at step 0 (built again by --score-restart)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # random inits (tests, --no-pretrained) must be the same on resume and on load
        model = create_backbone(cfg.backbone, num_classes=self.task.num_classes, img_size=cfg.img_size,
                                pretrained=cfg.pretrained, pool=cfg.pool, drop_path=cfg.drop_path)
        self.fingerprint = backbone_fingerprint(model, skip=("head",))  # part of the run's identity (checkpoint.pt)
        prepared = self.method.prepare(model, self.cfg)
        if self.info.rank:  # the same initial weights on every rank; then each its own dropout and drop-path masks
            torch.manual_seed(rank_seed(cfg.seed, self.info.rank))
        return prepared

    def check_identity(self, state: TrainState) -> None:
        """Resume only a checkpoint made on these backbone weights (its settings were checked by resolve)."""
        if state.fingerprint is not None and state.fingerprint != self.fingerprint:
            raise CheckpointError(f"{Path(self.cfg.out) / 'checkpoint.pt'} was made on other backbone weights than "
                                  f"{self.cfg.backbone} gives here (fingerprint {state.fingerprint[:12]}…, here "
                                  f"{self.fingerprint[:12]}…): resume with the run's backbone weights, or start "
                                  "afresh with --overwrite")

    def _check_score_steps(self) -> None:
        """--score-steps must end inside the run, or the heads would never be switched off."""
        cfg = self.cfg
        total = cfg.epochs * math.ceil(len(self.train_x) / cfg.batch_size)
        if cfg.score_steps is not None and cfg.score_steps > total:
            raise setting_error(f"{{score_steps}} {cfg.score_steps} is more than the run's {total} optimizer steps "
                                f"({cfg.epochs} epochs): choose {{score_steps}} <= {total}")
        warmup = cfg.warmup_epochs * (total // cfg.epochs)
        if cfg.score_steps is not None and cfg.score_steps < warmup and cfg.ne == "auto":
            # Measured (benchmarks/results_notes.md): after a 2-step probe every share passed, 48 of 72 heads went off.
            raise setting_error(f"{{score_steps}} {cfg.score_steps} with {{ne}} auto: ne auto judges a share of heads "
                                "by the loss change of switching it off, and a probe that ends before the warmup "
                                f"(step {warmup}) leaves adapters too close to their zero start for any share to "
                                "change it, so the largest would always pass; give a count ({ne}) or a share "
                                "({ne_fraction}) with a short probe")

    def _check_ne(self) -> None:
        """Refuse an impossible --ne before any training time is spent (the core would refuse it after warmup)."""
        if self.method.heart:
            check_count(self.cfg.ne, self.per_layer, self.cfg.scope, model=f"{self.cfg.backbone}'s")

    def notes(self, fresh: bool) -> list[str]:
        if not fresh:
            return []
        notes = list(self.cfg.notes) + self.task.notes()
        classes = self.task.num_classes
        unseen = sorted(set(range(classes)) - set(self.train_y.unique().tolist()))
        if unseen:
            shown = ", ".join(str(c) for c in unseen[:8]) + (", …" if len(unseen) > 8 else "")
            notes.append(f"{len(unseen)} of the task's {classes} classes have no training image in "
                         f"{PROTOCOLS[self.cfg.protocol][0]} (labels {shown}); the classifier has {classes} outputs "
                         "(the largest label of any split + 1, or classes.txt): if that is not meant, check the "
                         "labels of val200.txt and test.txt")
        cfg = self.cfg
        if cfg.profile == "paper" and self.info.device.type == "cpu" and cfg.img_size >= 224 and cfg.epochs >= 50:
            notes.append("the paper profile (224 px, 100 epochs) is very slow on a CPU; --profile cpu sets CPU-sized "
                         "defaults")
        total = cfg.epochs * math.ceil(len(self.train_x) / cfg.batch_size)
        scoring = cfg.score_steps if cfg.score_steps is not None else cfg.warmup_epochs * (total // cfg.epochs)
        if self.method.heart and not cfg.score_restart and scoring >= total:
            notes.append(f"scoring fills the whole run ({scoring} of its {total} optimizer steps): the heads are "
                         "switched off after the last step, so the adapter is never trained without them; give more "
                         "--epochs than --warmup-epochs, or a smaller --score-steps")
        if cfg.warmup_epochs >= cfg.epochs and cfg.warmup_epochs > 0:
            notes.append(f"the learning-rate warmup fills all {cfg.epochs} epoch(s) (--warmup-epochs "
                         f"{cfg.warmup_epochs}): the learning rate rises to --lr and never decays")
        return notes

    def say(self, msg: str, echo: bool = True) -> None:
        """Log (train.log on rank 0) and, with progress output on, echo to stderr."""
        if not self.info.is_main:
            return
        log.info(msg)
        if echo and self.cfg.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    # -- set-up --------------------------------------------------------------------------------------------------------
    def _setup_optimization(self, state: TrainState | None) -> None:
        cfg, device = self.cfg, self.info.device
        self.steps_per_epoch = math.ceil(len(self.train_x) / cfg.batch_size)
        self.model.to(device)
        # uint8 on the device: 1,000 images at 112 px are 38 MB
        self.train_x, self.train_y = self.train_x.to(device), self.train_y.to(device)
        self.tracker = self.method.tracker(self.model, cfg)
        self._build_optimization()
        self.state = state or TrainState(settings=cfg.settings(), run_id=secrets.token_hex(8))
        self.state.run_id = self.state.run_id or secrets.token_hex(8)  # a format-1 checkpoint had none
        self.state.fingerprint = self.fingerprint
        self.wall_before = self.state.wall_s
        if state is not None:
            self._restore(state)
            self._changed_at_finish()
            self._say_precision_change()
        self._wrap()

    def _changed_at_finish(self) -> None:
        """A resumed run given another value of a setting that acts only when it finishes (FINISH_ONLY): the run
        records the new value (checkpoint, config.yaml, train.log), so that its files agree with its result."""
        now = self.cfg.settings()
        changed = {k: (self.state.settings.get(k, DEFAULTS.get(k)), getattr(self.cfg, k)) for k in FINISH_ONLY
                   if self.state.settings.get(k, DEFAULTS.get(k)) != getattr(self.cfg, k)}
        if not changed:
            return
        for k in FINISH_ONLY:
            if k in now:
                self.state.settings[k] = now[k]
            else:
                self.state.settings.pop(k, None)
        self.say("resumed with " + ", ".join(f"{k.replace('_', '-')} {b} (was {a})" for k, (a, b) in changed.items())
                 + ": it applies when the run finishes")
        self.on_rank0(self._record_changed_settings)

    def _say_precision_change(self) -> None:
        """A run resumed on another kind of device, where its --precision resolves otherwise (auto: fp32 on a CPU,
        bf16 on a GPU): it goes on at the new one, and says so; each epoch's history row names its precision."""
        before = self.state.history[-1].get("precision") if self.state.history else None
        if before is not None and before != self.precision.name:
            self.say(f"resumed on {self.info.device}: the epochs from {self.state.epoch + 1} train at precision "
                     f"{self.precision.name} (--precision {self.cfg.precision}), the first {self.state.epoch} "
                     f"trained at {before}")

    def _record_changed_settings(self) -> None:
        """Rank 0: the checkpoint as it was read, with the new settings, then config.yaml: a run stopped again before
        its next checkpoint resumes with them, and its config.yaml repeats it."""
        self._store_state()
        self._write_config()

    def _build_optimization(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(self.method.param_groups(self.model, cfg), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.schedule = make_schedule(self.optimizer, cfg.warmup_epochs * self.steps_per_epoch,
                                      cfg.epochs * self.steps_per_epoch, cfg.min_lr_ratio)

    def _restore(self, state: TrainState) -> None:
        cfg, device = self.cfg, self.info.device
        self.method.restore(self.model, state.heads_off, self.optimizer)
        missing = [k for k in state.model if k not in self.model.state_dict()]
        if missing:
            raise ConfigError(f"checkpoint in {cfg.out} does not fit this model ({missing[0]}): start a new --out")
        self.model.load_state_dict({k: v.to(device) for k, v in state.model.items()}, strict=False)
        if state.head_masks and _masks(self.model) != state.head_masks:
            raise ConfigError(f"checkpoint in {cfg.out} does not match the heads switched off again on resume: "
                              "start a new --out")
        self.optimizer.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.schedule)
        if self.tracker is not None and state.tracker is not None:
            self.tracker.load_state_dict(state.tracker)
        if self.precision.scaler is not None and state.scaler:
            self.precision.scaler.load_state_dict(state.scaler)
        ranks = (state.rng or {}).get("ranks")
        if ranks is not None and len(ranks) == self.info.world_size:  # each rank its own generators
            ckpt.set_rng_state(ranks[self.info.rank], self.info.device)
        elif self.info.rank == 0:
            ckpt.set_rng_state(state.rng, self.info.device)
        else:  # made with another number of processes: this rank's masks cannot continue; a fresh draw, seeded
            torch.manual_seed(rank_seed(cfg.seed, self.info.rank, state.epoch))
        self.say(f"resumed {cfg.out} after epoch {state.epoch}/{cfg.epochs}")

    def _wrap(self) -> None:
        """The module the steps call: DDP around the model under torchrun, torch.compile with --compile. Built
        again when heads switch off (the Parameters change)."""
        net = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            net = DDP(self.model, device_ids=ids)
        self.net = compiled(net, self.cfg.compile)

    # -- the run -------------------------------------------------------------------------------------------------------
    def run(self, folder: RunFolder, state: TrainState | None) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        self.folder = folder
        with matmul_precision(self.precision):
            self._setup_optimization(state)
            self.say("run identity " + json.dumps(self.state.identity()), echo=False)  # runfolder.check_record
            if state is None and self._coverage() is not None:
                self.say(f"{cfg.backbone}: {self._coverage()}")
            if state is None:
                self.say(f"train {cfg.method} on {cfg.task} ({PROTOCOLS[cfg.protocol][0]}, {len(self.train_x)} "
                         f"images) with {cfg.backbone} at {cfg.img_size} px, {cfg.epochs} epochs (warmup "
                         f"{cfg.warmup_epochs}), batch {cfg.batch_size}, device {info.device}, precision "
                         f"{self.precision.name}, {info.world_size} process(es)", echo=False)
                self.say("settings " + json.dumps(cfg.settings()), echo=False)
                self.on_rank0(self._write_config)
            self.on_rank0(self._open_loggers, state is not None)

            self.bar = tqdm(total=cfg.epochs * self.steps_per_epoch, initial=self.state.epoch * self.steps_per_epoch,
                            unit="step", disable=not (cfg.progress and info.is_main), dynamic_ncols=True,
                            file=sys.stderr, leave=False)
            try:
                epoch = self.state.epoch
                while epoch < cfg.epochs:
                    record = self.train_epoch(epoch)
                    if record is None:  # the --score-steps probe ended and training restarted from step 0
                        epoch = 0
                        continue
                    epoch += 1
                    if self.tracker is not None and cfg.score_steps is None and epoch == cfg.warmup_epochs:
                        self.end_of_warmup()
                    last = epoch == cfg.epochs
                    if cfg.protocol == "val" and (epoch % cfg.eval_every == 0 or last):
                        record["eval_acc"] = self.evaluate(self.eval_x, self.eval_y)
                        record["eval_split"] = PROTOCOLS[cfg.protocol][1]
                    self._end_epoch(record)
                    if cfg.stop_after_epoch is not None and epoch == cfg.stop_after_epoch and not last:
                        self.say(f"stopped after epoch {epoch} (checkpoint written); continue with --resume")
                        return self.metrics(self.state.history[-1]["eval_acc"], status="stopped")
            finally:
                self.bar.close()
                if self.loggers is not None:
                    self.loggers.close()
            return self.finish()

    def train_epoch(self, epoch: int) -> dict[str, Any] | None:
        """One pass over the training split; no host synchronisation inside the step loop. None when a
        --score-restart probe ended in it (training went back to step 0)."""
        cfg, info, device = self.cfg, self.info, self.info.device
        if cfg.score_steps is None:
            scoring = self.tracker is not None and epoch < cfg.warmup_epochs
        else:
            scoring = self.tracker is not None and self.state.scores is None
        self.method.train_mode(self.net)
        self.bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}" + (" (warmup, scoring heads)" if scoring else ""))
        n = len(self.train_x)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) % 2**64))
        perm = perm.to(device)  # one copy per epoch: no host-to-device copy inside the step loop
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        correct_acc = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        t0 = self.clock()
        for step in range(self.steps_per_epoch):
            batch = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            mine = shard(batch, info)
            # DDP averages gradients over ranks; scaling by W / global batch makes that the mean over the batch.
            weight = info.world_size / len(batch)
            idle = len(mine) == 0
            if idle:  # a last batch smaller than the number of ranks: every rank must still take the step, so this
                mine, weight = batch[:1], 0.0  # one runs one image at weight 0 (no gradient, not counted)
            x = self.train_x[mine].float().div_(255.0)
            y = self.train_y[mine]
            with self.precision.autocast():
                logits = self.net(x)
            batch_loss = loss_fn(logits.float(), y)
            self.precision.backward(batch_loss * weight)
            if scoring:
                self.tracker.update(skipped=self.precision.unscale(self.optimizer))
            self.precision.step(self.optimizer)
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            if not idle:
                loss_acc += batch_loss.detach()
                correct_acc += (logits.detach().argmax(1) == y).sum()
                seen += len(mine)
            self.bar.update(1)
            if scoring and cfg.score_steps is not None and self.tracker.steps >= cfg.score_steps:
                scoring = False
                paused = self.clock()
                self.end_of_warmup()  # ne auto's forward passes and copies: not training steps, not timed
                t0 += self.clock() - paused
                if cfg.score_restart:
                    self.state.train_time += self.clock() - t0
                    self.state.images_seen += int(all_reduce_sum([float(seen)], info)[0])
                    self.restart_from_step0()
                    return None
        epoch_time = self.clock() - t0
        loss_sum, correct, seen = all_reduce_sum([float(loss_acc), float(correct_acc), float(seen)], info)
        self.state.train_time += epoch_time
        self.state.images_seen += int(seen)
        self.bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}")
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "eval_acc": None, "eval_split": None, "lr": self.optimizer.param_groups[0]["lr"],
                "time_s": epoch_time, "images_per_s": seen / epoch_time, "precision": self.precision.name}

    def clock(self) -> float:
        """time.perf_counter() once the device has done the work queued so far (CUDA runs ahead of the host: the
        epoch's time would miss its last steps)."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        return time.perf_counter()

    def end_of_warmup(self) -> None:
        """Scores averaged over ranks (every rank picks the same heads); the method decides what follows."""
        self.state.scores = self.tracker.scores()
        self.on_rank0(self._log_head_scores)
        record: dict[str, Any] = {}
        t0 = time.perf_counter()
        with self.precision.autocast():
            off = self.method.end_of_warmup(self.model, self.cfg, self.state.scores, self.optimizer,
                                            heldout=self.heldout_batches, record=record)
        if isinstance(record.get("ne_choice"), dict):  # what --ne auto cost (wall seconds, this rank)
            record["ne_choice"]["seconds"] = time.perf_counter() - t0
        if self.cfg.score_steps is not None:
            record["score_probe"] = {"steps": self.tracker.steps, "restart": bool(self.cfg.score_restart)}
        self.state.decisions.update(record)
        choice = record.get("ne_choice")
        if choice is not None:
            tried = ", ".join(f"{c['heads_off']} off: {c['increase']:+.4f}" for c in choice["candidates"])
            self.say(f"--ne auto on {choice['images']} sampled training images: loss change {tried}; chose "
                     f"share {choice['fraction']:.3g}")
        if off:
            self.state.heads_off = list(off)
            self._wrap()  # the Parameters changed: DDP (and the compiled graph) must be built again
            total = sum(self.per_layer)
            self.say(f"end of warmup: switched off {len(off)} of {total} attention heads: "
                     + ", ".join(f"{name}[{h}]" for name, h in off[:12]) + (" …" if len(off) > 12 else ""))

    def restart_from_step0(self) -> None:
        """--score-restart: the model, optimizer, schedule and random state as at step 0 (``_build_model`` seeds the
        generator as a fresh run does), with the heads the probe chose switched off, as if they had been off from
        the start; a checkpoint keeps the probe's work."""
        self.model, _ = self._build_model()
        self.model.to(self.info.device)
        self._build_optimization()
        self.method.restore(self.model, self.state.heads_off, self.optimizer)
        self.precision = resolve_precision(self.cfg.precision, self.info.device)  # a fresh gradient scaler too
        self.state.epoch, self.state.history = 0, []
        self.on_rank0(self._restart_logs)
        self._wrap()
        self.bar.reset(total=self.cfg.epochs * self.steps_per_epoch)
        self.say(f"--score-restart: after the {self.tracker.steps}-step probe, training starts again from step 0 "
                 f"with {len(self.state.heads_off)} heads off")
        self.save_checkpoint()

    def heldout_batches(self, count: int = HELDOUT_IMAGES) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed, seeded sample of the training images (this rank's shard), as float batches: the data ``--ne
        auto`` decides on. Never validation or test images."""
        n = len(self.train_x)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + 7919))[:min(count, n)]
        mine = shard(pick, self.info).to(self.train_x.device)
        return [(self.train_x[idx].float().div_(255.0), self.train_y[idx])  # none: fewer images than processes
                for idx in mine.split(self.cfg.batch_size) if idx.numel()]

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, exact: bool = False) -> float:
        """Accuracy at the run's precision, or (``exact``: the accuracy the run reports) in exact fp32, as
        ``heartlora eval`` computes it."""
        with exact_fp32(self.info.device) if exact else self.precision.autocast():
            return accuracy(self.model, images, labels, self.info)

    def _end_epoch(self, record: dict[str, Any]) -> None:
        state = self.state
        state.history.append(record)
        state.epoch = record["epoch"]
        acc = record["eval_acc"]
        self.say(f"epoch {state.epoch}/{self.cfg.epochs} loss {record['train_loss']:.4f} train acc "
                 f"{record['train_acc']:.4f}" + (f" {record['eval_split']} acc {acc:.4f}" if acc is not None else "")
                 + f" ({record['images_per_s']:.1f} img/s)", echo=False)
        # the logs first: a run stopped between the two resumes before this epoch and logs it again (a resume drops
        # the rows and steps after its checkpoint); the other order lost the epoch's row for good
        self.on_rank0(self._log_epoch, record)
        self.save_checkpoint()

    def _write_config(self) -> None:
        with self.folder.writing(CONFIG_NAME):
            write_config_file(self.folder.path / CONFIG_NAME, flag_settings(self.cfg))

    def _open_loggers(self, resumed: bool) -> None:
        with self.folder.writing("the --log-to logs"):
            # resumed from the checkpoint a --score-restart saved: the logs begin at epoch 1 again
            restarted = self.state.scores if resumed and self.state.epoch == 0 and self.cfg.score_restart else None
            self.loggers = RunLoggers(self.log_to, self.folder.path, self.cfg.settings(), self.state.epoch,
                                      resumed=resumed, run_id=self.state.run_id, restarted=restarted or None)

    def _log_head_scores(self) -> None:
        if self.loggers is not None:
            with self.folder.writing("the --log-to logs"):
                self.loggers.head_scores(self.state.scores, step=self.state.epoch + 1)

    def _restart_logs(self) -> None:
        """--score-restart: the logs begin again at epoch 1 (``RunLoggers.restart``)."""
        if self.loggers is not None:
            with self.folder.writing("the --log-to logs"):
                self.loggers.restart(self.state.scores)

    def _log_epoch(self, record: dict[str, Any]) -> None:
        if self.loggers is not None:
            masks = _masks(self.model)
            with self.folder.writing("the --log-to logs"):
                self.loggers.epoch(record, sum(map(sum, masks.values())) if masks else None,
                                   sum(map(len, masks.values())) if masks else None)

    def on_rank0(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on rank 0 (its result; None on the others), called by every rank: under DDP, when it fails
        the other ranks are told and raise too, instead of waiting in the next collective for a rank that left
        (torchrun would end them, a process group the caller started would not)."""
        result, failure = None, None
        if self.info.is_main:
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 (re-raised below, on this rank and, as one line, on the others)
                failure = exc
        if self.info.enabled:
            said = broadcast_object(f"{type(failure).__name__}: {' '.join(str(failure).split())}" if failure
                                    else None, self.info)
            if said is not None and failure is None:
                raise HeartLoRAError(f"rank 0 failed ({said[:300]}): rank {self.info.rank} stops too")
        if failure is not None:
            raise failure
        return result

    def save_checkpoint(self, finished: bool = False) -> None:
        """Rank 0 writes checkpoint.pt; every rank calls this (each rank's random state is gathered), except for
        the finished checkpoint, written by rank 0 alone in ``finish`` (a finished run does not train again)."""
        rng = ckpt.rng_state(self.info.device)
        if finished:
            self._write_checkpoint(rng, None, finished=True)
        else:
            self.on_rank0(self._write_checkpoint, rng, gather_object(rng, self.info) if self.info.enabled else None)

    def _write_checkpoint(self, rng: dict[str, Any], ranks: list[dict[str, Any]] | None,
                          finished: bool = False) -> None:
        s = self.state
        s.finished = finished
        s.model, s.optimizer, s.schedule = (_trainable_state(self.model), self.optimizer.state_dict(),
                                            self.schedule.state_dict())
        s.tracker = self.tracker.state_dict() if self.tracker is not None else None
        s.scaler = self.precision.scaler.state_dict() if self.precision.scaler is not None else None
        s.rng, s.head_masks = ({**rng, "ranks": ranks} if ranks else rng), _masks(self.model)
        s.wall_s = self.wall()
        self._store_state()

    def _store_state(self) -> None:
        """Rank 0: checkpoint.pt from ``self.state`` as it stands."""
        with self.folder.writing("checkpoint.pt"):
            ckpt.save_checkpoint(self.folder.path / "checkpoint.pt", self.state.to_checkpoint(), self.state.identity())

    def wall(self) -> float:
        """Wall seconds of the whole run, over resumes."""
        return self.wall_before + time.perf_counter() - self.t_start

    # -- the end -------------------------------------------------------------------------------------------------------
    def run_facts(self) -> dict[str, Any]:
        """What the model file says about the run (``heartlora.engine.inference.read_run_info``)."""
        cfg = self.cfg
        return {"backbone_spec": dict(self.model.spec), "pretrained": cfg.pretrained, "init_seed": cfg.seed,
                "task": cfg.task, "class_names": list(self.task.class_names), "method": cfg.method,
                "img_size": cfg.img_size, "protocol": cfg.protocol,
                "responsiveness": {k: [float(x) for x in v] for k, v in (self.state.scores or {}).items()},
                **self.facts}

    def metrics(self, final_acc: float | None, status: str) -> dict[str, Any]:
        """metrics.json (docs/METRICS.md); the same keys for a finished and a stopped run."""
        cfg, info, state = self.cfg, self.info, self.state
        train_split, eval_split = PROTOCOLS[cfg.protocol]
        masks = _masks(self.model) if self.method.adapters else {}
        responsiveness = {k: [float(x) for x in v] for k, v in (state.scores or {}).items()}
        return {
            "status": status, "task": cfg.task, "method": cfg.method, "backbone": cfg.backbone,
            "protocol": cfg.protocol, "seed": cfg.seed, "settings": cfg.settings(),
            "accuracy": final_acc, "accuracy_split": eval_split, "train_split": train_split,
            "selection": "none: the last epoch is reported; " + ("test is evaluated once, after training"
                                                                   if eval_split == "test" else
                                                                   f"on {eval_split}; test is not evaluated"),
            "adapter_bytes": 0, "adapter_file_bytes": None,
            "trainable_params": sum(p.numel() for g in self.optimizer.param_groups for p in g["params"]),
            "heads_total": sum(self.per_layer), "heads_off": [[name, h] for name, h in state.heads_off],
            "heads_off_count": len(state.heads_off), "head_masks": masks, "responsiveness": responsiveness or None,
            "ne_choice": state.decisions.get("ne_choice"),
            "coverage": self._coverage(),
            "wall_s": self.wall(), "train_images_per_s": state.images_seen / max(state.train_time, 1e-9),
            "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs, "epochs_done": state.epoch,
            "final_train_loss": state.history[-1]["train_loss"], "final_train_acc": state.history[-1]["train_acc"],
            "history": state.history, "world_size": info.world_size, "device": str(info.device.type),
            "precision": self.precision.name, "compiled": cfg.compile, "num_classes": self.task.num_classes,
            "files": {"adapter": "adapter.safetensors", "responsiveness_plot": None, "curves_plot": "curves.png",
                      "log": "train.log", "checkpoint": "checkpoint.pt"},
        }

    def _coverage(self) -> str | None:
        if not self.method.adapters:
            return None

        return coverage(self.model).summary() if is_adapted(self.model) else None

    def finish(self) -> dict[str, Any]:
        """Test once (protocol final), then rank 0 writes the model file, the plots, the finished checkpoint and,
        last, metrics.json: a folder with metrics.json holds a complete run."""
        cfg = self.cfg
        final_acc = self.state.history[-1]["eval_acc"]
        trained = None
        if cfg.save_dtype != "float32":
            trained = _trainable_state(self.model)
            self._as_stored()
        if cfg.protocol == "val" and (trained is not None or self.precision.name != "fp32"):
            # the stored adapter's val200 accuracy in exact fp32 (what `heartlora eval` gives it), not the last
            # epoch's under autocast or of the float32 values the file was rounded from
            final_acc = self.evaluate(self.eval_x, self.eval_y, exact=True)
        if cfg.protocol == "final":
            # The one and only look at test, after training: nothing is chosen on it.
            try:
                test_x, test_y = self.task.load("test", img_size=cfg.img_size, seed=cfg.seed)
            except TaskError as e:  # an image that cannot be decoded (or went missing during training)
                raise TaskError(f"{e}; the run trained and its last checkpoint is kept: then `heartlora train --out "
                                f"{cfg.out} --resume` tests it") from None
            final_acc = self.evaluate(test_x, test_y, exact=True)
        if trained is not None:
            # The trained float32 values back: the finished checkpoint keeps them (a resume of a run stopped before
            # metrics.json rounds them once, not a rounded k-bit adapter again), and the file written from them at
            # the same dtype is the one just evaluated, byte for byte.
            self.model.load_state_dict({k: v.to(self.info.device) for k, v in trained.items()}, strict=False)
        metrics = self.metrics(final_acc, status="finished")
        written = self.on_rank0(self._write_results, metrics, final_acc)
        return broadcast_object(written if self.info.is_main else metrics, self.info)

    def _as_stored(self) -> None:
        """--save-dtype float16 / bfloat16: the model takes the adapter's values as the file will hold them (written
        at that dtype and read back, on every rank), so that the accuracy reported is the stored adapter's."""
        from heartlora.method import save_adapter
        from heartlora.method.storage import restore_adapter

        with tempfile.TemporaryDirectory(prefix="heartlora-") as tmp:
            try:
                save_adapter(self.model, Path(tmp) / "adapter.safetensors", dtype=self.cfg.save_dtype)
            except ConfigError as e:  # a value float16 cannot hold: the trained run is in its last checkpoint
                narrow = "; store it as bfloat16 or float32; nothing was written"
                message = str(e).replace(str(Path(tmp) / "adapter.safetensors"),
                                         str(Path(self.cfg.out) / "adapter.safetensors"))
                if not message.endswith(narrow):  # another cause (a diverged run's NaN): no dtype can help
                    raise ConfigError(message) from None
                why = message.removesuffix(narrow)
                raise ConfigError(f"{why}; the run trained but wrote no results (its last epoch's checkpoint is "
                                  f"kept): finish it with `heartlora train --out {self.cfg.out} --resume "
                                  "--save-dtype bfloat16` (or float32)") from None
            restore_adapter(self.model, Path(tmp) / "adapter.safetensors")

    def _write_results(self, metrics: dict[str, Any], final_acc: float) -> dict[str, Any]:
        """Rank 0: the model file, the plots, the finished checkpoint and, last, metrics.json; returns what
        train() returns (the file's content and status)."""
        cfg = self.cfg
        out, facts = self.folder.path, self.run_facts()
        with self.folder.writing("adapter.safetensors"):
            metrics["adapter_bytes"] = self.method.save(self.model, out / "adapter.safetensors", facts,
                                                        **({"dtype": cfg.save_dtype} if cfg.save_dtype != "float32"
                                                           else {}))
        metrics["adapter_file_bytes"] = (out / "adapter.safetensors").stat().st_size
        metrics["adapter_sha256"] = file_sha256(out / "adapter.safetensors")  # a finished run's folder checks it
        from heartlora.engine.plots import responsiveness_heatmap, training_curves

        title = f"{cfg.task} · {cfg.method} · {cfg.backbone}"
        with self.folder.writing("the plots"):
            if metrics["head_masks"]:
                responsiveness_heatmap(out / "responsiveness.png", facts["responsiveness"] or None,
                                       metrics["head_masks"], title=title)
                metrics["files"]["responsiveness_plot"] = "responsiveness.png"
            training_curves(out / "curves.png", self.state.history,
                            cfg.warmup_epochs if self.method.adapters else 0, title=title)
        self.state.result = {"accuracy": metrics["accuracy"] if _finite(metrics["accuracy"]) else None,
                             "adapter_sha256": metrics["adapter_sha256"]}
        self.save_checkpoint(finished=True)
        with self.folder.writing("metrics.json"):
            # what train() returns is the file's content and status, as for a run already finished
            metrics = {**write_metrics(out / "metrics.json", {k: v for k, v in metrics.items() if k != "status"}),
                       "status": metrics["status"]}
            self.folder.readable()
        self.say(f"done: {metrics['accuracy_split']} accuracy {final_acc:.4f}, adapter "
                 f"{metrics['adapter_bytes']} bytes, {len(self.state.heads_off)}/{sum(self.per_layer)} heads "
                 f"off, {metrics['wall_s']:.0f} s", echo=False)
        return metrics


__all__ = ["RUN_FILES", "Trainer", "lr_factor", "make_schedule", "train"]
