"""BottleneckConfig: the peft config of dstune's bottleneck adapter (Houlsby / Pfeiffer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .layer import ACTIVATIONS
from .peft_type import BOTTLENECK


@dataclass
class BottleneckConfig(PeftConfig):
    """A down-projection d -> r, a non-linearity and an up-projection r -> d, added to a sub-layer's output."""

    r: int = field(default=64, metadata={"help": "Bottleneck width."})
    activation: str = field(default="relu", metadata={"help": "relu, gelu or silu."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck's input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Sub-layers whose output gets an adapter, e.g. ['mlp'] (Pfeiffer) or ['self_attn', 'mlp'] "
                          "(Houlsby)."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.target_modules is None:
            self.target_modules = ["mlp"]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)



def parameters_per_adapter(hidden_size: int, r: int) -> int:
    """Weights and biases of one adapter: down d*r + r, up r*d + d."""
    return 2 * hidden_size * r + r + hidden_size
