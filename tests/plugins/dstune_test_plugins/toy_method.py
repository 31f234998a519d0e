"""`last_layers_lora`: a toy method plugin — LoRA on the attention of the last `layers` decoder layers only.

Adding a method to dstune is this module plus one entry point (`dstune.methods`) in pyproject.toml: its options
become the recipe section `train.last_layers_lora`, and the loop, checkpoints and resume work unchanged.
"""

from __future__ import annotations

from pydantic import Field

from dstune.config import StrictModel
from dstune.tuners.method import Method


class LastLayersOptions(StrictModel):
    """The recipe section train.last_layers_lora."""

    r: int = Field(2, ge=1)
    layers: int = Field(1, ge=1)


class LastLayersLora(Method):
    """LoRA on q_proj/v_proj of the top decoder layers."""

    options = LastLayersOptions
    summary = "LoRA on the attention of the last layers"

    def add(self, model, options, train):
        from peft import LoraConfig, TaskType, get_peft_model

        count = model.config.num_hidden_layers
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=options.r, lora_alpha=2 * options.r,
                            target_modules=["q_proj", "v_proj"],
                            layers_to_transform=list(range(count - options.layers, count)))
        return get_peft_model(model, config)
