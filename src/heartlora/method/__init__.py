"""The Heart-LoRA method: head-aware LoRA adapters, responsiveness, deactivation, quantization and storage."""

from heartlora.method.auto_ne import NeChoice, choose_ne
from heartlora.method.config import HeartLoRAConfig
from heartlora.method.deactivate import deactivate_heads, select_heads
from heartlora.method.heads_off import HeadsOff, parse_heads_off
from heartlora.method.layer import HeadLoRAConv1x1, HeadLoRALinear, HeadLoRAProjection
from heartlora.method.layouts import (
                                     LAYOUTS,
                                     AttentionSites,
                                     HeadLayout,
                                     Site,
                                     block_index,
                                     find_attention,
                                     interleaved_index,
                                     register_layout,
                                     scan_attention,
)
from heartlora.method.model import (
                                     AttentionHeads,
                                     Coverage,
                                     adapter_config,
                                     adapter_parameters,
                                     attach,
                                     attention_layers,
                                     backbone_fingerprint,
                                     coverage,
                                     find_classifier,
                                     head_masks,
                                     is_adapted,
                                     merge,
                                     remove_from_optimizer,
                                     set_adapters_enabled,
                                     unmerge,
)
from heartlora.method.responsiveness import ResponsivenessTracker
from heartlora.method.storage import AdapterReport, convert_adapter, load_adapter, read_adapter_info, save_adapter

__all__ = [
    "HeartLoRAConfig", "attach", "adapter_parameters", "adapter_config", "attention_layers", "head_masks",
    "is_adapted", "merge", "unmerge", "set_adapters_enabled", "remove_from_optimizer", "backbone_fingerprint",
    "ResponsivenessTracker", "deactivate_heads", "select_heads", "choose_ne", "NeChoice", "parse_heads_off", "HeadsOff",
    "save_adapter", "load_adapter", "convert_adapter",
    "read_adapter_info", "AdapterReport", "AttentionHeads", "HeadLoRAConv1x1", "HeadLoRALinear", "HeadLoRAProjection",
    "HeadLayout",
    "AttentionSites", "Site", "LAYOUTS", "register_layout", "find_attention", "scan_attention", "block_index",
    "interleaved_index", "coverage", "Coverage", "find_classifier",
]
