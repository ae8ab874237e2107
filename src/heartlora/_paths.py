"""Where heartlora keeps its caches, atomic file writes, and failed writes named by their cause: shared by every
part of the package."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir(*parts: str) -> Path:
    """The cache root (``$HEARTLORA_CACHE``, else ``$XDG_CACHE_HOME/heartlora``, else ``~/.cache/heartlora``),
    joined with ``parts`` and created if needed."""
    root = os.environ.get("HEARTLORA_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "heartlora")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, so a reader never
    sees a half-written file and a crash leaves the old file in place. The data reach the disk before the rename, and
    the rename before this returns (fsync of the file, then of its folder): after a power cut the file is the old one
    or the new one, never an empty one where the old was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files, and some writers (safetensors) replace the file with another 0600 one: give the
        # final file the permissions open() would have, after the writer is done.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        _fsync(path.parent, getattr(os, "O_DIRECTORY", 0) | os.O_RDONLY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk. A platform or file system that cannot open a
    folder or sync it (Windows, some network mounts) is left to its own guarantees."""
    try:
        fd = os.open(path, flags)
    except OSError:
        if flags & getattr(os, "O_DIRECTORY", 0):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # cannot sync this kind of file: nothing lost
            raise
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_os_error(exc: BaseException) -> str:
    """The cause of a failed write in a few words (a full disk, a read-only one, a missing permission, …)."""
    err = getattr(exc, "errno", None)
    if err is None and isinstance(exc.__cause__, OSError):
        err = exc.__cause__.errno
    causes = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EDQUOT: "the disk quota is exceeded"}
    if err in causes:
        return causes[err]
    if "unexpected pos" in str(exc) or "PytorchStreamWriter" in str(exc):
        return "the write stopped part-way (is the disk full?)"  # how torch.save reports a full disk
    text = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
    return (text or type(exc).__name__)[:120]


def folder_error(out: Path, exc: OSError) -> str:
    """Why folder ``out`` could not be created (``exc``), in a few words that name the real cause."""
    parent = next((p for p in out.parents if p.exists()), None)
    if exc.errno == errno.ENOENT and parent is not None and parent.is_dir():
        # e.g. /proc or /sys: the folder is there, but its file system does not hold user folders
        return f"{parent} is on a {_fs_type(parent) or 'special'} file system that does not accept new folders"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file, not a folder"
    return describe_os_error(exc)


def _fs_type(path: Path) -> str | None:
    """The file system type holding ``path`` (Linux /proc/mounts), or None."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best, kind = "", None
    resolved = str(path.resolve())
    for parts in mounts:
        inside = len(parts) >= 3 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/"))
        if inside and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


