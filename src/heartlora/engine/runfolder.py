"""The output folder of a run: what it holds (start, resume, finished), one writer at a time, and writes that fail
with one line naming the folder and the cause.

Rank 0 alone touches the folder. Every write goes through a temporary file and one rename
(``heartlora._paths.atomic_path``), so a kill or a full disk leaves the previous file in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from heartlora._paths import describe_os_error, file_sha256, folder_error
from heartlora.engine import checkpoint as ckpt
from heartlora.engine.metrics import read_metrics, way_out_of_bad_metrics
from heartlora.errors import HeartLoRAError, RunFolderError

RUN_FILES = ("metrics.json", "adapter.safetensors", "responsiveness.png", "curves.png", "train.log",
             "checkpoint.pt", "config.yaml", "metrics.csv")
LOCK_NAME = ".heartlora.lock"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # files of a run folder are opened without following a link
# What a run writes before its first checkpoint: --resume of a folder holding only these starts that run again.
BEFORE_FIRST_CHECKPOINT = {"train.log", "config.yaml", "tensorboard", "wandb"}  # the last two: --log-to's folders
IDENTITY_LINE = re.compile(r"run identity (\{.*\})[ \t]*$", re.MULTILINE)  # Trainer.run logs it in train.log


def inspect_out(out: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Decide what to do with the folder, without changing it: "fresh", "resume" (with the checkpoint) or "done".
    Errors come back as a message so that every rank can raise the same one."""
    if out.exists() and not out.is_dir():
        return {"error": f"--out {out} is a file, not a folder: choose another --out"}
    link = find_link(out)
    if link:
        return {"error": link, "kind": "folder"}
    try:
        present = sorted(p.name for p in out.iterdir() if not _is_ours_hidden(p.name)) if out.is_dir() else []
    except OSError as exc:
        return {"error": f"cannot read output folder {out} ({exc.strerror or exc}): choose another --out"}
    if overwrite or not present:
        return {"mode": "fresh"}
    if not resume:
        listed = ", ".join(present[:4]) + (", …" if len(present) > 4 else "")
        return {"error": f"output folder {out} already holds files ({listed}): pass {{resume}} to continue that "
                         "run, {overwrite} to replace its files, or choose another {out}", "settings": True}
    if "checkpoint.pt" not in present:
        if set(present) <= BEFORE_FIRST_CHECKPOINT:  # killed before its first checkpoint: nothing to continue from
            return {"mode": "fresh", "restart": True}
        return {"error": _unless_finished(out, f"output folder {out} holds no checkpoint.pt to resume from: choose "
                                               "another --out, or --overwrite to start there afresh")}
    try:
        state = ckpt.load_checkpoint(out / "checkpoint.pt")
    except HeartLoRAError as exc:
        return {"error": _unless_finished(out, str(exc))}
    foreign = _foreign_checkpoint(out, state.get("identity"))
    if foreign:
        return {"error": foreign}
    if not (state.get("finished", False) and "metrics.json" in present):
        return {"mode": "resume", "state": state}
    try:  # a finished run: its metrics.json is shown only once it is known to be this run's, undamaged
        metrics = read_metrics(out / "metrics.json")
    except HeartLoRAError as exc:
        return {"error": str(exc)}
    other = _metrics_of_another_run(out, metrics, state) or _adapter_changed(out, metrics)
    if other:
        return {"error": other}
    return {"mode": "done", "state": state, "metrics": metrics}


def _unless_finished(out: Path, error: str) -> str:
    """A checkpoint error, told otherwise where the run had finished (a metrics.json that reads back, and the
    adapter it describes): its advice to start again with --overwrite would delete a finished run's results."""
    try:
        metrics = read_metrics(out / "metrics.json")
    except (OSError, HeartLoRAError):
        return error
    if _adapter_changed(out, metrics) or not (out / "adapter.safetensors").is_file():
        return error
    cause = error.rsplit(": ", 1)[0]  # the error without its advice (the last part)
    return (f"{cause}, but the run had finished: its results are in {out / 'metrics.json'} and its adapter in "
            f"{out / 'adapter.safetensors'} (`heartlora eval --adapter {out}` evaluates it again); --overwrite would "
            "delete them, so train anew in another --out")


def _adapter_changed(out: Path, metrics: dict[str, Any]) -> str | None:
    """The error for a finished run whose adapter.safetensors is not the file its metrics.json describes (replaced,
    re-exported at another dtype, removed): its accuracy and bytes would be shown for another file. Runs finished
    before the adapter's sha256 was recorded are not checked."""
    want = metrics.get("adapter_sha256")
    if not want:
        return None
    path = out / "adapter.safetensors"
    try:
        have = file_sha256(path)
    except FileNotFoundError:
        have = None
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror or exc}): check the folder's permissions"
    if have == want:
        return None
    what = "is missing" if have is None else "is not the file the run wrote (its sha256 differs)"
    return (f"{path} {what}, so {out / 'metrics.json'} no longer describes it: put the run's adapter back, or "
            f"{way_out_of_bad_metrics(out)}")


def find_link(out: Path) -> str | None:
    """The error for a symbolic link where the run keeps a file (the lock, the log, the checkpoint, metrics.json,
    …): heartlora would read or write the file it points to, so it refuses, whatever the link's target."""
    for name in (*RUN_FILES, LOCK_NAME):
        if os.path.islink(out / name):
            return (f"{out / name} is a symbolic link: heartlora does not follow links inside a run folder (it would "
                    "write to or read from the file it points to); remove the link, or choose another --out")
    return None


def recorded_identity(out: Path) -> dict[str, Any] | None:
    """The run identity train.log records last (the trainer logs it when a run starts or resumes), or None."""
    try:
        text = (out / "train.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = None
    for match in IDENTITY_LINE.finditer(text):
        try:
            found = json.loads(match.group(1))
        except ValueError:
            continue
    return found if isinstance(found, dict) else None


def _differences(a: dict[str, Any], b: dict[str, Any], where: str) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k} {a.get(k)!r} ({where}: {b.get(k)!r})" for k in keys[:3]) + (", …" if len(keys) > 3 else "")


def _foreign_checkpoint(out: Path, identity: dict[str, Any] | None) -> str | None:
    """The error for a checkpoint of another run than the one the folder's train.log records (a copied file)."""
    record = recorded_identity(out)
    if not identity or not record or record.get("run_id") == identity.get("run_id"):
        return None
    what = (_differences(identity.get("settings") or {}, record.get("settings") or {}, "train.log")
            or f"run {identity.get('run_id')}, train.log records run {record.get('run_id')}")
    return (f"{out / 'checkpoint.pt'} belongs to another run than the one {out / 'train.log'} records ({what}): put "
            "this run's checkpoint back, or start afresh with --overwrite")


def _metrics_of_another_run(out: Path, metrics: dict[str, Any], state: dict[str, Any]) -> str | None:
    """The error for a metrics.json whose settings or accuracy are not those of the finished checkpoint."""
    try:
        settings = json.loads(state["settings"])
        result = json.loads(state.get("result") or "null")
    except (KeyError, TypeError, ValueError):
        return None  # the checkpoint was checked when loaded; an older one may lack these
    where = out / "metrics.json"
    way_out = way_out_of_bad_metrics(out)
    if isinstance(settings, dict) and metrics["settings"] != settings:
        return (f"{where} is not the result of the run in {out / 'checkpoint.pt'} "
                f"({_differences(metrics['settings'], settings, 'checkpoint')}): {way_out}")
    if isinstance(result, dict) and "accuracy" in result and result["accuracy"] != metrics["accuracy"]:
        return (f"{where} reports accuracy {metrics['accuracy']!r}, the finished checkpoint {result['accuracy']!r}: "
                f"{way_out}")
    return None


def _is_ours_hidden(name: str) -> bool:
    """The lock and the temporary files of interrupted writes: not a run's content."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(".tmp")
                                 and any(name.startswith(f".{f}.") for f in RUN_FILES))


def make_folder(out: Path) -> None:
    """Create ``out`` (and its parents), naming the real cause when that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create output folder {out}: {folder_error(out, exc)}: choose another --out"
                             ) from exc


class RunFolder:
    """One run's folder, held by this process (rank 0) from ``acquire`` to ``release``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.log: Any = None  # train.log's stream, once open_log opened it

    # -- one writer at a time ----------------------------------------------------------------------------------------
    def check_free(self) -> None:
        """Refuse at once, before any work and without creating anything, when another process holds the folder."""
        lock = self.path / LOCK_NAME
        try:
            import fcntl

            fd = os.open(lock, os.O_RDWR | NOFOLLOW)
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
        link = find_link(self.path)
        if link:
            raise RunFolderError(link)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise RunFolderError(find_link(self.path) or f"{lock} is a symbolic link: remove it") from exc
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

    def open_log(self, append: bool) -> Any:
        """train.log for writing (appended on resume), opened without following a link at its name."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | NOFOLLOW
        try:
            fd = os.open(self.path / "train.log", flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunFolderError(find_link(self.path) or f"{self.path / 'train.log'} is a symbolic link: remove "
                                     "it") from exc
            raise RunFolderError(f"cannot write train.log to {self.path}: {describe_os_error(exc)}: choose another "
                                 "--out") from exc
        return os.fdopen(fd, "a", encoding="utf-8")

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
            p = self.path / name
            if p.is_file() and not p.is_symlink():
                os.chmod(p, 0o666 & ~umask)


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
