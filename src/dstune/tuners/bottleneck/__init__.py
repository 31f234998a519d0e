"""dstune's bottleneck adapter as a peft method: config, layer and model, registered with peft."""

from peft.utils import register_peft_method

from .config import BottleneckConfig, parameters_per_adapter
from .layer import BottleneckLayer
from .model import BottleneckModel, bottleneck_layers
from .peft_type import BOTTLENECK


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if BOTTLENECK not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel,
                             prefix="bottleneck_")


_register()

__all__ = ["BOTTLENECK", "BottleneckConfig", "BottleneckLayer", "BottleneckModel", "bottleneck_layers",
           "parameters_per_adapter"]
