"""``heartlora train --save-dtype``: the adapter stored at float16 / bfloat16 straight from training, and the accuracy
reported being the stored adapter's (the tiny random ViT and four-class task of test_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heartlora.engine import TrainConfig, load_trained, train
from heartlora.engine.checkpoint import load_checkpoint
from heartlora.engine.distributed import DistInfo
from heartlora.engine.metrics import accuracy
from heartlora.engine.trainer import Trainer
from heartlora.errors import ConfigError
from heartlora.method import read_adapter_info

TINY = dict(backbone="test_vit", pretrained=False, img_size=32, batch_size=32, progress=False, epochs=2)
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def tiny(out: Path, task: str, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "task": task, "out": str(out), **kw})


def stored_accuracy(run: Path, task: str, split: str) -> float:
    from heartlora.data import get_task

    model, _ = load_trained(run)
    x, y = get_task(task).load(split, img_size=32)
    return accuracy(model, x, y, CPU)


@pytest.mark.parametrize(("method", "dtype"), [("heart-lora", "bf16"), ("heart-bi-lora", "fp16")])
def test_the_adapter_is_stored_at_the_dtype_and_its_accuracy_is_the_stored_files(
        tmp_path: Path, task: str, method: str, dtype: str) -> None:
    kw = dict(method=method, ne=3, lr=0.05)  # a high rate: weights far from their initial values
    wide = train(tiny(tmp_path / "fp32", task, **kw))
    narrow = train(tiny(tmp_path / dtype, task, save_dtype=dtype, **kw))
    name = {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert read_adapter_info(tmp_path / dtype / "adapter.safetensors")["dtype"] == name
    assert narrow["settings"]["save_dtype"] == name and "save_dtype" not in wide["settings"]
    assert narrow["heads_off"] == wide["heads_off"]
    if method == "heart-lora":  # every value at 2 bytes instead of 4
        assert narrow["adapter_bytes"] * 2 == wide["adapter_bytes"]
    else:  # 1-bit codes unchanged, each factor's mean and std at 2 bytes instead of 4
        factors = len(read_adapter_info(tmp_path / dtype / "adapter.safetensors")["shapes"])
        assert wide["adapter_bytes"] - narrow["adapter_bytes"] == factors * 2 * 2
    assert narrow["accuracy"] == stored_accuracy(tmp_path / dtype, task, "val200")
    assert narrow["accuracy"] == json.loads((tmp_path / dtype / "metrics.json").read_text())["accuracy"]
    # The finished checkpoint keeps the trained float32 values (the same training: the float32 run's).
    kept, wide_kept = (load_checkpoint(tmp_path / run / "checkpoint.pt")["model"] for run in (dtype, "fp32"))
    assert kept.keys() == wide_kept.keys() and all(torch.equal(kept[k], wide_kept[k]) for k in kept)
    # Resuming the finished run returns what it recorded; asking for another dtype is refused.
    again = train(TrainConfig(out=str(tmp_path / dtype), resume=True, progress=False))
    assert again["status"] == "already_finished" and again["accuracy"] == narrow["accuracy"]
    for asked in ("fp32", "float32"):  # float32 by its own name too (the default's: settings() leaves it out)
        with pytest.raises(ConfigError, match="save_dtype float32 \\(run has " + name) as e:
            train(TrainConfig(out=str(tmp_path / dtype), resume=True, progress=False, save_dtype=asked))
        assert "the run has finished: `heartlora export" in str(e.value) and "--save-dtype" in e.value.for_cli()


def test_a_final_run_tests_the_stored_adapter(tmp_path: Path, task: str) -> None:
    metrics = train(tiny(tmp_path, task, method="lora", lr=0.05, protocol="final", save_dtype="bfloat16"))
    assert metrics["accuracy_split"] == "test"
    assert metrics["accuracy"] == stored_accuracy(tmp_path, task, "test")


def test_a_run_started_before_the_setting_existed_resumes_and_keeps_its_settings(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="lora", stop_after_epoch=1))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert "save_dtype" not in json.loads(state["settings"])  # what every run made before --save-dtype records
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False))
    assert done["status"] == "finished" and "save_dtype" not in done["settings"]
    assert "dtype" not in read_adapter_info(tmp_path / "adapter.safetensors")
    with pytest.raises(ConfigError, match="save_dtype float16 \\(run has float32\\)"):
        train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="fp16"))


@pytest.mark.parametrize(("kw", "message"), [
    (dict(method="lora", save_dtype="fp8"), "unknown save_dtype 'fp8': choose float32, float16 or bfloat16"),
    (dict(method="linear", save_dtype="fp16"), "save_dtype float16 applies to adapter methods only: linear"),
])
def test_a_dtype_that_cannot_be_stored_is_refused_before_anything_is_written(
        tmp_path: Path, task: str, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        train(tiny(tmp_path / "run", task, **kw))
    assert "--save-dtype" in e.value.for_cli() and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_last_evaluation_sees_the_adapter_values_as_stored(tmp_path: Path, task: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    evaluate = Trainer.evaluate

    def watched(self: Trainer, images: torch.Tensor, labels: torch.Tensor, exact: bool = False) -> float:
        factors = [p for n, p in self.model.named_parameters() if "lora_" in n]
        seen.append(bool(factors) and all(torch.equal(p, p.to(torch.bfloat16).float()) for p in factors))
        return evaluate(self, images, labels, exact)

    monkeypatch.setattr(Trainer, "evaluate", watched)
    train(tiny(tmp_path, task, method="lora", lr=0.05, protocol="final", save_dtype="bf16"))
    assert seen == [True]  # final: test once, with every factor rounded to bfloat16 as the file holds it


def test_a_k_bit_run_stopped_before_its_metrics_finishes_with_the_same_adapter(tmp_path: Path, task: str) -> None:
    """A run killed after its finished checkpoint but before metrics.json is resumed: the file it writes then and the
    accuracy it reports are the uninterrupted run's (the checkpoint holds the trained values, not decoded 1-bit ones,
    which a second encoding would shrink)."""
    first = train(tiny(tmp_path, task, method="bi-lora", lr=0.05, save_dtype="fp16"))
    stored = load_file(tmp_path / "adapter.safetensors")
    (tmp_path / "metrics.json").unlink()
    again = train(TrainConfig(out=str(tmp_path), resume=True, progress=False))
    resumed = load_file(tmp_path / "adapter.safetensors")  # its metadata differs: the run facts' timings
    assert resumed.keys() == stored.keys() and all(torch.equal(resumed[k], stored[k]) for k in stored)
    assert again["accuracy"] == first["accuracy"] and again["adapter_bytes"] == first["adapter_bytes"]


def test_resuming_with_the_default_named_another_way_keeps_the_runs_settings(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="linear", stop_after_epoch=1))
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="FP32"))
    assert done["status"] == "finished" and "save_dtype" not in done["settings"]
    again = train(TrainConfig(out=str(tmp_path), resume=True, progress=False))
    assert again["status"] == "already_finished" and again["accuracy"] == done["accuracy"]


def test_a_method_whose_save_takes_no_dtype_is_refused(tmp_path: Path, task: str) -> None:
    from heartlora.engine.training_methods import HeadLoRA, register_method

    class Plain(HeadLoRA):
        def save(self, model, path, run_facts):  # an override from before --save-dtype
            return super().save(model, path, run_facts)

    register_method("test-plain-save", Plain("LoRA, saved without a dtype"), replace=True)
    with pytest.raises(ConfigError, match=r"test-plain-save's save\(\) takes no dtype"):
        train(tiny(tmp_path / "run", task, method="test-plain-save", save_dtype="fp16"))
    assert not (tmp_path / "run").exists()


def test_a_run_not_finished_resumes_with_another_dtype_and_records_it(tmp_path: Path, task: str) -> None:
    """--save-dtype acts only when a run finishes: a stopped run may finish at another dtype, and every file of the
    run (checkpoint, config.yaml, metrics.json, train.log) then names the one its adapter was stored at."""
    train(tiny(tmp_path, task, method="lora", lr=0.05, save_dtype="fp16", stop_after_epoch=1))
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="bf16"))
    assert done["status"] == "finished" and done["settings"]["save_dtype"] == "bfloat16"
    assert read_adapter_info(tmp_path / "adapter.safetensors")["dtype"] == "bfloat16"
    assert done["accuracy"] == stored_accuracy(tmp_path, task, "val200")
    assert json.loads(load_checkpoint(tmp_path / "checkpoint.pt")["settings"])["save_dtype"] == "bfloat16"
    assert "save-dtype: bfloat16" in (tmp_path / "config.yaml").read_text()
    assert "resumed with save-dtype bfloat16 (was float16)" in (tmp_path / "train.log").read_text()
    again = train(TrainConfig(out=str(tmp_path), resume=True, progress=False))  # its files agree with each other
    assert again["status"] == "already_finished" and again["accuracy"] == done["accuracy"]


def test_back_to_float32_on_resume_records_no_dtype(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="lora", save_dtype="bf16", stop_after_epoch=1))
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="float32"))
    assert done["status"] == "finished" and "save_dtype" not in done["settings"]
    assert "dtype" not in read_adapter_info(tmp_path / "adapter.safetensors")
    assert "save_dtype" not in json.loads(load_checkpoint(tmp_path / "checkpoint.pt")["settings"])


def test_a_value_float16_cannot_hold_stops_the_run_and_resuming_at_bfloat16_finishes_it(
        tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    finish = Trainer.finish

    def overflowing(self: Trainer) -> dict:  # one factor beyond float16's range when training ends
        next(p for n, p in self.model.named_parameters() if "lora_B" in n).data[0, 0] = 1e6
        return finish(self)

    monkeypatch.setattr(Trainer, "finish", overflowing)
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path, task, method="lora", save_dtype="fp16"))
    message = str(e.value)
    assert f"cannot store {tmp_path / 'adapter.safetensors'} as float16" in message and "\n" not in message
    assert f"finish it with `heartlora train --out {tmp_path} --resume --save-dtype bfloat16`" in message
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "adapter.safetensors").exists()
    monkeypatch.setattr(Trainer, "finish", finish)
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="bf16"))
    assert done["status"] == "finished" and done["epochs_done"] == 2
    assert read_adapter_info(tmp_path / "adapter.safetensors")["dtype"] == "bfloat16"


def test_a_new_dtype_given_on_resume_is_checked_as_a_new_runs_would_be(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="linear", stop_after_epoch=1))
    with pytest.raises(ConfigError, match="save_dtype float16 applies to adapter methods only: linear"):
        train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="fp16"))
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False))  # the run is as it was
    assert done["status"] == "finished" and "save_dtype" not in done["settings"]


def test_a_diverged_run_is_not_told_that_another_dtype_would_store_it(
        tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    finish = Trainer.finish

    def diverged(self: Trainer) -> dict:
        next(p for n, p in self.model.named_parameters() if "lora_B" in n).data[0, 0] = float("nan")
        return finish(self)

    monkeypatch.setattr(Trainer, "finish", diverged)
    with pytest.raises(ConfigError, match="NaN") as e:
        train(tiny(tmp_path, task, method="lora", save_dtype="fp16"))
    assert "--save-dtype" not in str(e.value) and str(tmp_path / "adapter.safetensors") in str(e.value)


def test_a_changed_dtype_is_in_the_checkpoint_at_once(tmp_path: Path, task: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed with another --save-dtype and killed again before its next checkpoint: the checkpoint already holds
    the new value, so a plain resume finishes at it and config.yaml (written with it) repeats the run."""
    from heartlora.cli.main import main

    train(tiny(tmp_path, task, method="lora", save_dtype="fp16", stop_after_epoch=1))

    def killed(self: Trainer, epoch: int) -> None:
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_epoch", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train(TrainConfig(out=str(tmp_path), resume=True, progress=False, save_dtype="bf16"))
    assert json.loads(load_checkpoint(tmp_path / "checkpoint.pt")["settings"])["save_dtype"] == "bfloat16"
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path), "--resume",
                 "--quiet"]) == 0
    assert read_adapter_info(tmp_path / "adapter.safetensors")["dtype"] == "bfloat16"


def test_a_frozen_batchnorm_keeps_the_backbones_statistics_so_the_stored_adapter_scores_what_the_run_reported(
        tmp_path: Path, task: str) -> None:
    # MobileViT's convolutions carry BatchNorm. Trained in train mode, the frozen backbone's running statistics moved
    # with every batch, the run reported the accuracy of those moved statistics, and the adapter file (which stores
    # the adapters and the classifier, not the backbone's buffers) gave another model: 0.19 reported, 0.31 stored.
    metrics = train(tiny(tmp_path, task, method="lora", lr=0.05, backbone="mobilevit_xxs", img_size=64))
    model, _ = load_trained(tmp_path)
    stored = dict(model.named_buffers())
    kept = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    stats = [k for k in kept if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 20 and all(torch.equal(kept[k], stored[k]) for k in stats)
    from heartlora.data import get_task

    x, y = get_task(task).load("val200", img_size=64)
    assert metrics["accuracy"] == accuracy(model, x, y, CPU)
