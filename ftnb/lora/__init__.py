"""LoRA and DoRA from scratch, laid out like peft's `tuners/lora/` so the two read side by side:
config.py (LoraConfig), layer.py (LoraLinear), dora.py (DoraLinear), model.py (inject, merge,
save and load, and copy_adapter_weights to start ours and peft's from the same A and B).

Usage:
    from ftnb.lora import LoraConfig, inject_adapters, save_adapter
    names = inject_adapters(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
"""
from ftnb.lora.config import LoraConfig
from ftnb.lora.dora import DoraLinear
from ftnb.lora.layer import LoraLinear
from ftnb.lora.model import (adapter_parameters, adapter_state_dict, copy_adapter_weights, inject_adapters,
                             load_adapter, lora_layers, merge_adapters, save_adapter, target_names,
                             unmerge_adapters)

__all__ = ["LoraConfig", "LoraLinear", "DoraLinear", "inject_adapters", "merge_adapters", "unmerge_adapters",
           "adapter_state_dict", "save_adapter", "load_adapter", "copy_adapter_weights", "adapter_parameters",
           "lora_layers", "target_names"]
