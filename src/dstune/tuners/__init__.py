"""PEFT methods as plugins (dstune.plugins.METHODS): LoRA, DoRA and IA3 through peft; Prefix-Tuning through peft
with dstune's cache fix and multi-task prefixes; dstune's bottleneck adapter, a peft method of its own; and any
method a package registers through the `dstune.methods` entry point group (see tuners/method.py)."""

from .lora import add_lora
from .method import Method
from .methods import add_method, is_mergeable, load_adapters, switch_adapter
from .targets import TARGET_PRESETS, target_preset

__all__ = ["TARGET_PRESETS", "Method", "add_lora", "add_method", "is_mergeable", "load_adapters", "switch_adapter",
           "target_preset"]
