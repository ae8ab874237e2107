"""The command line's conventions: --version, --config FILE (YAML, TOML; the command line wins; a run folder's
config.yaml repeats the run), --quiet / --verbose on every command, transformers' load reports silenced."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from heartlora.cli.main import EXIT_ERROR, _parse, build_parser, main

DOC = Path(__file__).resolve().parents[1] / "docs" / "ECOSYSTEM.md"
TINY = {"backbone": "test_vit", "no-pretrained": True, "img-size": 32, "batch-size": 32, "epochs": 2, "ne": 2}


def _error(argv: list[str], capsys: pytest.CaptureFixture, match: str) -> None:
    assert main(argv) == EXIT_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_version(capsys: pytest.CaptureFixture) -> None:
    from heartlora import __version__

    assert main(["--version"]) == 0  # main returns the status of --help and --version, it does not exit
    assert capsys.readouterr().out.strip() == f"heartlora {__version__}"


def test_every_flag_with_a_default_names_it_in_its_help() -> None:
    """docs/CLI.md promises that ``heartlora COMMAND --help`` shows every flag's default: a flag that has one (not
    None, not an on/off switch) says "default" in its help text."""

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    silent = [f"{name} {action.option_strings[0]}" for name, parser in sub.choices.items() for action in parser._actions
              if action.option_strings and action.default not in (None, argparse.SUPPRESS)
              and not isinstance(action.default, bool) and "default" not in (action.help or "")]
    assert not silent, f"flags whose --help hides their default: {silent}"


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = [(name, p) for name, p in sub.choices.items() if name != "data"]
    data = next(a for a in sub.choices["data"]._actions if a.dest == "data_command")
    return commands + [(f"data {name}", p) for name, p in data.choices.items()]


def test_every_argument_has_help() -> None:
    """docs/CLI.md: ``--help`` lists every flag and argument with what it does."""
    bare = [f"{name} {(a.option_strings or [a.dest])[0]}" for name, p in _commands() for a in p._actions
            if not a.help]
    assert not bare, f"arguments with no help text: {bare}"


def test_config_help_names_a_key_its_command_takes() -> None:
    """Each command's --config help gives an example key: that command must take it (eval and serve once showed
    train's `img-size`, which they refuse)."""
    seen = 0
    for name, p in _commands():
        action = next((a for a in p._actions if "--config" in a.option_strings), None)
        if action is None:
            continue
        key = re.search(r"`([a-z-]+): ", action.help).group(1)
        assert f"--{key}" in {opt for a in p._actions for opt in a.option_strings}, (name, key)
        seen += 1
    assert seen == 3  # train, eval, serve


def test_every_command_takes_quiet_and_verbose() -> None:
    for name, p in _commands():
        flags = {opt for a in p._actions for opt in a.option_strings}
        assert {"--quiet", "--verbose"} <= flags, name


def test_the_documented_config_example_repeats_a_run(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """docs/ECOSYSTEM.md's example: its YAML file (with a tiny model and task given on the command line, which
    wins over the file) trains, the run's config.yaml trains the same run again, and eval reads it."""
    text = DOC.read_text()
    yaml_block = re.search(r"```yaml\n# digits.yaml\n(.*?)```", text, re.DOTALL).group(1)
    commands = re.search(r"```bash\n(heartlora train --config digits.yaml.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.yaml").write_text(yaml_block)
    tiny = [f"--task={task}"] + [f"--{k}" if v is True else f"--{k}={v}" for k, v in TINY.items()]
    for line in commands.strip().splitlines():
        argv = shlex.split(line.split("#")[0])[1:]
        if argv[0] == "train" and "digits.yaml" in argv:
            argv += tiny  # the command line wins over the file
        assert main(argv) == 0, capsys.readouterr().err
    first, again = tmp_path / "runs" / "digits", tmp_path / "runs" / "digits-again"
    written = (first / "config.yaml").read_text()
    assert written == (again / "config.yaml").read_text()
    assert f"task: {task}" in written and "epochs: 2" in written and "no-pretrained: true" in written
    keys = [line.split(":")[0] for line in written.splitlines() if not line.startswith("#")]
    assert "profile: cpu" in written and "out" not in keys and "device" not in keys  # run-time flags left out
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert m1["accuracy"] == m2["accuracy"] and m1["heads_off"] == m2["heads_off"]
    assert f"% on {task} val200" in capsys.readouterr().out.splitlines()[-1]  # eval


def test_config_files_yaml_toml_and_the_command_line_wins(tmp_path: Path) -> None:
    toml = tmp_path / "eval.toml"
    toml.write_text('adapter = "runs/a"\nsplit = "val200"\nbatch_size = 16\njson = true\n')
    args = _parse(["eval", "--config", str(toml), "--split", "test"])
    assert (args.adapter, args.split, args.batch_size, args.json) == ("runs/a", "test", 16, True)
    yml = tmp_path / "serve.yml"
    yml.write_text("adapter: [a.safetensors, b.safetensors]\nport: 9000\nmax-wait-ms: 2\n")
    args = _parse(["serve", f"--config={yml}"])
    assert (args.adapter, args.port, args.max_wait_ms) == (["a.safetensors", "b.safetensors"], 9000, 2.0)
    args = _parse(["serve", "--config", str(yml), "--adapter", "c.safetensors"])
    assert args.adapter == ["c.safetensors"]  # given on the command line: the file's list is not extended
    train = tmp_path / "train.yaml"
    train.write_text("task: digits\ntargets: [q, k, v]\nno-pretrained: true\nquiet: true\nne: auto\n")
    args = _parse(["train", "--config", str(train)])
    assert (args.targets, args.pretrained, args.progress, args.ne) == ("q,k,v", False, False, "auto")


def test_a_flag_on_the_command_line_wins_over_the_files_flag_it_excludes(tmp_path: Path, monkeypatch) -> None:
    """serve takes --adapter or --adapter-dir, not both: one in the file and the other on the command line is the
    command line's (it was "not both"); both in one place stays an error."""
    from heartlora.cli import serving
    from heartlora.errors import ConfigError

    served = []
    monkeypatch.setattr(serving, "require_serving", lambda: None)
    monkeypatch.setattr(serving, "require_api", lambda: None)
    monkeypatch.setattr(serving, "bank_from_files", lambda files, *a, **k: (served.append(("files", files)),
                                                                             (_Stop(), 32))[1])
    monkeypatch.setattr(serving, "bank_from_folder", lambda folder, *a, **k: (served.append(("folder", folder)),
                                                                               (_Stop(), 32))[1])
    monkeypatch.setattr(serving, "create_api", lambda *a, **k: (_ for _ in ()).throw(_Stopped()))
    folder_file = tmp_path / "folder.yaml"
    folder_file.write_text("adapter-dir: adapters/\nport: 9000\n")
    with pytest.raises(_Stopped):
        serving.cmd_serve(_parse(["serve", "--config", str(folder_file), "--adapter", "c.safetensors"]))
    files_file = tmp_path / "files.yaml"
    files_file.write_text("adapter: [a.safetensors]\n")
    with pytest.raises(_Stopped):
        serving.cmd_serve(_parse(["serve", "--config", str(files_file), "--adapter-dir", "elsewhere/"]))
    assert served == [("files", ["c.safetensors"]), ("folder", "elsewhere/")]
    both = tmp_path / "both.yaml"
    both.write_text("adapter: [a.safetensors]\nadapter-dir: adapters/\n")
    with pytest.raises(ConfigError, match="not both"):
        serving.cmd_serve(_parse(["serve", "--config", str(both)]))
    with pytest.raises(ConfigError, match="not both"):
        serving.cmd_serve(_parse(["serve", "--adapter", "a.safetensors", "--adapter-dir", "adapters/"]))


class _Stop:
    def preload(self) -> None:
        pass

    def available(self) -> list[str]:
        return []

    tasks: dict = {}


class _Stopped(Exception):
    """Raised where the server would be built: what was chosen before it is the test's."""


@pytest.mark.parametrize("content, match", [
    ("epochs: 2\nwarmup: 1\n", "'warmup' is not a flag of heartlora train"),
    ("epochs: [2, 3]\n", "epochs takes one value"),
    ("epochs: many\n", "epochs: --epochs many is not a whole number"),
    ("scope: everywhere\n", "scope 'everywhere' is not one of global, layer"),
    ("no-pretrained: 3\n", "no-pretrained is a switch: give true or false"),
    ("- epochs\n", "must hold a mapping of flag names to values"),
    ("epochs: [2\n", "is not valid YAML"),
])
def test_bad_config_files_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, content: str,
                                                  match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    _error(["train", "--config", str(path)], capsys, match)


def test_missing_and_unknown_config_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _error(["eval", "--config", str(tmp_path / "none.yaml")], capsys, "does not exist")
    (tmp_path / "c.ini").write_text("[x]\n")
    _error(["eval", "--config", str(tmp_path / "c.ini")], capsys, "name a .yaml, .yml or .toml file")
    (tmp_path / "c.toml").write_text("adapter = \n")
    _error(["eval", "--config", str(tmp_path / "c.toml")], capsys, "is not valid TOML")


def test_transformers_load_report_only_with_verbose(task: str, tmp_path: Path) -> None:
    """A local hf: backbone saved with a classifier made transformers print an 11-line LOAD REPORT (and a progress
    bar) on every load; it is shown with --verbose only. In a fresh process, as a user runs it (transformers' log
    handler keeps the stderr of the moment it was first used)."""
    import os
    import subprocess
    import sys

    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    hf = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(hf)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "heartlora", "train", "--task", task, "--backbone", f"hf:{hf}", "--img-size", "32",
            "--epochs", "1", "--ne", "1", "--quiet", "--threads", "1"]
    quiet = subprocess.run([*base, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=300)
    verbose = subprocess.run([*base, "--out", str(tmp_path / "b"), "--verbose"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "LOAD REPORT" in verbose.stderr and "Loading weights" in verbose.stderr
    assert "LOAD REPORT" not in quiet.stderr + quiet.stdout and "Loading weights" not in quiet.stderr


def test_a_config_file_that_says_one_flag_twice_or_a_switch_for_text_is_refused(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys and both spellings of a flag mapped to one setting: the file said lr
    twice and trained at the second silently. A bare true for a text flag became the text "True"."""
    from heartlora.errors import ConfigError

    cases = {"lr: 0.001\nlr: 5\n": "'lr' is given twice; keep one",
             "img-size: 28\nimg_size: 56\n": "'img-size' and 'img_size' are the same flag; keep one",
             "task: true\n": "task takes text, not true"}
    for i, (text, why) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(why)):
            _parse(["train", "--config", str(path)])
    (tmp_path / "ok.yaml").write_text("task: 'true'\nepochs: 2\n")  # quoted, the word is meant
    assert _parse(["train", "--config", str(tmp_path / "ok.yaml")]).task == "true"
    merged = tmp_path / "merge.yaml"  # a YAML merge key is no duplicate (its anchor sits under a non-flag key)
    merged.write_text("base: &b {epochs: 2}\n<<: *b\n")
    with pytest.raises(ConfigError, match="'base' is not a flag"):
        _parse(["train", "--config", str(merged)])
    with pytest.raises(ConfigError, match=r"--config is given 2 times \(a.yaml, b.yaml\): give one file"):
        _parse(["train", "--config", "a.yaml", "--config=b.yaml"])


def test_a_runs_config_yaml_names_its_local_paths_absolutely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml stored `task: vtab:data/tiny` as given, so `--config runs/x/config.yaml` from another directory
    did not find the data: a relative vtab: or hf: path that exists is written absolute, the rest as it is."""
    from heartlora.engine.settings import portable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    where = tmp_path.resolve() / "data" / "tiny"
    assert portable("vtab:data/tiny") == f"vtab:{where}"
    assert portable("vtab:./data/tiny@4shot") == f"vtab:{where}@4shot"
    assert portable("hf:data/tiny") == f"hf:{where}"
    assert portable("data/tiny", bare_folder=True) == "data/tiny"  # a model folder only with its config.json
    (where / "config.json").write_text("{}")
    assert portable("data/tiny", bare_folder=True) == str(where) and portable("data/tiny") == "data/tiny"
    for same in ("digits", "fashion_mnist@4shot", "hf:facebook/dinov2-small", f"vtab:{where}", "vtab:missing/dir"):
        assert portable(same) == same
    from heartlora.engine.settings import TrainConfig, flag_settings

    written = flag_settings(TrainConfig(task="vtab:data/tiny", backbone="hf:data/tiny"))
    assert (written["task"], written["backbone"]) == (f"vtab:{where}", f"hf:{where}")


def test_a_run_resumes_from_its_config_yaml_whose_paths_are_absolute(task: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started with a relative vtab: folder stores it as given in its checkpoint and absolute in config.yaml:
    `--config DIR/config.yaml --resume` must see the same task, not other settings."""
    import shutil

    shutil.copytree(task[len("vtab:"):], tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in TINY.items()]
    assert main(["train", "--task", "vtab:data", *flags, "--epochs", "2", "--stop-after-epoch", "1", "--out", "run",
                 "--quiet"]) == 0
    assert f"task: vtab:{(tmp_path / 'data').resolve()}" in (tmp_path / "run" / "config.yaml").read_text()
    assert main(["train", "--config", "run/config.yaml", "--out", "run", "--resume", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
