"""On-disk cache of numpy arrays (one uncompressed ``.npz`` per key) under ``cache_dir("data")``."""

from __future__ import annotations

import hashlib
import re
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from heartlora._paths import atomic_path, cache_dir, describe_os_error


def cache_file(key: str) -> Path:
    """The file that holds ``key``: a readable slug of the key plus a hash of all of it, so keys that hold paths or
    long strings still map to one short, unique, filesystem-safe name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:80]
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir("data") / f"{slug}-{digest}.npz"


def _read(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays in ``path``, or None when it is missing or unreadable (truncated, corrupt, not an npz)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            # Reading every member in full makes zipfile check its CRC, so a flipped byte is caught here.
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def cached_arrays(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays stored under ``key``, calling ``build()`` and storing its result when there are none.

    The file is written atomically (a reader never sees half a file); a corrupt or truncated file is rebuilt.
    Uncompressed npz is used because the cached images are loaded far more often than they are written.
    """
    path = cache_file(key)
    arrays = _read(path)
    if arrays is not None:
        return arrays
    arrays = {name: np.ascontiguousarray(value) for name, value in build().items()}
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
                np.savez(f, **arrays)
    except OSError as error:  # a full or read-only disk: the arrays are built, only the next load pays again
        print(f"note: could not keep the decoded images in the cache {path.parent} ({describe_os_error(error)}); "
              f"going on without it (set $HEARTLORA_CACHE to a folder with room to keep them)", file=sys.stderr)
    return arrays
