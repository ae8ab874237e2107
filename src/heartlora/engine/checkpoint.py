"""Training checkpoints: one file per run, replaced atomically at the end of every epoch.

The file holds only tensors, numbers, strings, lists and dicts, so it is read back with ``weights_only=True``:
loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from heartlora._paths import atomic_path
from heartlora.errors import CheckpointError

FORMAT = "heartlora-checkpoint-1"


def rng_state() -> dict[str, Any]:
    """The random generators the training loop draws from (drop-path, adapter dropout)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (CUDA states only where the GPUs are there to take them)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and one rename: a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain data only, never pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first[:120]}): start again with "
                              "--overwrite") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a heartlora checkpoint: start again with --overwrite or a new --out")
    return state
