"""PEFT's LoRA as a training method of the engine: the peer baseline of the accuracy suite. The benchmarks' package
declares it as the entry point ``peft-lora`` of the group ``heartlora.methods`` (benchmarks/pyproject.toml), so
``heartlora train --method peft-lora`` finds it once that package is installed (``make setup`` installs it). Only
the adapter implementation differs from ``lora``: the same defaults, backbone, seed, data order, AdamW, schedule,
loss and evaluation, because it is the engine's loop.

Needs ``peft`` (the ``bench`` extra). Its model file is the engine's plain weights file of the trainable tensors
(PEFT's names): ``heartlora eval`` does not rebuild PEFT models, so evaluate through metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from heartlora.engine.training_methods import TrainingMethod, get_method
from heartlora.errors import ConfigError

# The q/k/v/o Linears of the HF DINOv2 / ViT attention (transformers 5 names and the older ones).
PROJ_NAMES = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value"), "o": ("o_proj", "dense")}


def target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full module names of the attention Linears for ``targets`` (full names, so that PEFT cannot match an MLP
    ``dense`` by suffix)."""
    wanted = {n for t in targets for n in PROJ_NAMES[t]}
    names = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and ".attention." in f".{name}." and name.rsplit(".", 1)[-1] in wanted]
    if not names:
        raise ConfigError(f"no attention Linears named {sorted(wanted)} in {type(model).__name__}: the PEFT baseline "
                          "supports the Hugging Face ViT / DINOv2 backbones")
    return names


def peft_model(model: nn.Module, targets: tuple[str, ...], rank: int, scale: float, dropout: float = 0.0) -> nn.Module:
    """``get_peft_model`` with LoRA on ``targets``; lora_alpha = scale·rank so PEFT's scaling (alpha / r) equals our
    fixed scale. The classifier trains too (``modules_to_save``), as in the engine's methods."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=dropout,
                     target_modules=target_modules(model, targets), modules_to_save=["head"], bias="none")
    return get_peft_model(model, cfg)


def peft_adapter_bytes(model: nn.Module) -> int:
    """Bytes of the LoRA weights PEFT would save (A and B), without the classifier: the engine's ``adapter_bytes``
    also leaves the classifier out."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return sum(t.numel() * t.element_size() for k, t in state.items() if "lora_" in k)


class PeftLoRA(TrainingMethod):
    description = "PEFT's LoRA on the same attention Linears (baseline; needs peft)"

    def prepare(self, model: nn.Module, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        import peft

        return peft_model(model, cfg.targets, cfg.rank, cfg.scale, cfg.dropout), {"implementation": f"peft "
                                                                                    f"{peft.__version__}"}

    def save(self, model: nn.Module, path: Path, run_facts: dict[str, Any]) -> int:
        super().save(model, path, run_facts)
        return peft_adapter_bytes(model)


PEFT_LORA = PeftLoRA()  # the entry point's object: the engine registers it as ``peft-lora`` when first asked


def registered() -> TrainingMethod:
    """The engine's ``peft-lora`` (this module's ``PEFT_LORA`` when the benchmarks' package is installed)."""
    return get_method("peft-lora")

__all__ = ["PEFT_LORA", "PeftLoRA", "peft_adapter_bytes", "peft_model", "registered", "target_modules"]
