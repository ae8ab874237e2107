"""The Heart-LoRA method: head-aware LoRA adapters, responsiveness, deactivation, quantization and storage."""

from heartlora.method.config import HeartLoRAConfig
from heartlora.method.deactivate import deactivate_heads, select_heads
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
from heartlora.method.storage import AdapterReport, load_adapter, read_adapter_info, save_adapter

__all__ = [
                                     "LAYOUTS",
                                     "AdapterReport",
                                     "AttentionHeads",
                                     "AttentionSites",
                                     "Coverage",
                                     "HeadLayout",
                                     "HeadLoRAConv1x1",
                                     "HeadLoRALinear",
                                     "HeadLoRAProjection",
                                     "HeartLoRAConfig",
                                     "ResponsivenessTracker",
                                     "Site",
                                     "adapter_config",
                                     "adapter_parameters",
                                     "attach",
                                     "attention_layers",
                                     "backbone_fingerprint",
                                     "block_index",
                                     "coverage",
                                     "deactivate_heads",
                                     "find_attention",
                                     "find_classifier",
                                     "head_masks",
                                     "interleaved_index",
                                     "is_adapted",
                                     "load_adapter",
                                     "merge",
                                     "read_adapter_info",
                                     "register_layout",
                                     "remove_from_optimizer",
                                     "save_adapter",
                                     "scan_attention",
                                     "select_heads",
                                     "set_adapters_enabled",
                                     "unmerge",
]
