"""Thousands of tasks from one folder: a :class:`FolderBank` serves every adapter file in a folder, loading each on
first use and keeping the most recently used in memory within a byte budget.

A task is named by its file: ``DIR/NAME.safetensors``, or ``DIR/NAME/adapter.safetensors`` (a run folder). A call
that names a task not in memory loads it (checked as :meth:`AdapterBank.add` checks every file: integrity, the
backbone's fingerprint, shapes), so its first request is answered, not refused. After each call's loads, the least
recently used tasks are evicted until the tasks loaded from the folder hold at most ``cache_mb`` MiB (their
``BankTask.resident_bytes``: factors, indices, classifier; the backbone is not counted); the tasks of the call
itself are never evicted by it, so one call may exceed the budget for its duration. An evicted task is loaded
again by its next call. The folder is read on every miss (a file added later is found) and every use stats the
task's file (a file removed gives "unknown task", a file replaced is loaded again). A file that cannot be loaded is
refused in one line, for its own task only, and not read again until it changes.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from heartlora.bank import AdapterBank, BankTask, backbone_for
from heartlora.errors import AdapterFileError, ConfigError, HeartLoRAError
from heartlora.method.storage import read_adapter

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")  # a task name that is a file name, never a path
SUFFIX = ".safetensors"


def task_file(folder: Path, name: str) -> Path | None:
    """The adapter file of task ``name`` in ``folder``, or None."""
    if not NAME.fullmatch(name):
        return None
    for path in (folder / f"{name}{SUFFIX}", folder / name / "adapter.safetensors"):
        try:
            if path.is_file():
                return path
        except OSError:  # a name too long for the file system, say: no such file
            continue
    return None


def folder_tasks(folder: Path) -> list[str]:
    """The names of the adapter files in ``folder``, sorted."""
    names = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.endswith(SUFFIX) and e.is_file():
                name = e.name[:-len(SUFFIX)]
            elif e.is_dir() and os.path.isfile(os.path.join(e.path, "adapter.safetensors")):
                name = e.name
            else:
                continue
            if NAME.fullmatch(name):
                names.append(name)
    return sorted(names)


def _stamp(path: Path) -> tuple[int, ...]:
    """What says a file was replaced: its inode and ctime too, since a retrained adapter has the same size and a copy
    may keep the old mtime (``cp -p``, ``rsync -a``, a tar with fixed times), but no program sets a ctime."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


class FolderBank(AdapterBank):
    """An :class:`AdapterBank` over the adapter files of ``folder`` (see the module's notes); ``cache_mb``: the
    memory budget of the tasks loaded from it (None: no limit); ``img_size``: refuse files trained at another size.
    Tasks added with :meth:`add` stay in memory and outside the budget. ``loads`` and ``evictions`` count what the
    bank did. Made by :meth:`AdapterBank.from_folder`."""

    def __init__(self, backbone: nn.Module, folder: str | os.PathLike, cache_mb: float | None = None,
                 device: torch.device | str | None = None, img_size: int | None = None) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"the adapter folder {folder} is not a folder: name the folder that holds the adapter "
                              "files (NAME.safetensors or NAME/adapter.safetensors)")
        if cache_mb is not None and not cache_mb > 0:
            raise ConfigError(f"cache_mb must be more than 0 MiB, got {cache_mb}: leave it out to keep every task")
        super().__init__(backbone, device, img_size=img_size)
        self.folder = folder
        self.cache_bytes = None if cache_mb is None else int(cache_mb * 2**20)
        self._lru: OrderedDict[str, tuple[int, int]] = OrderedDict()  # in memory, least recent first: file stamp
        self._refused: dict[str, tuple[tuple[int, int], str]] = {}
        self.loads = self.evictions = 0

    # --- the folder --------------------------------------------------------------------------------------------
    def file_of(self, name: str) -> Path | None:
        """The adapter file of task ``name`` in the folder, or None."""
        return task_file(self.folder, name)

    def available(self) -> list[str]:
        """Every task the bank can answer, in memory or not: those added with ``add`` and the folder's files."""
        # with add(); the folder's own are listed from it (a copy: the bank's thread may load or evict meanwhile)
        added = {t for t in list(self.tasks) if self._added(t)}
        return sorted(added | set(folder_tasks(self.folder)))

    def has_task(self, name: str) -> bool:
        """Whether ``name`` was added or has an adapter file in the folder (its file is not read)."""
        return self._added(name) or self.file_of(name) is not None

    def served_from_folder(self, name: str) -> bool:
        """Whether task ``name`` is answered from its file in the folder (not added with ``add``): removing it from
        memory would only evict it, so the file decides."""
        return not self._added(name) and self.file_of(name) is not None

    def _added(self, name: str) -> bool:
        """Whether ``name`` was added with ``add`` (in memory for good, outside the folder and its budget)."""
        return name in self.tasks and name not in self._lru

    def unknown(self, name: str) -> str:
        """The one-line reason a task the folder does not hold is refused. A server sends it to its clients, so it
        names the folder by its own name, not by the server's path to it."""
        return (f"unknown task {name!r}: the adapter folder {self.folder.name!r} holds no {name}{SUFFIX} (nor "
                f"{name}/adapter.safetensors); add the adapter file there")

    def resident(self) -> list[str]:
        """The folder's tasks in memory, least recently used first."""
        return list(self._lru)

    def cached_bytes(self) -> int:
        """Bytes the folder's tasks in memory hold (what ``cache_mb`` limits)."""
        return sum(self.tasks[n].resident_bytes for n in self._lru)

    # --- loading and evicting ----------------------------------------------------------------------------------
    def ensure(self, tasks: Sequence[str]) -> dict[str, str]:
        """Load the files of ``tasks`` not in memory (again if replaced on disk), evicting the least recently used
        beyond ``cache_mb``; returns the tasks that cannot be answered, each with its one-line reason."""
        with self._lock:
            wanted = list(dict.fromkeys(tasks))
            failed: dict[str, str] = {}
            for name in wanted:
                if self._added(name):
                    continue  # added with add(): always in memory
                path = self.file_of(name)
                try:
                    stamp = _stamp(path) if path is not None else None
                except OSError:  # removed between the two looks
                    stamp = None
                if stamp is None:
                    if name in self._lru:  # its file was removed
                        self._evict([name])
                    failed[name] = self.unknown(name)
                    continue
                if name in self._lru:
                    if self._lru[name] == stamp:
                        self._lru.move_to_end(name)
                        continue
                    self._evict([name])  # the file was replaced: load it again
                refused = self._refused.get(name)
                if refused is not None and refused[0] == stamp:
                    failed[name] = refused[1]
                    continue
                try:
                    self._load(name, path)
                except HeartLoRAError as exc:
                    failed[name] = " ".join(str(exc).split())
                    self._refused[name] = (stamp, failed[name])
                    continue
                self._refused.pop(name, None)
                self._lru[name] = stamp
            self._trim(keep=set(wanted))
            return failed

    def _load(self, name: str, path: Path) -> BankTask:
        contents = read_adapter(path)
        info = contents[0]
        saved = tuple(info["modules_to_save"])
        mine = self._fingerprint(saved)
        if info["fingerprint"] != mine:
            raise AdapterFileError(f"{path} was trained on another backbone ({info['backbone'].get('name')!r}, "
                                   f"fingerprint {info['fingerprint'][:12]}; this bank's is {mine[:12]}): move it to "
                                   "a folder served on its own backbone")
        task = self._add(path, name, None, check_fingerprint=True, contents=contents, own_file=True)
        self.loads += 1
        return task

    def preload(self) -> int:
        """Load the folder's tasks (sorted by name) until the budget is full; returns how many are in memory. A
        file that cannot be loaded is refused as on first use (one line each, returned by :meth:`ensure`)."""
        with self._lock:
            for name in self.available():
                if name in self.tasks:  # every cached task is one of them
                    continue
                if self.cache_bytes is not None and self._lru and self.cached_bytes() >= self.cache_bytes:
                    break
                self.ensure([name])
            self._settle()  # the routing tables now, not in the first call
            return len(self._lru)

    def _trim(self, keep: set[str]) -> None:
        if self.cache_bytes is None:
            return
        used = self.cached_bytes()
        victims = []
        for name in self._lru:  # least recently used first
            if used <= self.cache_bytes:
                break
            if name not in keep:
                victims.append(name)
                used -= self.tasks[name].resident_bytes
        if victims:
            self._evict(victims)

    def _evict(self, names: list[str]) -> None:
        self._drop(names)
        self.evictions += len(names)

    def _drop(self, names: Sequence[str]) -> list[BankTask]:
        for name in names:  # evicted, or removed with remove(): a folder task is loaded again by its next call
            self._lru.pop(name, None)
        return super()._drop(names)

    def __repr__(self) -> str:
        budget = "no limit" if self.cache_bytes is None else f"{self.cache_bytes / 2**20:g} MiB"
        return f"FolderBank({self.folder}: {len(self._lru)} tasks in memory, {budget})"


def bank_from_folder(folder: str | os.PathLike, device: torch.device | str = "cpu", backbone: str | None = None,
                     cache_mb: float | None = None) -> tuple[FolderBank, int]:
    """A :class:`FolderBank` over ``folder`` on the backbone its first readable file (by name) names (``backbone``
    builds another, as ``load_trained`` does), and the image size it serves; ``heartlora serve --adapter-dir``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--adapter-dir {folder} is not a folder: name the folder that holds the adapter files")
    names = folder_tasks(folder)
    if not names:
        raise ConfigError(f"{folder} holds no adapter files (NAME{SUFFIX} or NAME/adapter.safetensors): train some "
                          "into it, or name another folder")
    refused = []
    for name in names:  # the first file that reads names the backbone; a damaged one is refused for its own task
        try:  # only (when a call names it), as the folder bank refuses it later
            model, size = backbone_for(task_file(folder, name), backbone)
        except HeartLoRAError as exc:
            refused.append(str(exc))
            continue
        return FolderBank(model, folder, cache_mb=cache_mb, device=device, img_size=size), size
    raise ConfigError(f"no adapter file in {folder} can be read ({len(refused)} refused; the first: {refused[0]})")
