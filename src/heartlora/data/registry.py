"""The task registry: names → task factories, plus the two name forms that wrap others (``vtab:PATH``,
``NAME@Kshot``)."""

from __future__ import annotations

import difflib
import re
from typing import Callable, NamedTuple

from heartlora.data.base import GROUPS, Task
from heartlora.errors import TaskError


class TaskInfo(NamedTuple):
    """One registered task, as ``heartlora data list`` shows it."""

    name: str
    description: str
    group: str


_REGISTRY: dict[str, tuple[TaskInfo, Callable[[], Task]]] = {}
_FEWSHOT = re.compile(r"(?P<source>.+)@(?P<shots>\d+)shot")


def register_task(name: str, description: str, group: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator that registers a zero-argument factory returning a Task under ``name``.

    >>> @register_task("my_task", "what it is, in a few words", "natural")
    ... def my_task() -> Task: ...
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"task name {name!r} must use letters, digits, '_', '.' or '-' (':' and '@' are reserved)")
    if group not in GROUPS:
        raise ValueError(f"task {name!r} has group {group!r}; use one of {', '.join(GROUPS)}")

    def decorator(factory: Callable[[], Task]) -> Callable[[], Task]:
        previous = _REGISTRY.get(name)
        # Re-running the same module (importlib.reload) re-registers the same function; anything else is a clash.
        if previous is not None and _qualname(previous[1]) != _qualname(factory):
            raise ValueError(f"task {name!r} is registered twice ({_qualname(previous[1])} and {_qualname(factory)})")
        _REGISTRY[name] = (TaskInfo(name, description, group), factory)
        return factory

    return decorator


def _qualname(factory: Callable) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def list_tasks() -> list[TaskInfo]:
    """Every registered task, sorted by name (``vtab:`` folders and ``@Kshot`` variants are not listed)."""
    return [info for _, (info, _) in sorted(_REGISTRY.items())]


def get_task(name: str) -> Task:
    """The task called ``name``: a registered name (``fashion_mnist``), a VTAB-1K folder (``vtab:/path/to/cifar``),
    or a few-shot version of either (``fashion_mnist@4shot``, ``vtab:/path/to/cifar@1shot``)."""
    name = name.strip()
    match = _FEWSHOT.fullmatch(name)
    if match:
        from heartlora.data.fewshot import FewShotTask  # imported here: fewshot builds on this module's get_task

        return FewShotTask(get_task(match["source"]), int(match["shots"]))
    if name.startswith("vtab:"):
        from heartlora.data.vtab import VtabFolderTask

        return VtabFolderTask(name[len("vtab:"):])
    if "@" in name:
        raise TaskError(f"bad few-shot task name {name!r}; write NAME@Kshot, e.g. fashion_mnist@4shot")
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TaskError(f"unknown task {name!r}; {hint}`heartlora data list` shows every task "
                        "(a VTAB-1K folder is vtab:/path/to/folder)")
    return entry[1]()
