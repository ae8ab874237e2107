"""heartlora with the libraries around it: PEFT adapter folders in and out (:mod:`.peft`), head pruning of an existing
PEFT LoRA adapter, and a ``transformers.Trainer`` callback (:mod:`.hf_trainer`). Each needs its library (``peft``,
``transformers``) only when used."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"export_peft": ".peft", "import_peft": ".peft", "prune_peft": ".peft", "score_and_prune": ".peft",
         "PeftExport": ".peft", "HeartLoRACallback": ".hf_trainer"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'heartlora.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
