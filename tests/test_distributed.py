"""Data-parallel training: two CPU processes under torchrun give the result of one process (gloo backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_task import write_tiny_vtab

from heartlora.engine import TrainConfig, train
from heartlora.engine.trainer import RUN_FILES

# drop-path off: its random masks are drawn per process for its share of the batch, so they differ between 1 and 2
# processes (README.md, "Many processes and machines", says what differs and why). Batch 19 on 96 training images
# leaves a last batch of one image: the second rank has none in that step and must still take it.
FLAGS = dict(backbone="test_vit", pretrained=False, img_size=32, batch_size=19, epochs=2, method="heart-lora", ne=3,
             drop_path=0.0, device="cpu")


def _cli_flags(cfg: dict) -> list[str]:
    argv = []
    for key, value in cfg.items():
        if key == "pretrained":
            argv.append("--no-pretrained")
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    task = write_tiny_vtab(tmp_path / "task")
    one = train(TrainConfig(task=task, out=str(tmp_path / "one"), progress=False, **FLAGS))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "heartlora", "train", "--task", task, "--out", str(tmp_path / "two"), "--quiet",
           *_cli_flags(FLAGS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())

    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["heads_off"] == one["heads_off"]  # the all-reduced scores pick the same heads on every rank
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # Only rank 0 wrote, and it wrote one run's files.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(RUN_FILES)
    assert done.stdout.count("heartlora train:") == 1


@pytest.mark.slow
def test_two_processes_report_the_accuracy_of_the_adapter_they_store(tmp_path: Path) -> None:
    """--save-dtype under torchrun: every rank evaluates the adapter as stored (its own rounding, no file in the
    run folder), and the accuracy the run reports is that of the file rank 0 wrote."""
    from heartlora.data import get_task
    from heartlora.engine import accuracy, load_trained
    from heartlora.engine.distributed import DistInfo
    from heartlora.method import read_adapter_info

    task = write_tiny_vtab(tmp_path / "task")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "heartlora", "train", "--task", task, "--out", str(tmp_path / "two"), "--quiet", "--lr", "0.05",
           "--save-dtype", "bf16", *_cli_flags(FLAGS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["settings"]["save_dtype"] == "bfloat16"
    assert read_adapter_info(tmp_path / "two")["dtype"] == "bfloat16"
    model, _ = load_trained(tmp_path / "two")
    x, y = get_task(task).load("val200", img_size=32)
    assert accuracy(model, x, y, DistInfo(0, 1, 0, torch.device("cpu"))) == two["accuracy"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(RUN_FILES)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux /proc")
def test_sigterm_to_one_rank_ends_the_job(tmp_path: Path) -> None:
    """SIGTERM to one worker of a torchrun job (an OOM killer, a user's `kill`) ends the whole job promptly: no rank
    waits in a collective for a rank that is gone."""
    import signal
    import time

    task = write_tiny_vtab(tmp_path / "task")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "heartlora", "train", "--task", task, "--out", str(out), "--quiet",
           *_cli_flags({**FLAGS, "epochs": 400})]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a failed test leaves nothing running
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(workers) == 2
        t0 = time.monotonic()
        os.kill(int(workers[0]), signal.SIGTERM)
        try:
            proc.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            pytest.fail("the job was still running 25 s after one rank got SIGTERM (a rank waits in a collective)")
        assert proc.returncode != 0 and not (out / "metrics.json").exists()
        assert time.monotonic() - t0 < 20  # torchrun's own grace period before SIGKILL is 30 s
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_device_names_are_checked_and_one_gpu_is_not_shared_by_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cuda:N` under torchrun would put every rank of a machine on GPU N (NCCL refuses duplicate GPUs at the first
    collective): refused in one line before the process group is joined; `cuda` takes the rank's own GPU."""
    from heartlora.engine.distributed import resolve_device
    from heartlora.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'cuda:x': use cpu, cuda, cuda:N or auto"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=3, local_world=4) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="names one GPU, but 2 processes run on this machine: use --device cuda"):
        resolve_device("cuda:1", local_rank=0, local_world=2)
    with pytest.raises(ConfigError, match="has 2 visible CUDA GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda:0 was asked for but no CUDA GPU is visible"):
        resolve_device("cuda:0")


@pytest.mark.slow
def test_two_ranks_draw_their_own_masks_and_resume_them(tmp_path: Path) -> None:
    """With adapter dropout and drop-path on, a 2-process run stopped after epoch 1 and resumed ends as the
    uninterrupted one: the checkpoint holds each rank's generator (it held rank 0's, which every rank then took,
    and rank 1's masks after the resume were rank 0's)."""
    from heartlora.engine.trainer import rank_seed

    assert rank_seed(42, 0) == 42 and len({rank_seed(42, r) for r in range(4)}) == 4  # rank 0 draws as one process
    task = write_tiny_vtab(tmp_path / "task")
    flags = _cli_flags({**FLAGS, "epochs": 3, "drop_path": 0.1, "dropout": 0.2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "heartlora", "train", "--task", task, "--out", str(out), "--quiet", *flags, *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun(tmp_path / "whole")
    torchrun(tmp_path / "parts", "--stop-after-epoch", "1")
    assert not (tmp_path / "parts" / "metrics.json").exists()
    torchrun(tmp_path / "parts", "--resume")
    whole, parts = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "parts"))
    assert parts["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-6)
    a, b = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "parts" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


WORKER = """
import os, sys
import torch.distributed as dist
rank, port, task, out, where = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from heartlora.engine import TrainConfig, train, checkpoint, loggers
def full(*args, **kwargs):
    raise OSError(28, "No space left on device")
if rank == 0 and where == "checkpoint":  # rank 0's first checkpoint write fails, as on a full disk
    checkpoint.save_checkpoint = full
if rank == 0 and where == "scores":  # rank 0's TensorBoard write of the warmup's head scores fails
    loggers.RunLoggers.head_scores = full
try:
    train(TrainConfig(task=task, out=out, progress=False, backbone="test_vit", pretrained=False, img_size=32,
                      batch_size=19, epochs=2, device="cpu",
                      **(dict(method="lora") if where == "checkpoint" else
                         dict(method="heart-lora", ne=2, warmup_epochs=1, log_to="csv"))))
    print("finished")
except Exception as exc:
    print("raised", type(exc).__name__, exc)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "scores"])
def test_a_failure_on_rank_0_ends_every_rank_of_a_group_the_caller_started(tmp_path: Path, where: str) -> None:
    """A process group the caller started (not torchrun, which would end the other ranks): rank 0's write fails
    (a checkpoint; the warmup's head scores in the --log-to logs), and rank 1, which was on its way to the next
    collective, raises too instead of waiting for gloo's 30-minute timeout."""
    import socket

    task = write_tiny_vtab(tmp_path / "task")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, task, str(tmp_path / "run"), where], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    what = "checkpoint.pt" if where == "checkpoint" else "the --log-to logs"
    assert f"raised RunFolderError cannot write {what}" in outs[0] and "the disk is full" in outs[0], outs
    assert "raised HeartLoRAError rank 0 failed (RunFolderError:" in outs[1], outs
    assert "rank 1 stops too" in outs[1]


@pytest.mark.slow
def test_runs_that_crashed_only_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--ne auto with fewer training images than processes (one rank's share of the held-out sample is empty, and
    it must still take part in the reductions), and --method full on DINOv2 (its mask token, which no classifier
    reads, was made trainable and DDP refused it at the second step)."""
    import tiny_task

    plain = write_tiny_vtab(tmp_path / "task")  # 96 training images: two steps of 48
    monkeypatch.setitem(tiny_task.SPLIT_SIZES, "train800", 1)
    monkeypatch.setitem(tiny_task.SPLIT_SIZES, "val200", 5)
    task = write_tiny_vtab(tmp_path / "one_image")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: str, *flags: str) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "heartlora", "train", "--out", str(tmp_path / out), "--quiet", "--no-pretrained", "--device", "cpu",
               "--drop-path", "0", "--epochs", "1", *flags]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / out / "metrics.json").read_text())

    auto = torchrun("auto", "--task", task, "--backbone", "test_vit", "--img-size", "32", "--ne", "auto")
    assert auto["ne_choice"]["images"] == 1 and auto["world_size"] == 2
    full = torchrun("full", "--task", plain, "--backbone", "dinov2_small",
                    "--img-size", "28", "--batch-size", "48", "--method", "full")
    assert full["world_size"] == 2 and full["history"][-1]["epoch"] == 1
