"""The state of a training run between epochs, and its one mapping to and from ``checkpoint.pt``.

Only this module knows the checkpoint's keys. The file holds tensors, numbers, strings, lists and dicts only, so
it loads with ``weights_only=True`` (``heartlora.engine.checkpoint``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    """Progress (epoch, history, timing), what was decided (scores, heads off) and the component states (model,
    optimizer, schedule, tracker, gradient scaler, random generators) as of the end of ``epoch``."""

    settings: dict[str, Any]
    epoch: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, torch.Tensor] | None = None
    heads_off: list[tuple[str, int]] = field(default_factory=list)
    decisions: dict[str, Any] = field(default_factory=dict)  # choices made on data (e.g. --ne auto), JSON-able
    head_masks: dict[str, list[bool]] = field(default_factory=dict)
    train_time: float = 0.0
    images_seen: int = 0
    wall_s: float = 0.0
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    tracker: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    # The run's identity (checkpoint.py keeps it beside the state, under the checksum): a token drawn when the run
    # starts, and the sha256 of the backbone's weights before training. None in checkpoints of format 1.
    run_id: str | None = None
    fingerprint: str | None = None
    result: dict[str, Any] | None = None  # the finished run's reported accuracy, to check metrics.json against

    def identity(self) -> dict[str, Any]:
        """What makes this run this run: resume refuses a checkpoint whose identity is another's."""
        return {"run_id": self.run_id, "seed": self.settings.get("seed"), "backbone_fingerprint": self.fingerprint,
                "settings": self.settings}

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "settings": json.dumps(self.settings), "epoch": self.epoch, "finished": self.finished,
            "model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "rng": self.rng,
            "tracker": self.tracker, "scaler": self.scaler, "scores": self.scores,
            "heads_off": [[name, h] for name, h in self.heads_off], "head_masks": self.head_masks,
            "decisions": json.dumps(self.decisions),
            "history": self.history, "train_time": self.train_time, "images_seen": self.images_seen,
            "wall_s": self.wall_s, "result": json.dumps(self.result),
        }

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any]) -> TrainState:
        identity = d.get("identity") or {}
        schedule = d.get("schedule")
        if schedule is not None and "lr_lambdas" not in schedule:
            schedule = {**schedule, "lr_lambdas": [None]}  # written by the former LambdaLR subclass: same numbers
        return cls(
            settings=json.loads(d["settings"]), epoch=int(d["epoch"]), finished=bool(d.get("finished", False)),
            history=list(d["history"]), scores=d.get("scores"),
            heads_off=[(str(name), int(h)) for name, h in d.get("heads_off", [])],
            decisions=json.loads(d.get("decisions") or "{}"),
            head_masks=d.get("head_masks") or {}, train_time=float(d["train_time"]),
            images_seen=int(d["images_seen"]), wall_s=float(d["wall_s"]), model=d["model"],
            optimizer=d["optimizer"], schedule=schedule, tracker=d.get("tracker"), scaler=d.get("scaler"),
            rng=d["rng"], run_id=identity.get("run_id"), fingerprint=identity.get("backbone_fingerprint"),
            result=json.loads(d.get("result") or "null"))
