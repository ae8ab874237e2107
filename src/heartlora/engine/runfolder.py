"""The output folder of a run: what it holds (start, resume, finished), one writer at a time, and writes that fail
with one line naming the folder and the cause.

Rank 0 alone touches the folder. Every write goes through a temporary file and one rename
(``heartlora._paths.atomic_path``), so a kill or a full disk leaves the previous file in place.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from heartlora.errors import HeartLoRAError, RunFolderError

RUN_FILES = ("metrics.json", "adapter.safetensors", "responsiveness.png", "curves.png", "train.log",
             "checkpoint.pt", "config.yaml", "metrics.csv")
LOCK_NAME = ".heartlora.lock"
# What a run writes before its first checkpoint: --resume of a folder holding only these starts that run again.
BEFORE_FIRST_CHECKPOINT = {"train.log", "config.yaml", "tensorboard", "wandb"}  # the last two: --log-to's folders


def inspect_out(out: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Decide what to do with the folder, without changing it: "fresh", "resume" (with the checkpoint) or "done".
    Errors come back as a message so that every rank can raise the same one."""
    from heartlora.engine import checkpoint as ckpt

    if out.exists() and not out.is_dir():
        return {"error": f"--out {out} is a file, not a folder: choose another --out"}
    try:
        present = sorted(p.name for p in out.iterdir() if not _is_ours_hidden(p.name)) if out.is_dir() else []
    except OSError as exc:
        return {"error": f"cannot read output folder {out} ({exc.strerror or exc}): choose another --out"}
    if overwrite or not present:
        return {"mode": "fresh"}
    if not resume:
        listed = ", ".join(present[:4]) + (", …" if len(present) > 4 else "")
        return {"error": f"output folder {out} already holds files ({listed}): pass --resume to continue that run, "
                         "--overwrite to replace its files, or choose another --out"}
    if "checkpoint.pt" not in present:
        if set(present) <= BEFORE_FIRST_CHECKPOINT:  # killed before its first checkpoint: nothing to continue from
            return {"mode": "fresh", "restart": True}
        return {"error": f"output folder {out} holds no checkpoint.pt to resume from: choose another --out, "
                         "or --overwrite to start there afresh"}
    try:
        state = ckpt.load_checkpoint(out / "checkpoint.pt")
    except HeartLoRAError as exc:
        return {"error": str(exc)}
    done = state.get("finished", False) and "metrics.json" in present
    return {"mode": "done" if done else "resume", "state": state}


def _is_ours_hidden(name: str) -> bool:
    """The lock and the temporary files of interrupted writes: not a run's content."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(".tmp")
                                 and any(name.startswith(f".{f}.") for f in RUN_FILES))


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


def make_folder(out: Path) -> None:
    """Create ``out`` (and its parents), naming the real cause when that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parent = next((p for p in out.parents if p.exists()), None)
        if exc.errno == errno.ENOENT and parent is not None and parent.is_dir():
            # e.g. /proc or /sys: the folder is there, but its file system does not hold user folders
            cause = (f"{parent} is on a {_fs_type(parent) or 'special'} file system that does not accept new "
                     "folders")
        elif exc.errno == errno.ENOTDIR:
            cause = "a part of the path is a file, not a folder"
        else:
            cause = describe_os_error(exc)
        raise RunFolderError(f"cannot create output folder {out}: {cause}: choose another --out") from exc


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


class RunFolder:
    """One run's folder, held by this process (rank 0) from ``acquire`` to ``release``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- one writer at a time ----------------------------------------------------------------------------------------
    def check_free(self) -> None:
        """Refuse at once, before any work and without creating anything, when another process holds the folder."""
        lock = self.path / LOCK_NAME
        try:
            import fcntl

            fd = os.open(lock, os.O_RDWR)
        except (ImportError, OSError):
            return  # no lock file (or no flock): acquire() decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunFolderError(self._in_use(_read_pid(fd))) from None
        finally:
            os.close(fd)  # also drops the probe's lock

    def _in_use(self, holder: str) -> str:
        who = f"process {holder}" if holder else "another process"
        return (f"output folder {self.path} is in use by {who} (another `heartlora train`): wait for it to finish, "
                "or choose another --out")

    def acquire(self) -> None:
        """Create the folder and take its lock; a second process on the same folder is refused at once. The lock is
        an OS file lock (flock), so a killed process never leaves it stuck: its lock file is simply taken over."""
        make_folder(self.path)
        lock = self.path / LOCK_NAME
        try:
            import fcntl
        except ImportError:  # not POSIX: no OS file locks to rely on, so refuse rather than run unprotected
            raise RunFolderError("run-folder locking needs a POSIX system (fcntl): run heartlora on Linux or "
                                 "macOS") from None
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunFolderError(f"cannot write to output folder {self.path}: {describe_os_error(exc)}: choose "
                                     "another --out") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                raise RunFolderError(self._in_use(holder)) from None
            try:  # the holder may have removed the file between our open and our lock: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.path / LOCK_NAME)
        except OSError:
            pass
        os.close(self._lock_fd)  # closing drops the flock
        self._lock_fd = None

    # -- contents ------------------------------------------------------------------------------------------------------
    def clean_temporary_files(self) -> list[str]:
        """Remove the half-written ``.<run file>.*.tmp`` files a kill leaves behind (``--resume``, ``--overwrite``)."""
        removed = []
        for p in self.path.iterdir():
            if p.is_file() and p.name != LOCK_NAME and _is_ours_hidden(p.name):
                p.unlink()
                removed.append(p.name)
        return removed

    def clear_run_files(self) -> None:
        """--overwrite: remove this project's run files only; anything else the user keeps there stays."""
        for name in RUN_FILES:
            p = self.path / name
            if p.is_file():
                p.unlink()

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Turn a failed write into one line naming the folder and the cause (the old file stays, see above)."""
        try:
            yield
        except HeartLoRAError:
            raise
        except (OSError, RuntimeError) as exc:
            # torch.save reports a full disk as RuntimeError("... unexpected pos ..."): name the disk, not the pickler
            raise RunFolderError(f"cannot write {what} to {self.path}: {describe_os_error(exc)}; the previous "
                                 "checkpoint is kept: free space or fix permissions, then continue with --resume"
                                 ) from exc

    def readable(self) -> None:
        """Atomic writes go through mkstemp files (mode 0600); give the run's files the usual mode."""
        umask = os.umask(0)
        os.umask(umask)
        for name in RUN_FILES:
            if (self.path / name).is_file():
                os.chmod(self.path / name, 0o666 & ~umask)


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
