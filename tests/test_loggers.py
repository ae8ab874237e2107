"""--log-to: metrics.csv by default (one row per epoch, kept right over a resume), TensorBoard scalars and the
heads' scores when tensorboard is installed, a one-line refusal for a logger whose package is missing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from test_engine import tiny

from heartlora.engine import train
from heartlora.engine.loggers import CSV_COLUMNS, heads_image, parse_log_to
from heartlora.errors import ConfigError


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_csv_by_default_one_row_per_epoch(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="heart-lora", ne=3, epochs=3))
    rows = _rows(tmp_path)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert list(rows[0]) == list(CSV_COLUMNS) and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row, rec in zip(rows, history):
        assert float(row["train_loss"]) == pytest.approx(rec["train_loss"]) and float(row["lr"]) == rec["lr"]
        assert float(row["eval_acc"]) == rec["eval_acc"] and row["eval_split"] == "val200"
    # heads on at the end of each epoch: the 3 heads are switched off at the end of the warmup's one epoch
    assert [(r["heads_on"], r["heads_total"]) for r in rows] == [("9", "12")] * 3


def test_csv_rows_survive_a_resume(tmp_path: Path, task: str) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny(whole, task, method="lora", epochs=3))
    train(tiny(parts, task, method="lora", epochs=3, stop_after_epoch=2))
    assert [r["epoch"] for r in _rows(parts)] == ["1", "2"]
    train(tiny(parts, task, method="lora", epochs=3, resume=True))
    drop = {"time_s", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(parts)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(whole)]


class Stopped(Exception):
    pass


def test_a_run_stopped_between_an_epochs_log_and_its_checkpoint_resumes_to_the_whole_csv(
        tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint was written before the epoch's log: a run stopped between the two (Ctrl-C, a failed log
    write) resumed after epoch 2 with epoch 2's row never written (rows 1, 3). Stopped in the log, or just after it
    (before the checkpoint), the resumed file now equals the uninterrupted run's."""
    from heartlora.engine import loggers, trainer

    whole = tmp_path / "whole"
    train(tiny(whole, task, method="lora", epochs=3))
    drop = {"time_s", "images_per_s"}
    want = [{k: v for k, v in r.items() if k not in drop} for r in _rows(whole)]
    for where in ("log", "checkpoint"):
        parts = tmp_path / where
        target = (loggers.RunLoggers, "epoch") if where == "log" else (trainer.Trainer, "save_checkpoint")
        real = getattr(*target)

        def stop_at_epoch_2(self, *a, real=real, where=where):
            epoch = a[0]["epoch"] if where == "log" else self.state.epoch
            if epoch == 2:
                raise Stopped
            return real(self, *a)

        monkeypatch.setattr(*target, stop_at_epoch_2)
        with pytest.raises(Exception):  # noqa: B017 (the engine may wrap it)
            train(tiny(parts, task, method="lora", epochs=3))
        monkeypatch.undo()
        train(tiny(parts, task, method="lora", epochs=3, resume=True))
        assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(parts)] == want, where


def test_tensorboard_scalars_and_head_scores(tmp_path: Path, task: str) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(tmp_path, task, method="heart-lora", ne=3, epochs=3, log_to="tensorboard"))
    assert not (tmp_path / "metrics.csv").exists()  # the list given replaces the default
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "histograms": 0}).Reload()
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in history], rel=1e-6)
    assert [e.value for e in events.Scalars("heads_on")] == [9, 9, 9]
    assert [e.value for e in events.Scalars("val200/accuracy")] == pytest.approx([r["eval_acc"] for r in history])
    (hist,) = events.Histograms("heads/responsiveness")
    assert hist.step == 1 and hist.histogram_value.num == 12
    (img,) = events.Images("heads/responsiveness_layers_x_heads")
    assert (img.width, img.height) == (2, 6)  # test_vit: 6 layers × 2 heads


def test_tensorboard_shows_only_the_run_that_overwrote_the_folder(tmp_path: Path, task: str) -> None:
    """--overwrite keeps tensorboard/ (not a run file), but TensorBoard shows the new run's steps only."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(tmp_path, task, method="lora", epochs=3, log_to="tensorboard"))
    train(tiny(tmp_path, task, method="lora", epochs=2, lr=3e-3, log_to="tensorboard", overwrite=True))
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # the earlier run's file is still there
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in history], rel=1e-6)


def test_tensorboard_over_a_resume_shows_each_step_once(tmp_path: Path, task: str) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny(whole, task, method="lora", epochs=3, log_to="tensorboard"))
    train(tiny(parts, task, method="lora", epochs=3, log_to="tensorboard", stop_after_epoch=2))
    train(tiny(parts, task, method="lora", epochs=3, log_to="tensorboard", resume=True))
    loss = EventAccumulator(str(parts / "tensorboard")).Reload().Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    want = EventAccumulator(str(whole / "tensorboard")).Reload().Scalars("train/loss")
    assert [e.value for e in loss] == pytest.approx([e.value for e in want], rel=1e-6)


def test_tensorboard_after_a_score_restart_shows_the_restarted_run_once(tmp_path: Path, task: str) -> None:
    """--score-restart with a probe longer than an epoch: the probe's epoch 1 stayed in TensorBoard beside the
    restarted run's (two points at step 1); the csv already dropped it. The probe's scores stay, at step 1."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(tmp_path, task, method="heart-lora", ne=3, epochs=3, score_steps=5, score_restart=True,
               log_to="csv,tensorboard")
    train(cfg)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in history], rel=1e-6)
    assert [int(r["epoch"]) for r in _rows(tmp_path)] == [1, 2, 3]
    (hist,) = events.Histograms("heads/responsiveness")
    assert hist.step == 1 and hist.histogram_value.num == 12


def test_tensorboard_after_a_score_restart_and_a_stop_before_the_first_checkpoint(
        tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the restarted run logged epoch 1 but before its checkpoint: the resume starts from the
    restart's checkpoint (epoch 0), which purged nothing, so epoch 1 showed twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from heartlora.engine import trainer

    real = trainer.Trainer.save_checkpoint

    def stop(self, *a, **k):
        if self.state.epoch == 1 and self.state.heads_off and len(self.state.history) == 1:
            raise Stopped
        return real(self, *a, **k)

    kw = dict(method="heart-lora", ne=3, epochs=3, score_steps=5, score_restart=True, log_to="csv,tensorboard")
    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", stop)
    with pytest.raises(Exception):  # noqa: B017 (the engine may wrap it)
        train(tiny(tmp_path, task, **kw))
    monkeypatch.undo()
    train(tiny(tmp_path, task, resume=True, **kw))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [h.step for h in events.Histograms("heads/responsiveness")] == [1]


def test_a_resumed_run_continues_its_wandb_and_mlflow_runs(tmp_path: Path, task: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb.init(resume="allow") without an id, and mlflow.start_run() without a run id, began a new run at each
    --resume. The run's id (kept in its checkpoint) now names the wandb run and tags the mlflow run, and a resume
    finds them. The two packages are stood in for here (they are not installed); the calls are theirs."""
    import importlib.util
    import sys
    import types

    calls: dict[str, list] = {"wandb": [], "mlflow": []}
    made: list[types.SimpleNamespace] = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: calls["wandb"].append(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                                  finish=lambda: None)
    wandb.Histogram = lambda values: values
    mlflow = types.ModuleType("mlflow")

    def start_run(run_id=None, run_name=None, tags=None):
        calls["mlflow"].append({"run_id": run_id, "run_name": run_name, "tags": tags})
        if run_id is None:
            made.append(types.SimpleNamespace(info=types.SimpleNamespace(run_id=f"m{len(made)}"), tags=tags or {}))

    def search_runs(filter_string, output_format, max_results):
        want = filter_string.split("'")[1]
        return [r for r in made if r.tags.get("heartlora_run_id") == want][:max_results]

    mlflow.start_run, mlflow.search_runs = start_run, search_runs
    mlflow.log_params = mlflow.log_metrics = lambda *a, **k: None
    mlflow.end_run = lambda: None
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("wandb", "mlflow") else real(name, *a))
    train(tiny(tmp_path, task, method="lora", epochs=3, log_to="wandb,mlflow", stop_after_epoch=1))
    train(tiny(tmp_path, task, method="lora", epochs=3, log_to="wandb,mlflow", resume=True))
    first, again = calls["wandb"]
    assert first["id"] == again["id"] and first["id"].startswith("heartlora-") and again["resume"] == "allow"
    started, resumed = calls["mlflow"]
    assert started["run_id"] is None and started["tags"]["heartlora_run_id"] == first["id"][len("heartlora-"):]
    assert resumed["run_id"] == "m0" and len(made) == 1
    train(tiny(tmp_path, task, method="lora", epochs=2, log_to="wandb,mlflow", overwrite=True))  # another run
    assert calls["wandb"][-1]["id"] != first["id"] and calls["mlflow"][-1]["run_id"] is None and len(made) == 2


def test_heads_image_pads_and_normalises() -> None:
    img = heads_image({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0])})
    assert img.shape == (1, 2, 2) and torch.equal(img[0], torch.tensor([[0.25, 1.0], [0.5, 0.0]]))


def test_unknown_loggers_and_missing_packages_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          task: str) -> None:
    assert parse_log_to(None) == ("csv",) and parse_log_to("csv, csv,tensorboard") == ("csv", "tensorboard")
    with pytest.raises(ConfigError, match="--log-to 'cvs': cvs is not a logger; choose from csv, tensorboard, "
                                          "wandb, mlflow"):
        parse_log_to("cvs")
    import importlib.util

    real = importlib.util.find_spec
    absent = ("wandb", "mlflow", "tensorboard")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    for name in ("wandb", "mlflow", "tensorboard"):
        with pytest.raises(ConfigError, match=f"--log-to {name} needs the {name} package, which is not installed: "
                                              f"pip install {name}"):
            parse_log_to(f"csv,{name}")
    with pytest.raises(ConfigError, match="needs the wandb package"):
        train(tiny(tmp_path / "run", task, method="lora", log_to="csv,wandb"))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_documented_example_runs(tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    import shlex

    from heartlora.cli.main import main

    pytest.importorskip("tensorboard")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "ECOSYSTEM.md").read_text()
    block = re.search(r"```bash\n(heartlora train [^\n]*--log-to[^\n]*)\n(tensorboard [^\n]*)\n```", doc)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(block.group(1))[1:] + [f"--task={task}", "--backbone=test_vit", "--no-pretrained",
                                               "--img-size=32", "--batch-size=32", "--epochs=2", "--ne=2"]
    assert main(argv) == 0
    out = tmp_path / "runs" / "digits-logged"
    assert [r["heads_on"] for r in _rows(out)] == ["10", "10"]
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    assert block.group(2).split()[-1] == "runs/digits-logged/tensorboard"
