"""Errors a user can act on. Each message names the problem and the fix in one line; the CLI prints it without a
traceback (``--debug`` shows one)."""


class HeartLoRAError(Exception):
    """Base class of every error heartlora raises on purpose."""


class ConfigError(HeartLoRAError, ValueError):
    """A setting is invalid (unknown target, ne larger than the number of heads, …)."""


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
