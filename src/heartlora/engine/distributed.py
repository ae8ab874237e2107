"""Data-parallel plumbing: start-up from torchrun's environment, the device of this process, sharding, reductions.

Everything here is a no-op in a single process, so the trainer has one code path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from heartlora.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` picks this process's GPU under torchrun (``local_rank`` of
    the ``local_world`` processes on this machine); ``cuda:N`` is GPU N, for one process a machine only."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if match[1] is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if local_world > 1:
        raise ConfigError(f"--device {name} names one GPU, but {local_world} processes run on this machine: use "
                          "--device cuda (each process takes the GPU of its LOCAL_RANK)")
    if int(match[1]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} visible CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", int(match[1]))


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when torchrun started us (WORLD_SIZE in the environment), else run alone.

    gloo on CPU, NCCL on CUDA; rendezvous through torchrun's env:// variables, so multi-node works with its flags.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device, local_rank, local_world)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        # Two processes on a small machine must not each take every core: split them.
        if dev.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown(barrier: bool = True) -> None:
    """Leave the process group, if one was joined. ``barrier=False`` when leaving on an error or a signal: the other
    ranks may be inside a collective this rank will never join, and waiting for them would hang."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (for decisions only rank 0 can make, such as what the output folder holds)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks); a collective: every rank calls it."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def shard(indices: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's part of ``indices``, interleaved like DistributedSampler: rank r takes r, r + W, r + 2W, …

    Applied to one global batch, the union over ranks is exactly that batch, so a step with W processes sees the
    same images as a step with one.
    """
    if not info.enabled:
        return indices
    return indices[info.rank::info.world_size]
