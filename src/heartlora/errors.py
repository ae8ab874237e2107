"""Errors a user can act on. Each message names the problem and the fix in one line; the CLI prints it without a
traceback (``--debug`` shows one)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping


class HeartLoRAError(Exception):
    """Base class of every error heartlora raises on purpose."""


class ConfigError(HeartLoRAError, ValueError):
    """A setting is invalid (unknown target, ne larger than the number of heads, …)."""


class SettingError(ConfigError):
    """A ConfigError about named settings, written once for two audiences: ``str()`` names each setting as the Python
    field (``ne_fraction``, or the caller's own name from ``names``), ``for_cli()`` as the command line's flag
    (``--ne-fraction``, or the one in ``flags``). In ``template`` a setting's name stands as ``{name}``."""

    def __init__(self, template: str, names: Mapping[str, str] | None = None,
                 flags: Mapping[str, str] | None = None) -> None:
        self.template, self.names, self.flags = template, dict(names or {}), dict(flags or {})
        super().__init__(self._render(lambda n: self.names.get(n, n)))

    def for_cli(self) -> str:
        return self._render(lambda n: self.flags.get(n) or "--" + n.replace("_", "-"))

    def _render(self, name: Callable[[str], str]) -> str:
        return re.sub(r"\{([a-z][a-z0-9_]*)\}", lambda m: name(m.group(1)), self.template)


class UnsupportedBackboneError(HeartLoRAError):
    """The model has no attention module heartlora knows how to adapt, or the backbone name is unknown."""


class AdapterFileError(HeartLoRAError):
    """An adapter file is missing, corrupt, truncated, or belongs to another backbone or configuration."""


class TaskError(HeartLoRAError):
    """A task name, dataset folder, split or label file is wrong, or a data source is not installed."""


class CheckpointError(HeartLoRAError):
    """A training checkpoint cannot be read or does not belong to this run."""


class MetricsError(HeartLoRAError):
    """A run's metrics.json cannot be read, is damaged, or is not the result of the run in its folder."""


class RunFolderError(HeartLoRAError):
    """The output folder cannot be created or written (full or read-only disk), or another run holds it."""


class ImageReadError(HeartLoRAError):
    """An input image is missing or cannot be decoded."""
