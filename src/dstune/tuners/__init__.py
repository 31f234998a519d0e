"""PEFT methods: LoRA, DoRA and IA3 through peft; Prefix-Tuning through peft with dstune's cache fix; and
dstune's bottleneck adapter, registered with peft like its own methods (importing this package registers it)."""

from .bottleneck import BottleneckConfig
from .lora import add_lora
from .methods import METHODS, add_method, is_mergeable, load_adapters, switch_adapter
from .prefix import add_prefix
from .targets import TARGET_PRESETS, target_preset

__all__ = ["METHODS", "TARGET_PRESETS", "BottleneckConfig", "add_lora", "add_method", "add_prefix", "is_mergeable",
           "load_adapters", "switch_adapter", "target_preset"]
