"""The method plugin: what a PEFT method owns, from its recipe section to how its adapters merge.

A method is one module that defines a `Method` subclass and registers an instance:

    from dstune.plugins import METHODS
    from dstune.tuners.method import Method, NoOptions

    class MyOptions(StrictModel):          # the recipe section train.my_method
        r: int = 8

    @METHODS.register("my_method")
    class MyMethod(Method):
        options = MyOptions
        def add(self, model, options, train): ...   # -> a peft model with a fresh, trainable adapter

Third-party packages register theirs through the `dstune.methods` entry point group. The loop (dstune.train.loop)
calls the hooks below and knows no method by name. Keep a method module light: import peft inside the hooks, so
that a recipe is validated before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path

from ..config import StrictModel


class NoOptions(StrictModel):
    """A plugin without options (its recipe section, if written, must be empty)."""


class Method:
    """A PEFT method plugin; subclasses set `options` and implement `add`, and override the hooks they need."""

    # The pydantic class of the recipe section `train.<name>`.
    options: type[StrictModel] = NoOptions
    summary: str = ""
    # Whether packed rows (several samples in one row, block-diagonal mask) suit this method.
    packs: bool = True
    packing_conflict: str = "cannot train on packed rows"
    # Whether dstune's fused LoRA linear (dstune.train.fastlora) may replace peft's LoRA layers.
    fuses: bool = False
    # Whether quantization-aware training (train.qat) covers it.
    supports_qat: bool = False
    # The learning rate of a recipe that sets none (as PEFT's and LLaMA-Factory's examples use for the method).
    default_learning_rate: float = 1e-4

    def check(self, train) -> None:
        """Refuse settings of the whole train section that this method cannot honour (raise ValueError)."""

    def add(self, model, options, train):
        """Wrap a base model with a fresh, trainable adapter of this method; returns the peft model."""
        raise NotImplementedError

    def sample_fields(self, options) -> tuple[str, ...]:
        """Extra record fields each encoded sample carries to the model (the multi-task prefix needs `task`)."""
        return ()

    def before_training(self, model, options, train_samples: list[dict], max_length: int) -> None:
        """After `add`, before the first step: initialise from data (prefix tuning starts from real activations)."""

    def on_step_begin(self, model, options, step: int, epoch: float) -> None:
        """Before each optimizer step (0-based `step` = steps done): e.g. switch on adapter stages."""

    def on_train_end(self, model, options) -> None:
        """After the last step, before the adapter is saved."""

    def restore(self, model, checkpoint: Path, trainable: bool = True) -> None:
        """Load the adapter weights saved in a checkpoint folder back into the model: to resume training
        (`trainable`), or to keep the best step's weights at the end."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .lora import keep_moe_targets

        with keep_moe_targets():
            set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")),
                                      adapter_name=model.active_adapter)

    def ensure_peft(self) -> None:
        """Make peft able to load this method's saved adapters (dstune's own peft methods register here)."""
