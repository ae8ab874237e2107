"""One source of the adapter's defaults: HeartLoRAConfig. A user's own loop with ``HeartLoRAConfig()`` gets the adapter
``heartlora train`` attaches; TrainConfig's errors name the field in Python and the flag in the CLI; adapter files
keep the scale they store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import heartlora as hl
from heartlora.cli.main import DEMO, build_parser, main
from heartlora.engine import METHODS, TrainConfig, resolve
from heartlora.engine.settings import ADAPTER_FIELDS
from heartlora.errors import ConfigError, SettingError
from heartlora.method.config import DEFAULT_SCALE, ONE_BIT_SCALE

from conftest import make_family


def test_scale_follows_bits_as_the_cli_does():
    assert hl.HeartLoRAConfig().scale == DEFAULT_SCALE == 4.0  # chosen on val200 (docs/research/sweeps/defaults.md)
    assert hl.HeartLoRAConfig(bits=1).scale == ONE_BIT_SCALE == 16.0
    assert hl.HeartLoRAConfig(bits=2).scale == 4.0  # only 1 bit was chosen for separately
    assert hl.HeartLoRAConfig(bits=1, scale=2.5).scale == 2.5  # asked for: kept
    assert hl.HeartLoRAConfig() == hl.HeartLoRAConfig(scale=4.0)


@pytest.mark.parametrize("name", ["linear", "full", "lora", "bi-lora", "heart-lora", "heart-lora-layer",
                                  "heart-bi-lora"])
def test_the_adapter_of_a_default_run_is_heartloraconfigs_default(name):
    cfg = resolve(TrainConfig(task="digits", method=name))
    assert cfg.adapter_config() == hl.HeartLoRAConfig(bits=METHODS[name].bits)
    assert {k: getattr(cfg, k) for k in ADAPTER_FIELDS} == {  # the public attributes read the same adapter
        k: getattr(hl.HeartLoRAConfig(bits=METHODS[name].bits), k) for k in ADAPTER_FIELDS}


def test_given_adapter_settings_reach_the_adapter_and_a_float_method_with_1_bit_gets_its_scale():
    cfg = resolve(TrainConfig(task="digits", method="lora", targets="v,q,o", rank=4, dropout=0.1, bits=1))
    assert cfg.adapter_config() == hl.HeartLoRAConfig(targets=("q", "v", "o"), rank=4, dropout=0.1, bits=1)
    assert cfg.scale == 16.0 and any(n.startswith("--bits 1: scale 16") for n in cfg.notes)
    assert resolve(TrainConfig(task="digits", method="bi-lora", scale=2.0)).adapter_config().scale == 2.0


def test_the_demo_keeps_its_settings():
    """`heartlora demo` passes its flags explicitly; its resolved settings are those of the figures in README.md
    (before HeartLoRAConfig held the defaults), so `make demo` trains the same adapter and prints the same figures."""
    args = build_parser().parse_args(["demo"])
    settings = {**DEMO, **{k: getattr(args, k) for k in ("task", "epochs", "img_size", "out", "threads")
                           if getattr(args, k) is not None}}
    cfg = resolve(TrainConfig(**settings, resume=True, device="auto"))
    assert cfg.adapter_config() == hl.HeartLoRAConfig()
    assert cfg.settings() == {
        "task": "mnist", "method": "heart-lora", "backbone": "dinov2_small", "pretrained": True, "pool": "cls+mean",
        "targets": ["q", "v"], "rank": 8, "scale": 4.0, "bits": 32, "dropout": 0.0, "ne": 18, "ne_fraction": None,
        "ne_tolerance": None, "ne_refine": None, "scope": "global", "score_mode": "abs_sum", "score_ema": None,
        "score_steps": None, "score_restart": False, "profile": "cpu", "epochs": 8, "warmup_epochs": 1, "lr": 0.001,
        "min_lr_ratio": 0.01, "weight_decay": 0.0001, "batch_size": 32, "img_size": 84, "drop_path": 0.0,
        "seed": 42, "eval_every": 1, "protocol": "final", "precision": "auto"}


def test_train_flags_take_help_and_defaults_from_heartloraconfig(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    fields = {f.name: f for f in dataclasses.fields(hl.HeartLoRAConfig)}
    for name in ADAPTER_FIELDS:
        assert fields[name].metadata["help"] in text, name
    assert "(default 4; 16 for 1-bit adapters)" in text and "(default q,v)" in text and "(default 8)" in text


@pytest.mark.parametrize("settings, argv, python, flag", [
    (dict(rank=0), ["--rank", "0"], "rank 0 is out of range: give at least 1",
     "--rank 0 is out of range: give at least 1"),
    (dict(targets="q,x"), ["--targets", "q,x"], "targets ['q', 'x'] are not valid",
     "--targets ['q', 'x'] are not valid"),
    (dict(warmup_epochs=0), ["--warmup-epochs", "0"], "warmup_epochs 0 must be between 1 and epochs 100",
     "--warmup-epochs 0 must be between 1 and --epochs 100"),
    (dict(ne=3, ne_refine=False), ["--ne", "3", "--no-ne-refine"], "ne_refine applies to ne auto only",
     "--no-ne-refine applies to --ne auto only"),
    (dict(method="full", bits=4), ["--method", "full", "--bits", "4"], "bits applies to adapter methods only",
     "--bits applies to adapter methods only"),
    (dict(method="lora", ne=3), ["--method", "lora", "--ne", "3"], "ne and ne_fraction switch attention heads off",
     "--ne and --ne-fraction switch attention heads off"),
    (dict(score_restart=True), ["--score-restart"], "score_restart restarts after a score_steps probe",
     "--score-restart restarts after a --score-steps probe"),
    (dict(resume=True, overwrite=True), ["--resume", "--overwrite"], "resume and overwrite contradict each other",
     "--resume and --overwrite contradict each other"),
])
def test_resolve_errors_name_the_field_in_python_and_the_flag_in_the_cli(settings, argv, python, flag, capsys):
    with pytest.raises(SettingError) as e:
        resolve(TrainConfig(task="digits", **settings))
    assert str(e.value).startswith(python) and e.value.for_cli().startswith(flag)
    assert main(["train", "--task", "digits", *argv]) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_an_adapter_file_keeps_its_stored_scale(tmp_path: Path):
    """A file saved at the old default scale 1.0 loads at 1.0 (and gives the same outputs), never at today's 4.0; a
    config without a scale is refused rather than given the default."""
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=2, scale=1.0))
    for p in hl.adapter_parameters(model):
        torch.nn.init.normal_(p, std=0.1)
    hl.save_adapter(model, tmp_path / "old.safetensors")
    assert hl.read_adapter_info(tmp_path / "old.safetensors")["config"]["scale"] == 1.0
    fresh, _ = make_family("timm_vit")
    loaded = hl.load_adapter(fresh, tmp_path / "old.safetensors")
    from heartlora.method import adapter_config

    assert adapter_config(loaded).scale == 1.0
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    stored = hl.HeartLoRAConfig(scale=1.0).to_dict()
    assert hl.HeartLoRAConfig.from_dict(stored).scale == 1.0
    with pytest.raises(ConfigError, match="hold no scale"):
        hl.HeartLoRAConfig.from_dict({k: v for k, v in stored.items() if k != "scale"})
