"""The ``heartlora`` command: the happy paths, and bad input → one line ``error: …``, exit ≠ 0, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heartlora.cli.main import DEMO, EXIT_ERROR, main

TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, task: str) -> Path:
    out = tmp_path_factory.mktemp("cli_run") / "run"
    assert main(["train", "--task", task, "--method", "heart-lora", "--ne", "4", "--epochs", "2", "--out", str(out),
                 *TINY]) == 0
    return out


def _fails(argv: list[str], capsys: pytest.CaptureFixture, match: str) -> str:
    """Run the CLI, expect a one-line error containing ``match`` and a non-zero exit, return the line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == EXIT_ERROR, captured
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert match in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_train_prints_a_summary_and_writes_the_run(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["heads_off_count"] == 4 and metrics["protocol"] == "val"
    assert main(["train", "--out", str(run_dir), "--resume", "--quiet"]) == 0  # finished: shows the stored result
    captured = capsys.readouterr()
    out = "".join(captured.out.split())  # the table may wrap long paths
    assert "holds a finished run" in captured.err
    assert "accuracy(val200)" in out and "4of12" in out and "responsiveness.png" in out


def test_eval_predict_inspect(run_dir: Path, task: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert main(["eval", "--adapter", str(run_dir), "--split", "val200", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(metrics["accuracy"]) and result["images"] == 32

    folder = Path(task.split(":", 1)[1])
    images = sorted(folder.glob("test_00*.png"))[:3]
    assert main(["predict", "--adapter", str(run_dir / "adapter.safetensors"), *map(str, images), "--top-k", "2",
                 "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 3 and all(len(p["top"]) == 2 for p in preds)
    assert sum(t["prob"] for t in preds[0]["top"]) <= 1.0 + 1e-6

    plot = tmp_path / "heads.png"
    assert main(["inspect", str(run_dir), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "8 of 12" in out and "adapter bytes" in out and plot.stat().st_size > 1000
    # inspect and export also take the adapter as --adapter, as eval, predict and serve do
    assert main(["inspect", "--adapter", str(run_dir), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["adapter"]["layers"]
    assert sum(on for layer in layers for on in layer["head_mask"]) == 8
    _fails(["inspect", str(run_dir), "--adapter", str(tmp_path / "other")], capsys, "two adapters given")
    _fails(["export", str(tmp_path / "peft")], capsys, "ADAPTER or --adapter ADAPTER")


def test_data_list_and_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "list"]) == 0
    assert "digits" in capsys.readouterr().out
    assert main(["data", "export", "digits", str(tmp_path / "digits"), "--img-size", "8"]) == 0
    assert (tmp_path / "digits" / "train800.txt").is_file()


def test_resume_without_out_continues_the_default_folder(tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """README: after a kill, "the same command with --resume" finishes; the same flags name the same folder."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--task", task, "--method", "lora", "--epochs", "1", *TINY]
    assert main(argv) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert f"{Path('runs') / folder.name} holds a finished run" in capsys.readouterr().err


def test_a_warmup_that_fills_the_run_is_noted(tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    """--epochs 1 on a heart method: the one epoch is the scoring warmup, so the heads go off after the last step
    and the learning rate never decays. Allowed (a smoke run), but said; a run with epochs after warmup is not."""
    argv = ["train", "--task", task, "--method", "heart-lora", "--ne", "3", *TINY]
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    assert "scoring fills the whole run (3 of its 3 optimizer steps)" in err and "never decays" in err
    assert main([*argv, "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path / "two")]) == 0
    err = capsys.readouterr().err
    assert "scoring fills" not in err and "never decays" not in err


def test_classes_without_training_images_are_noted(tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    """A test label no training image has (a typo, or a class VTAB-1K's 1,000 images missed) widens the classifier:
    allowed, since real VTAB-1K tasks can miss classes, but said."""
    import shutil

    folder = tmp_path / "t"
    shutil.copytree(task.split(":", 1)[1], folder)
    with (folder / "test.txt").open("a") as f:
        f.write("test_000.png 6\n")
    assert main(["train", "--task", f"vtab:{folder}", "--method", "linear", "--epochs", "1",
                 "--out", str(tmp_path / "r"), *TINY]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "note: 3 of the task's 7 classes have no training image in train800 (labels 4, 5, 6)" in err


def test_predict_refuses_top_k_below_one_and_names_subfolders(run_dir: Path, task: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    image = str(sorted(Path(task.split(":", 1)[1]).glob("test_00*.png"))[0])
    _fails(["predict", "--adapter", str(run_dir), image, "--top-k", "0"], capsys, "--top-k 0")
    (tmp_path / "images" / "train").mkdir(parents=True)
    _fails(["predict", "--adapter", str(run_dir), str(tmp_path)], capsys, "subfolders (images) are not searched")


def test_unknown_task_and_backbone(tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    _fails(["train", "--task", "no_such_task", "--out", str(tmp_path / "a"), *TINY], capsys, "unknown task")
    _fails(["train", "--task", task, "--out", str(tmp_path / "b"), *TINY, "--backbone", "no_such_net"], capsys,
           "no_such_net")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_backbone_without_attention_heads(tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    _fails(["train", "--task", task, "--method", "lora", "--out", str(tmp_path / "r"), *TINY,
            "--backbone", "test_resnet"], capsys, "attention")
    assert not (tmp_path / "r").exists()


def test_ne_larger_than_the_head_count(tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    _fails(["train", "--task", task, "--ne", "99", "--out", str(tmp_path / "r"), *TINY], capsys, "--ne 99")
    _fails(["train", "--task", task, "--method", "lora", "--ne", "2", "--out", str(tmp_path / "r"), *TINY], capsys,
           "heart-lora")
    assert not (tmp_path / "r").exists()


def test_output_folder_of_another_run(run_dir: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(run_dir)
    line = _fails(["train", "--task", task, "--method", "lora", "--epochs", "1", "--out", str(run_dir), *TINY],
                  capsys, "already holds")
    assert "--resume" in line and "--overwrite" in line
    _fails(["train", "--out", str(run_dir), "--resume", "--lr", "0.3", "--quiet"], capsys, "other settings")
    assert _snapshot(run_dir) == before


def test_corrupt_and_mismatched_adapters(run_dir: Path, tmp_path: Path, task: str,
                                         capsys: pytest.CaptureFixture) -> None:
    good = (run_dir / "adapter.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(good[:-10] + bytes([good[-10] ^ 0xFF]) + good[-9:])
    for path in (truncated, flipped):
        _fails(["eval", "--adapter", str(path), "--task", task], capsys, str(path))
        _fails(["inspect", str(path)], capsys, str(path))
    _fails(["predict", "--adapter", str(tmp_path / "missing.safetensors"), str(truncated)], capsys, "does not exist")
    (tmp_path / "no_run").mkdir()
    for argv in (["inspect", str(tmp_path / "no_run")], ["export", str(tmp_path / "no_run"), str(tmp_path / "x")]):
        _fails(argv, capsys, "is a folder without adapter.safetensors")
    _fails(["eval", "--adapter", str(run_dir), "--task", "digits"], capsys, "classes")
    assert (run_dir / "adapter.safetensors").read_bytes() == good


def test_unreadable_image(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "photo.png"
    bad.write_text("not a picture")
    _fails(["predict", "--adapter", str(run_dir), str(bad)], capsys, "cannot read image")
    _fails(["predict", "--adapter", str(run_dir), str(tmp_path / "nope.jpg")], capsys, "does not exist")


def test_prune_from_inside_the_peft_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    # `heartlora prune .` writes beside the folder it names (Path(".").with_name raised ValueError: a traceback).
    from heartlora.cli.peft_io import pruned_path

    folder = tmp_path / "my_adapter"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert pruned_path(".") == tmp_path / "my_adapter.pruned.safetensors"
    assert pruned_path("./") == pruned_path(str(folder)) == pruned_path("../my_adapter")
    _fails(["prune", ".", "--task", "digits", "--ne", "1"], capsys, "adapter_config.json")
    monkeypatch.chdir("/")
    _fails(["prune", ".", "--task", "digits", "--ne", "1"], capsys, "pass --out FILE")


def test_eval_samples_a_few_shot_task_as_the_run_did(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    # A NAME@Kshot run's train800 is drawn with its --seed: eval's default is that seed (it was 0), --seed wins.
    from heartlora.data.fewshot import FewShotTask

    out = tmp_path / "r"
    assert main(["train", "--task", f"{task}@2shot", "--method", "lora", "--epochs", "1", "--seed", "7",
                 "--out", str(out), *TINY]) == 0
    seeds: list[int] = []
    load = FewShotTask.load
    monkeypatch.setattr(FewShotTask, "load", lambda self, split, img_size, seed=0: (
        seeds.append(seed), load(self, split, img_size, seed))[1])
    assert main(["eval", "--adapter", str(out), "--split", "train800", "--json"]) == 0
    assert main(["eval", "--adapter", str(out), "--split", "train800", "--seed", "3", "--json"]) == 0
    assert seeds == [7, 3]
    capsys.readouterr()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from heartlora.errors import TaskError

    with pytest.raises(TaskError):
        main(["train", "--debug", "--task", "no_such_task", "--out", str(tmp_path / "a"), *TINY])


def test_demo_settings_resolve() -> None:
    from heartlora.engine import TrainConfig, resolve

    cfg = resolve(TrainConfig(**DEMO))
    assert cfg.backbone == "dinov2_small" and cfg.method == "heart-lora" and cfg.img_size <= 112
    assert cfg.protocol == "final" and cfg.ne <= 72


def test_readme_python_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    exec(compile(code.replace("runs/readme-example", str(tmp_path / "example")), "README.md", "exec"), {})
    words = capsys.readouterr().out.split()
    assert words[0] == "val200" and words[2:5] == ["3", "of", "12"]
    assert (tmp_path / "example" / "metrics.json").is_file()


def test_resume_after_a_real_kill(task: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from heartlora.engine.checkpoint import load_checkpoint

    flags = ["train", "--task", task, "--method", "heart-lora", "--ne", "3", "--epochs", "8", *TINY]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "heartlora", *flags, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 2:
            proc.send_signal(signal.SIGKILL)  # mid-epoch, no chance to clean up
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert main(["train", "--out", str(tmp_path / "killed"), "--resume", "--quiet"]) == 0
    a = load_file(tmp_path / "whole" / "adapter.safetensors")
    b = load_file(tmp_path / "killed" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["accuracy"] == whole["accuracy"] and resumed["heads_off"] == whole["heads_off"]


def test_eval_and_predict_take_threads(run_dir: Path, task: str, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)  # the test process keeps its own threads
    assert main(["eval", "--adapter", str(run_dir), "--split", "val200", "--threads", "1", "--json"]) == 0
    image = str(sorted(Path(task.split(":", 1)[1]).glob("test_00*.png"))[0])
    assert main(["predict", "--adapter", str(run_dir), image, "--threads", "2", "--json"]) == 0
    assert asked == [1, 2]
    capsys.readouterr()
    for command in (["eval", "--adapter", str(run_dir)], ["predict", "--adapter", str(run_dir), image]):
        _fails([*command, "--threads", "0"], capsys, "--threads")
    assert asked == [1, 2]


def test_eval_refuses_other_classes_and_sizes_the_backbone_cannot_take_and_notes_training_images(
        task: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An adapter trained on cat/dog/bird/fish evaluated on a task of colours has a number, not an accuracy; a size
    the backbone refuses is one line, not a traceback; a split the adapter trained on is said to be one."""
    import shutil

    source = Path(task.split(":", 1)[1])
    folders = {}
    for name, classes in (("animals", "cat dog bird fish"), ("colours", "red green blue yellow")):
        folders[name] = tmp_path / name
        shutil.copytree(source, folders[name])
        (folders[name] / "classes.txt").write_text("\n".join(classes.split()) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--task", f"vtab:{folders['animals']}", "--method", "lora", "--epochs", "1", "--out",
                 str(run), *TINY]) == 0
    capsys.readouterr()
    line = _fails(["eval", "--adapter", str(run), "--task", f"vtab:{folders['colours']}"], capsys,
                  "are not the ones the adapter was trained on (cat, dog, bird, fish, in that order)")
    assert "red, green, blue, yellow" in line
    assert main(["eval", "--adapter", str(run), "--task", task, "--split", "val200"]) == 0  # numbered classes: no
    capsys.readouterr()  # names to compare, so the class count alone is checked (as before)
    _fails(["eval", "--adapter", str(run), "--img-size", "40"], capsys,
           "--img-size 40: the backbone does not take 40 px images (")
    assert main(["eval", "--adapter", str(run), "--split", "train800", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["notes"] == ["train800 holds training images of this adapter (its val protocol trained on "
                               "train800): not a held-out accuracy"]
    assert main(["eval", "--adapter", str(run), "--split", "val200", "--json"]) == 0
    assert "notes" not in json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(run), "--split", "val200", "--img-size", "48"]) == 0
    assert "note: trained at 32 px, evaluated at 48 px" in capsys.readouterr().out
