"""heartlora: Heart-LoRA fine-tuning of vision transformers (head-level responsiveness, docs/METHOD.md).

The public names are loaded on first use, so ``import heartlora`` stays fast and a part that fails to import
(a missing optional dependency) only affects the names that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

from heartlora.errors import AdapterFileError, ConfigError, HeartLoRAError, TaskError, UnsupportedBackboneError

__version__ = "0.1.0"

_LAZY = {
    **{name: "heartlora.method" for name in (
        "HeartLoRAConfig", "attach", "adapter_parameters", "attention_layers", "ResponsivenessTracker",
        "deactivate_heads", "head_masks", "save_adapter", "load_adapter", "convert_adapter", "read_adapter_info",
        "merge", "unmerge",
        "set_adapters_enabled", "AdapterReport", "coverage", "select_heads", "choose_ne", "parse_heads_off",
        "register_layout", "HeadLayout", "Coverage", "AttentionHeads", "NeChoice", "HeadsOff")},
    "AdapterBank": "heartlora.bank",
    "create_backbone": "heartlora.backbones",
    "list_backbones": "heartlora.backbones",
    "get_task": "heartlora.data",
    "list_tasks": "heartlora.data",
    "TrainConfig": "heartlora.engine",
    "train": "heartlora.engine",
    "load_trained": "heartlora.engine",
}

__all__ = ["AdapterFileError", "ConfigError", "HeartLoRAError", "TaskError", "UnsupportedBackboneError",
           "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'heartlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
