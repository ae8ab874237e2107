"""Training checkpoints: one file per run, replaced atomically at the end of every epoch.

The file holds only tensors, numbers, strings, lists and dicts, so it is read back with ``weights_only=True``:
loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from heartlora._paths import atomic_path
from heartlora.errors import CheckpointError

log = logging.getLogger(__name__)

# Format 2: {"format", "identity" (JSON text: the run's resolved settings, seed, backbone fingerprint, run id),
# "sha256" (over the identity text and the payload bytes), "payload" (the state, torch.save'd, as uint8 bytes)}.
# Format 1 (before issue 36) is the state itself, with no checksum: read with a warning (docs/RELIABILITY.md).
FORMAT = "heartlora-checkpoint-2"
FORMAT_1 = "heartlora-checkpoint-1"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The random generators a process's training loop draws from (drop-path, adapter dropout): the CPU one and, on
    a CUDA ``device``, that GPU's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` captured; ``"cuda"``: every GPU's state, as checkpoints before per-rank states
    stored it (restored only where as many GPUs are there to take them)."""
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any], identity: dict[str, Any] | None = None) -> None:
    """Write ``state`` to ``path`` through a temporary file and one rename: a kill never leaves half a file. The
    file carries ``identity`` (what makes the run this run) and a sha256 over it and the state's bytes."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    payload = buf.getvalue()
    text = json.dumps(identity or {}, sort_keys=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "identity": text, "sha256": _digest(text, payload),
                    "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, tmp)


def _digest(identity: str, payload: bytes) -> str:
    return hashlib.sha256(FORMAT.encode() + b"\n" + identity.encode() + b"\n" + payload).hexdigest()


def _read(source: Any, path: str | Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first[:120]}): start again with "
                              "--overwrite") from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain data only, never pickled code), checked
    against its checksum. The state comes back with its ``identity`` (None for a format-1 file, read with a
    warning: it has no checksum)."""
    outer = _read(path, path)
    if isinstance(outer, dict) and outer.get("format") == FORMAT_1:
        log.warning("%s was written by an older heartlora without a checksum: its integrity cannot be checked "
                    "(--overwrite starts the run again)", path)
        return {**outer, "identity": None}
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a heartlora checkpoint: start again with --overwrite or a new --out")
    text, digest, payload = outer.get("identity"), outer.get("sha256"), outer.get("payload")
    if not (isinstance(text, str) and isinstance(digest, str) and isinstance(payload, torch.Tensor)
            and payload.dtype == torch.uint8 and payload.dim() == 1):
        raise CheckpointError(f"checkpoint {path} is damaged (its parts are missing or of the wrong kind): start "
                              "again with --overwrite")
    data = payload.numpy().tobytes()
    if _digest(text, data) != digest:
        raise CheckpointError(f"checkpoint {path} is damaged (its checksum does not match its contents): start "
                              "again with --overwrite")
    state = _read(io.BytesIO(data), path)
    try:
        identity = json.loads(text)
        settings = json.loads(state["settings"]) if isinstance(state, dict) else None
    except (KeyError, TypeError, ValueError):
        identity = settings = None
    if (not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(identity, dict)
            or (identity.get("settings") is not None and identity["settings"] != settings)):
        raise CheckpointError(f"checkpoint {path} is damaged (its identity and its state disagree): start again "
                              "with --overwrite")
    return {**state, "identity": identity}
