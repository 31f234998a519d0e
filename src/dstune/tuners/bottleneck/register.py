"""Registers the bottleneck adapter with peft (importing this module does it once)."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import BottleneckConfig
from .model import BottleneckModel
from .peft_type import BOTTLENECK

if BOTTLENECK not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name="bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel,
                         prefix="bottleneck_")
