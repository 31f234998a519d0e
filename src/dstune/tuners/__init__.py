"""PEFT methods: LoRA through peft today; dstune's own tuners register with peft the same way."""

from .lora import add_lora, load_adapters, switch_adapter
from .targets import TARGET_PRESETS, target_preset

__all__ = ["TARGET_PRESETS", "add_lora", "load_adapters", "switch_adapter", "target_preset"]
