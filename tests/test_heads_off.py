"""The heads-off rule (ne / ne_fraction / ne_tolerance / ne_refine): one parser, every form and every error, and
every caller (train's resolve, prune, the Trainer callback, the Python API) going through it."""

from __future__ import annotations

import numpy as np
import pytest

from heartlora.errors import ConfigError, SettingError
from heartlora.method import heads_off
from heartlora.method.auto_ne import DEFAULT_TOLERANCE
from heartlora.method.heads_off import AUTO, HeadsOff, check_count, parse_heads_off, parse_ne


@pytest.mark.parametrize("given, rule", [
    ({}, HeadsOff(AUTO, None, DEFAULT_TOLERANCE, True)),  # neither a count nor a share: chosen on data
    ({"ne": "auto"}, HeadsOff(AUTO, None, DEFAULT_TOLERANCE, True)),
    ({"ne": " AUTO "}, HeadsOff(AUTO, None, DEFAULT_TOLERANCE, True)),
    ({"ne": "auto", "tolerance": 0, "refine": False}, HeadsOff(AUTO, None, 0.0, False)),
    ({"ne": "auto", "tolerance": 0.5}, HeadsOff(AUTO, None, 0.5, True)),
    ({"ne": 12}, HeadsOff(12)),
    ({"ne": "12"}, HeadsOff(12)),  # the command line gives strings
    ({"ne": np.int64(3)}, HeadsOff(3)),
    ({"ne": 0}, HeadsOff(0)),
    ({"fraction": 0.25}, HeadsOff(None, 0.25)),
    ({"fraction": 1}, HeadsOff(None, 1.0)),
    ({"fraction": 0.0}, HeadsOff(None, 0.0)),
])
def test_every_form_parses(given, rule):
    assert parse_heads_off(**given) == rule
    assert parse_heads_off(rule.ne, rule.fraction, rule.tolerance, rule.refine) == rule  # parsing again: the same
    assert rule.auto == (rule.ne == "auto")


@pytest.mark.parametrize("given, message", [
    ({"ne": "some"}, "ne 'some' is neither a number of attention heads nor auto"),
    ({"ne": 2.5}, "ne 2.5 is neither a number of attention heads nor auto"),
    ({"ne": True}, "ne True is neither a number of attention heads nor auto"),
    ({"ne": -1}, "ne -1 must be 0 or more"),
    ({"ne": "-3"}, "ne -3 must be 0 or more"),
    ({"fraction": 1.5}, "ne_fraction 1.5 must be a share of the attention heads between 0 and 1"),
    ({"fraction": -0.1}, "ne_fraction -0.1 must be a share"),
    ({"fraction": float("nan")}, "ne_fraction nan must be a share"),
    ({"fraction": "0.2"}, "ne_fraction '0.2' must be a share"),
    ({"ne": 2, "fraction": 0.1}, r"give ne \(a number of heads, or auto\) or ne_fraction \(a share of heads\), not "
                                 "both"),
    ({"ne": 2, "tolerance": 0.1}, "ne_tolerance applies to ne auto only .*fixed count"),
    ({"fraction": 0.2, "refine": False}, "ne_refine applies to ne auto only .*fixed share"),
    ({"tolerance": -1.0}, "ne_tolerance -1.0 must be a number >= 0"),
    ({"tolerance": float("inf")}, "ne_tolerance inf must be a number >= 0"),
    ({"tolerance": "0.1"}, "ne_tolerance '0.1' must be a number >= 0"),
])
def test_every_error_is_one_line_naming_the_setting(given, message):
    with pytest.raises(SettingError, match=message) as e:
        parse_heads_off(**given)
    assert "\n" not in str(e.value)


def test_errors_name_the_callers_settings_and_the_cli_flags():
    with pytest.raises(SettingError) as e:
        parse_heads_off(fraction=0.1, refine=True, names={"ne_refine": "refine"})
    assert str(e.value).startswith("refine applies to ne auto only")
    assert e.value.for_cli().startswith("--no-ne-refine applies to --ne auto only")  # the flag's own spelling
    with pytest.raises(SettingError, match=r"^give ne .* or ne_fraction .*\)$"):
        parse_heads_off(default=None)  # a caller that wants the count or share given
    assert parse_ne(None) is None and parse_ne("7") == 7


def test_a_count_is_checked_against_the_model():
    check_count(8, [4, 4], "global")
    check_count("auto", [4, 4], "global")
    check_count(None, [4, 4], "layer")
    with pytest.raises(SettingError, match=r"ne 9 is more than the model's 8 attention heads: choose ne <= 8 "):
        check_count(9, [4, 4], "global")
    with pytest.raises(SettingError, match="ne 4 is more than vit's 3 heads in its smallest layer: .* per layer") as e:
        check_count(4, [4, 3], "layer", model="vit's")
    assert "(or --ne-fraction)" in e.value.for_cli()


def test_every_caller_goes_through_the_one_parser(monkeypatch, tmp_path, capsys):
    """train's resolve, prune (CLI and Python), the Trainer callback and end_of_warmup call parse_heads_off: the same
    bad ne gives the same message everywhere, in the caller's own names."""
    from heartlora.cli.main import main
    from heartlora.engine import TrainConfig, resolve
    from heartlora.engine import settings as config
    from heartlora.integrations import peft

    calls = []
    real = heads_off.parse_heads_off

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    for module in (heads_off, config, peft):
        monkeypatch.setattr(module, "parse_heads_off", spy)
    want = "ne 'x' is neither a number of attention heads nor auto"
    with pytest.raises(ConfigError, match=want):
        resolve(TrainConfig(task="digits", ne="x"))
    with pytest.raises(ConfigError, match=want):
        peft.prune_peft(tmp_path / "none", "digits", ne="x")  # before the folder is read
    assert main(["prune", str(tmp_path / "none"), "--task", "digits", "--ne", "x"]) == 2
    assert "error: --ne 'x' is neither" in capsys.readouterr().err  # at parse time, by heads_off.parse_ne
    assert len(calls) == 2
    try:
        from heartlora.integrations import hf_trainer as trainer
    except ImportError:  # transformers is optional
        return
    monkeypatch.setattr(trainer, "parse_heads_off", spy)
    with pytest.raises(ConfigError, match=want):
        trainer.HeartLoRACallback(warmup_steps=1, ne="x")
    assert len(calls) == 3
