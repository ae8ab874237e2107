"""The run folder and the trainer's manners: one writer per folder (live and stale locks), failed writes as one
line with the previous checkpoint kept, leftovers of a kill cleaned, checksummed weights files, and no global side
effects (threads, process group, logging, matplotlib)."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import TINY, _fails
from tiny_task import write_tiny_vtab

from heartlora.cli.main import main
from heartlora.engine import TrainConfig, train
from heartlora.engine.checkpoint import load_checkpoint
from heartlora.engine.runfolder import LOCK_NAME, RUN_FILES
from heartlora.engine.state import TrainState

FLAGS = ["--method", "heart-lora", "--ne", "3", "--epochs", "2", *TINY]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_vtab(tmp_path_factory.mktemp("folder_task"))


def test_a_folder_held_by_a_live_process_is_refused_and_a_killed_holder_is_taken_over(
        tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = ("import sys, time; from heartlora.engine.runfolder import RunFolder; f = RunFolder(sys.argv[1]); "
            "f.acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        line = _fails(["train", "--task", task, *FLAGS, "--out", str(out)], capsys, f"in use by process {holder.pid}")
        assert str(out) in line
        assert time.perf_counter() - t0 < 30  # refused before any training, not after it
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file is still there, but no process holds it: the next run takes it over.
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    assert main(["train", "--task", task, *FLAGS, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # and removes it when done


def test_a_stale_lock_file_is_taken_over(tmp_path: Path, task: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999999\n")  # a process that no longer exists
    assert main(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file() and not (out / LOCK_NAME).exists()


def test_a_full_disk_is_one_line_keeps_the_previous_checkpoint_and_writes_no_metrics(
        tmp_path: Path, task: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import heartlora.engine.checkpoint as ckpt

    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):  # the second checkpoint file (end of epoch 2) hits a full disk
        if isinstance(f, io.BytesIO):  # the checksummed payload, serialised in memory first
            return real_save(obj, f, *args, **kwargs)
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    out = tmp_path / "run"
    line = _fails(["train", "--task", task, *FLAGS, "--out", str(out)], capsys, "the disk is full")
    assert str(out) in line and "checkpoint.pt" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint survives, whole
    assert not (out / "metrics.json").exists()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir()) and not (out / LOCK_NAME).exists()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # space freed: the run continues
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_metrics_json_is_written_last(tmp_path: Path, task: str, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from heartlora.engine import plots

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(plots, "training_curves", read_only)
    out = tmp_path / "run"
    _fails(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out)], capsys, "read-only")
    assert not (out / "metrics.json").exists()


def test_leftover_temporary_files_are_cleaned_by_resume_and_overwrite(tmp_path: Path, task: str) -> None:
    out = tmp_path / "run"
    assert main(["train", "--task", task, *FLAGS, "--out", str(out), "--stop-after-epoch", "1"]) == 0
    for name in (".checkpoint.pt.k1ll3d.tmp", ".adapter.safetensors.x.tmp"):
        (out / name).write_bytes(b"half a file")
    (out / "mine.tmp").write_text("a user's file")
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, "mine.tmp"])
    (out / ".checkpoint.pt.again.tmp").write_bytes(b"half")
    assert main(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, "mine.tmp"])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_on_a_virtual_file_system_names_the_cause(task: str, capsys: pytest.CaptureFixture) -> None:
    line = _fails(["train", "--task", task, *FLAGS, "--out", "/proc/heartlora-x"], capsys, "/proc")
    assert "does not accept new folders" in line and "no such file" not in line


def test_linear_and_full_weight_files_are_checksummed(tmp_path: Path, task: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    for method in ("linear", "full"):
        out = tmp_path / method
        assert main(["train", "--task", task, "--method", method, "--epochs", "1", *TINY, "--out", str(out)]) == 0
        good = (out / "adapter.safetensors").read_bytes()
        assert main(["eval", "--adapter", str(out), "--split", "val200"]) == 0
        capsys.readouterr()
        flipped = bytearray(good)
        flipped[-3] ^= 0x01  # the lowest bit of a weight near the end of the data
        (out / "adapter.safetensors").write_bytes(bytes(flipped))
        _fails(["eval", "--adapter", str(out), "--split", "val200"], capsys, "corrupt")
        _fails(["inspect", str(out)], capsys, "corrupt")  # issue 36: inspect showed what eval refused
        header = int.from_bytes(good[:8], "little")
        assert b"init_seed" in good[8:8 + header]
        relabelled = good[:8] + good[8:8 + header].replace(b"init_seed\\\": 42", b"init_seed\\\": 43") \
            + good[8 + header:]
        assert relabelled != good and len(relabelled) == len(good)
        (out / "adapter.safetensors").write_bytes(relabelled)
        _fails(["eval", "--adapter", str(out), "--split", "val200"], capsys, "corrupt")
        _fails(["inspect", str(out)], capsys, "corrupt")


def test_train_restores_threads_and_logs_through_the_module_logger(tmp_path: Path, task: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="heartlora.engine.trainer"):
        train(TrainConfig(task=task, backbone="test_vit", pretrained=False, img_size=32, batch_size=32, epochs=2,
                          method="heart-lora", ne=3, out=str(tmp_path / "r"), progress=False,
                          threads=before + 1, score_ema=0.5))
    assert torch.get_num_threads() == before
    assert "end of warmup: switched off 3 of 12 attention heads" in caplog.text
    state = TrainState.from_checkpoint(load_checkpoint(tmp_path / "r" / "checkpoint.pt"))
    assert state.tracker["ema"] == 0.5 and state.settings["score_ema"] == 0.5  # --score-ema reaches the tracker


def test_train_leaves_a_process_group_it_did_not_create(monkeypatch: pytest.MonkeyPatch) -> None:
    from heartlora.engine import trainer
    from heartlora.engine.distributed import DistInfo

    left = []
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(trainer, "setup", lambda device: DistInfo(0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr(trainer, "teardown", lambda barrier=True: left.append(barrier))
    monkeypatch.setattr(trainer, "_train", lambda cfg, info: {"status": "finished"})
    trainer.train(TrainConfig(task="x"))
    assert left == []  # the caller's group stays
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    trainer.train(TrainConfig(task="x"))
    assert left == [True]  # the group train() joined is left

    def fails(cfg, info):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_train", fails)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(TrainConfig(task="x"))
    assert left == [True, False]  # leaving on an error: no barrier the other ranks may never reach


def test_plots_do_not_switch_the_matplotlib_backend() -> None:
    import importlib

    import matplotlib

    from heartlora.engine import plots

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        importlib.reload(plots)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_failed_writes_name_their_cause() -> None:
    from heartlora.engine.runfolder import describe_os_error

    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system")) == "the file system is read-only"
    torch_full = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4050")
    assert describe_os_error(torch_full) == "the write stopped part-way (is the disk full?)"


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(
        tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("started\n")  # all a run leaves when it is killed inside its first epoch
    line = _fails(["train", "--out", str(out), "--resume"], capsys, "no checkpoint yet")
    assert "--task" in line and (out / "train.log").read_text() == "started\n"  # refused, and nothing lost
    assert main(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out), "--resume"]) == 0
    assert "starting it from the beginning" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    # A folder holding anything else of a run (here the adapter) but no checkpoint is still refused.
    (out / "checkpoint.pt").unlink()
    _fails(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out), "--resume"], capsys,
           "no checkpoint.pt to resume from")


def test_resume_and_overwrite_together_are_refused_by_name(tmp_path: Path, task: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    _fails(["train", "--task", task, *FLAGS, "--out", str(tmp_path / "run"), "--resume", "--overwrite"], capsys,
           "--resume and --overwrite contradict each other")
    assert not (tmp_path / "run").exists()


def test_resume_json_of_a_finished_run_prints_only_json(tmp_path: Path, task: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "already_finished"
    assert "holds a finished run" in captured.err


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path: Path, task: str) -> None:
    """A job scheduler's stop (SIGTERM) says what happened, releases the folder, and --resume continues."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "heartlora", "train", "--task", task, *FLAGS, "--epochs", "200", "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a no-op once it has exited; a failed test leaves nothing running
        proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert not (out / LOCK_NAME).exists() and not (out / "metrics.json").exists()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1


def test_the_sigterm_handler_is_only_borrowed(tmp_path: Path, task: str, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """main() called from a program with its own SIGTERM handler leaves it alone (the signal reaches the host, the
    command goes on); in a plain process the borrowed handler is given back."""
    import heartlora.cli.train as cli  # the train command prints its table there

    out = tmp_path / "run"
    assert main(["train", "--task", task, *FLAGS, "--epochs", "1", "--out", str(out)]) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    seen = []

    def host(signum, frame):  # the host program's own handler
        seen.append(signum)

    real_table = cli.print_table

    def table_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
        return real_table(*args, **kwargs)

    monkeypatch.setattr(cli, "print_table", table_after_a_sigterm)
    previous = signal.signal(signal.SIGTERM, host)
    try:
        assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is host
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_threads_below_one_are_one_line(tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    for value in ("0", "-1"):
        _fails(["train", "--task", task, *FLAGS, "--threads", value, "--out", str(tmp_path / value)], capsys,
               f"--threads {value} is out of range: give at least 1")


def _stopped_run(out: Path, task: str, seed: int = 42) -> None:
    assert main(["train", "--task", task, *FLAGS, "--seed", str(seed), "--stop-after-epoch", "1",
                 "--out", str(out)]) == 0


def test_a_damaged_or_foreign_checkpoint_is_refused_by_name(tmp_path: Path, task: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Issue 36: a flipped bit resumed with exit 0 and another loss; another run's checkpoint resumed as this run."""
    a, b = tmp_path / "a", tmp_path / "b"
    _stopped_run(a, task, 42)
    _stopped_run(b, task, 7)
    good = (a / "checkpoint.pt").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    (a / "checkpoint.pt").write_bytes(bytes(flipped))
    line = _fails(["train", "--out", str(a), "--resume", "--quiet"], capsys, str(a / "checkpoint.pt"))
    assert "damaged" in line or "cannot be read" in line
    (a / "checkpoint.pt").write_bytes((b / "checkpoint.pt").read_bytes())
    _fails(["train", "--out", str(a), "--resume", "--quiet"], capsys, "seed 7 (train.log: 42)")
    assert (a / "checkpoint.pt").read_bytes() == (b / "checkpoint.pt").read_bytes()  # nothing was written
    (a / "checkpoint.pt").write_bytes(good)
    assert main(["train", "--out", str(a), "--resume", "--quiet"]) == 0


def test_an_edited_or_damaged_metrics_json_is_not_shown(tmp_path: Path, task: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r"
    assert main(["train", "--task", task, *FLAGS, "--out", str(out)]) == 0
    capsys.readouterr()
    good = (out / "metrics.json").read_text()
    edited = json.loads(good) | {"accuracy": 0.99}
    for text in (json.dumps(edited), "", good[:100], "[]"):
        (out / "metrics.json").write_text(text)
        line = _fails(["train", "--out", str(out), "--resume", "--quiet"], capsys, str(out / "metrics.json"))
        assert "heartlora eval --adapter" in line and "--overwrite" in line
    # re-signed with a matching checksum, the edit still disagrees with the finished checkpoint
    from heartlora.engine.metrics import metrics_digest

    edited["sha256"] = metrics_digest(edited)
    (out / "metrics.json").write_text(json.dumps(edited))
    _fails(["train", "--out", str(out), "--resume", "--quiet"], capsys, "the finished checkpoint")
    (out / "metrics.json").write_text(good)
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == json.loads(good)["accuracy"]


@pytest.mark.parametrize("name", [LOCK_NAME, "train.log", "checkpoint.pt", "metrics.json"])
def test_no_link_in_a_run_folder_is_followed(tmp_path: Path, task: str, capsys: pytest.CaptureFixture,
                                             name: str) -> None:
    """Issue 36: a link at .heartlora.lock made train overwrite its target with a PID; train.log appended to it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    out = tmp_path / "r"
    out.mkdir()
    (out / name).symlink_to(victim)
    for extra in ([], ["--resume"]):
        _fails(["train", "--task", task, *FLAGS, "--out", str(out), *extra], capsys, f"{out / name} is a symbolic link")
    assert victim.read_text() == "the user's file\n" and (out / name).is_symlink()


def test_a_format_1_checkpoint_resumes_with_a_warning(tmp_path: Path, task: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints written before issue 36 have no checksum: they are resumed, with a warning that says so."""
    from heartlora.engine import checkpoint as ckpt

    out = tmp_path / "r"
    _stopped_run(out, task)
    state = load_checkpoint(out / "checkpoint.pt")
    old = {k: v for k, v in state.items() if k not in ("identity", "result")} | {"format": ckpt.FORMAT_1}
    torch.save(old, out / "checkpoint.pt")
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert "without a checksum" in caplog.text
    assert load_checkpoint(out / "checkpoint.pt")["identity"]["seed"] == 42  # rewritten in format 2


def test_a_checkpoint_of_other_backbone_weights_is_refused(tmp_path: Path, task: str, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity's backbone fingerprint: the same name giving other weights (an updated hub model, another local
    copy) is not resumed into."""
    import heartlora.engine.trainer as trainer

    out = tmp_path / "r"
    _stopped_run(out, task)
    monkeypatch.setattr(trainer, "backbone_fingerprint", lambda model, skip=(): "0" * 64)
    before = (out / "checkpoint.pt").read_bytes()
    _fails(["train", "--out", str(out), "--resume", "--quiet"], capsys, "was made on other backbone weights")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_an_old_metrics_json_without_a_checksum_is_shown_with_a_warning(tmp_path: Path, task: str,
                                                                        capsys: pytest.CaptureFixture,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "r"
    assert main(["train", "--task", task, *FLAGS, "--out", str(out)]) == 0
    old = json.loads((out / "metrics.json").read_text())
    old.pop("sha256")
    (out / "metrics.json").write_text(json.dumps(old, indent=2))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == old["accuracy"]
    assert "without a checksum" in caplog.text


def test_an_atomic_write_reaches_the_disk_before_its_rename_and_the_rename_before_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the fsyncs a power cut after the rename can leave an empty file where the previous checkpoint was:
    the file's data are synced before the rename, the folder's entry after it."""
    from heartlora import _paths

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "checkpoint.pt"
    with _paths.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert events == ["fsync file", "rename", "fsync folder"] and target.read_bytes() == b"new"


def test_a_finished_run_checks_its_adapter_and_is_never_told_to_overwrite_itself(
        tmp_path: Path, task: str, capsys: pytest.CaptureFixture) -> None:
    """metrics.json records the sha256 of the adapter it describes: a replaced or removed adapter is refused on
    resume instead of shown with the old file's accuracy and bytes; export does not write into a run's folder; and a
    damaged or missing checkpoint of a finished run points at its results, not at --overwrite (which deletes them)."""
    from heartlora._paths import file_sha256

    out = tmp_path / "run"
    argv = ["train", "--task", task, "--method", "lora", "--epochs", "1", "--out", str(out), *TINY]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter_sha256"] == file_sha256(out / "adapter.safetensors")
    capsys.readouterr()
    _fails(["export", str(out), str(out), "--format", "heartlora", "--dtype", "bf16", "--overwrite"], capsys,
           "holds a training run (metrics.json, checkpoint.pt)")
    assert main(["export", str(out), str(tmp_path / "bf16"), "--format", "heartlora", "--dtype", "bf16"]) == 0
    original = (out / "adapter.safetensors").read_bytes()
    (out / "adapter.safetensors").write_bytes((tmp_path / "bf16" / "adapter.safetensors").read_bytes())
    capsys.readouterr()
    _fails([*argv, "--resume"], capsys, "adapter.safetensors is not the file the run wrote (its sha256 differs)")
    (out / "adapter.safetensors").unlink()
    _fails([*argv, "--resume"], capsys, "adapter.safetensors is missing")
    (out / "adapter.safetensors").write_bytes(original)
    assert main([*argv, "--resume"]) == 0
    data = bytearray((out / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 1  # inside the payload
    (out / "checkpoint.pt").write_bytes(bytes(data))
    capsys.readouterr()
    line = _fails([*argv, "--resume"], capsys, "but the run had finished: its results are in")
    assert "--overwrite would delete them" in line and "start again with --overwrite" not in line
    (out / "checkpoint.pt").unlink()
    _fails([*argv, "--resume"], capsys, "holds no checkpoint.pt to resume from, but the run had finished")
