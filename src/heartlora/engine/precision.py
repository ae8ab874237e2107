"""Numeric precision of a run (``--precision``) and ``--compile``.

Autocast runs the matrix products in bf16 or fp16; the weights, the adapters and the optimizer state stay fp32,
so the stored files do not change. fp16 needs a gradient scaler (its range is small); bf16 does not. On CUDA,
TF32 matrix products are allowed unless fp32 is asked for; ``tf32`` is fp32 with TF32 matrix products (no autocast;
on a CPU the same as fp32). The previous setting is restored when the run ends.

An accuracy heartlora reports (a run's ``accuracy``, ``heartlora eval``) is computed in exact fp32 (``exact_fp32``)
whatever the run trained with, so the number a run records is the one ``heartlora eval`` gives its stored adapter;
the per-epoch evaluations of a val run use the run's precision (they are a curve, not a result).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heartlora.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """The resolved precision of one run on one device."""

    name: str  # bf16, fp16, tf32 or fp32
    device: torch.device
    scaler: Any = None  # torch.amp.GradScaler for fp16
    tf32: bool = False  # TF32 matrix products allowed (CUDA, unless fp32 was asked for)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name in ("fp32", "tf32"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Gradients in true units before anything reads them (the responsiveness tracker). Returns, on the device
        and with no host sync, whether the scaler found an inf or NaN and will skip this step (None without one)."""
        if self.scaler is None:
            return None
        self.scaler.unscale_(optimizer)
        if not self.scaler.is_enabled():
            return None
        # scaler.step skips the step when any gradient it just unscaled is inf or NaN: the same test, read from the
        # gradients themselves (the scaler's own record of it is private)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        # one copy of the (adapter-sized) gradients and one test, not a test per tensor: this runs every step
        flat = torch.cat([g.reshape(-1).to(grads[0].device, torch.float32) for g in grads])
        return flat.isfinite().logical_not().sum()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips the step on inf/nan gradients (a sync: fp16 only)
            self.scaler.update()
        else:
            optimizer.step()


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 (CPU autocast is slower than fp32 on most CPUs)."""
    tf32 = device.type == "cuda" and name != "fp32"
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("bf16", "fp16", "tf32", "fp32"):
        raise ConfigError(f"unknown precision {name!r}: choose auto, bf16, fp16, tf32 or fp32")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU: use bf16 or fp32 on the CPU")
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name, device, scaler, tf32)


@contextlib.contextmanager
def matmul_precision(precision: Precision) -> Iterator[None]:
    """Allow TF32 matrix products on CUDA unless fp32 was asked for (then none, whatever the process had set);
    restore the process's setting afterwards."""
    before, before_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision.tf32 else "highest")
    if precision.device.type == "cuda":  # convolutions too (the patch embedding): exact fp32 means no TF32 anywhere
        torch.backends.cudnn.allow_tf32 = precision.tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = before_cudnn


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """The numerics of a reported accuracy: fp32 products, no autocast (even inside a run's autocast region), no
    TF32; the previous settings come back afterwards."""
    with matmul_precision(Precision("fp32", device)):
        if device.type in ("cpu", "cuda"):  # autocast's own device types; elsewhere nothing turned it on
            with torch.autocast(device.type, enabled=False):
                yield
        else:
            yield


def compiled(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model)`` when asked; the original module keeps its parameter names (checkpoints, files)."""
    if not enabled:
        return model
    return torch.compile(model, backend=backend)
