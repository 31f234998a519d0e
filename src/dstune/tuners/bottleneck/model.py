"""BottleneckModel: the peft tuner that puts a BottleneckLayer on each targeted sub-layer."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, _get_submodules
from torch import nn

from .layer import BottleneckLayer


class BottleneckModel(BaseTuner):
    """Adds bottleneck adapters after the targeted attention / MLP blocks of a transformers model."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = {}

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        hidden_size = _hidden_size(self.model)
        new_module = BottleneckLayer(target, adapter_name, hidden_size, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _unload_and_optionally_merge(self, merge=True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge:
            raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights")
        for key in [key for key, _ in self.model.named_modules() if self.prefix not in key]:
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, BottleneckLayer):
                self._replace_module(parent, target_name, target.get_base_layer(), target)
        return self.model


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError("bottleneck adapters need `hidden_size` in the model config")
    return int(size)


def bottleneck_layers(model: nn.Module) -> list[tuple[str, BottleneckLayer]]:
    """Every BottleneckLayer of a model with its module name, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BottleneckLayer)]

