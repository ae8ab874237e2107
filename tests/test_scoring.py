"""The scoring budget (--score-steps, --score-restart), the ranking stability metrics and ``inspect --compare``, on
the tiny random ViT of test_engine (6 layers × 2 heads, 96 training images: 3 steps an epoch at batch 32)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import one_thread, task, tiny  # noqa: F401  (fixtures: one thread, the tiny task)

from heartlora.engine import TrainConfig, resolve, train
from heartlora.engine.checkpoint import load_checkpoint
from heartlora.engine.methods import HeadLoRA, register_method
from heartlora.errors import ConfigError


def _ckpt(out: Path) -> dict[str, Any]:
    return load_checkpoint(out / "checkpoint.pt")


def test_probe_switches_heads_off_after_exactly_n_steps(tmp_path: Path, task: str) -> None:
    # The warmup epoch has 3 steps; a 2-step probe must stop scoring after its second update.
    metrics = train(tiny(tmp_path, task, method="heart-lora", ne=3, score_steps=2))
    state = _ckpt(tmp_path)
    assert state["tracker"]["steps"] == 2
    assert metrics["heads_off_count"] == 3 and len(metrics["history"]) == 2
    assert json.loads(state["decisions"])["score_probe"] == {"steps": 2, "restart": False}
    full = train(tiny(tmp_path / "full", task, method="heart-lora", ne=3))
    assert _ckpt(tmp_path / "full")["tracker"]["steps"] == 3  # the whole warmup epoch, for contrast
    assert full["responsiveness"] != metrics["responsiveness"]


class _HeadsOffFromStart(HeadLoRA):
    """LoRA with a fixed set of heads off before the first step: what --score-restart should reproduce."""

    heads: list[tuple[str, int]] = []

    def prepare(self, model, cfg):  # type: ignore[no-untyped-def]
        from heartlora.method import deactivate_heads

        model, facts = super().prepare(model, cfg)
        deactivate_heads(model, heads=self.heads)
        return model, facts


def test_restart_equals_a_run_with_those_heads_off_from_step_zero(tmp_path: Path, task: str) -> None:
    probed = train(tiny(tmp_path / "probe", task, method="heart-lora", ne=4, score_steps=4, score_restart=True))
    off = [(name, h) for name, h in probed["heads_off"]]
    assert len(off) == 4 and len(probed["history"]) == 2  # the probe's partial epochs are not in the history
    assert _ckpt(tmp_path / "probe")["tracker"]["steps"] == 4
    method = register_method("test-heads-off-from-start", _HeadsOffFromStart("test"), replace=True)
    method.heads = off
    train(tiny(tmp_path / "fresh", task, method="test-heads-off-from-start"))
    a, b = _ckpt(tmp_path / "probe")["model"], _ckpt(tmp_path / "fresh")["model"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_restart_survives_a_kill_after_the_probe(tmp_path: Path, task: str) -> None:
    kw = dict(method="heart-lora", ne=2, score_steps=2, score_restart=True, epochs=3)
    whole = train(tiny(tmp_path / "whole", task, **kw))
    assert train(tiny(tmp_path / "cut", task, stop_after_epoch=1, **kw))["status"] == "stopped"
    resumed = train(tiny(tmp_path / "cut", task, resume=True, epochs=3))
    assert resumed["heads_off"] == whole["heads_off"]
    a, b = _ckpt(tmp_path / "whole")["model"], _ckpt(tmp_path / "cut")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kw, match", [
    (dict(method="lora", score_steps=3), "heart-"),
    (dict(method="heart-lora", score_steps=0), "at least 1"),
    (dict(method="heart-lora", score_restart=True), "--score-steps N"),
])
def test_score_flags_refuse_nonsense(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig(task="digits", **kw))


def test_probe_longer_than_the_run_is_refused(tmp_path: Path, task: str) -> None:
    with pytest.raises(ConfigError, match="more than the run's 6 optimizer steps"):
        train(tiny(tmp_path, task, method="heart-lora", ne=2, score_steps=7))
