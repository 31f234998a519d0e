"""BottleneckLayer: wraps an attention or MLP block and adds `up(act(down(h)))` to its output `h`."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A sub-layer (attention or MLP) followed by one bottleneck per adapter, each added as a residual."""

    # One Linear per adapter name in each ModuleDict: peft's state-dict naming expects `<layer>.<adapter>.weight`.
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_activation", "bottleneck_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, config) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_activation = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        # Staged activation: an adapter of a stage that has not started is skipped (no compute, no gradient).
        self.stage_on = True
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config) -> None:
        """Add a fresh bottleneck for `adapter_name`: d -> r -> d, the up-projection at zero (identity at start)."""
        down, up = nn.Linear(self.hidden_size, config.r), nn.Linear(config.r, self.hidden_size)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        weight = next(self.base_layer.parameters(), None)
        if weight is not None and weight.is_floating_point():
            down.to(weight.device, weight.dtype)
            up.to(weight.device, weight.dtype)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_activation[adapter_name] = ACTIVATIONS[config.activation]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:
        pass

    def forward(self, *args, **kwargs):
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters or not self.stage_on:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        delta = None
        for name in self.active_adapters:
            if name in self.bottleneck_down:
                inner = self.bottleneck_activation[name](self.bottleneck_down[name](self.bottleneck_dropout[name](hidden)))
                step = self.bottleneck_up[name](inner)
                delta = step if delta is None else delta + step
        if delta is None:
            return output
        hidden = hidden + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
