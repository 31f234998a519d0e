"""The prefix-tuning model: Prefix-Tuning through peft, with the transformers 5.x cache handled, and multi-task shared prefixes.

peft 0.21 + transformers 5.x: the model's cache keyword became `cache` (was `past_key_values`). peft's
`prepare_inputs_for_generation` still injects the prefix as `past_key_values`, the model keeps the `cache` that
`generate` made, and generation silently runs without the prefix (the peft #2821 family of breakages).
`PrefixCausalLM` owns both paths instead: the same prefix cache, attention mask and position ids in the training
forward and in every generation step. `tests/tuners/test_prefix.py` catches a regression.

Multi-task: a prefix shared by all tasks, followed by each task's own prefix. Both are ordinary peft prefix
adapters (`shared` and one per task) of one PeftModel, so peft saves and loads them; the model concatenates the
shared prefix and each row's task prefix into one cache.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from pathlib import Path

import torch
from peft import PeftModelForCausalLM, PrefixTuningConfig, TaskType, get_peft_model
from peft.utils import PeftType

from ..errors import InputError
from .prefix import PREFIX_MANIFEST, SHARED, PrefixOptions, prefix_task_adapters  # noqa: F401
# MLA caches compressed latents (kv_lora_rank) and a shared RoPE key, not per-head keys and values.
UNSUPPORTED = {"deepseek_v2": "MLA attention", "deepseek_v3": "MLA attention"}


def build_prefix_config(num_virtual_tokens: int, options: PrefixOptions) -> PrefixTuningConfig:
    """A peft PrefixTuningConfig with the recipe's reparameterisation choice."""
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
        prefix_projection=options.projection, encoder_hidden_size=options.projection_hidden,
    )


def check_prefix_support(model) -> None:
    """Refuse architectures whose cache cannot take per-head key/value prefixes."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in UNSUPPORTED:
        raise InputError(f"train.method: prefix tuning does not support {model_type} ({UNSUPPORTED[model_type]} "
                         "caches compressed latents); use lora, dora, adapter or ia3")


def add_prefix(model, options: PrefixOptions) -> PrefixCausalLM:
    """Wrap a base model with fresh prefix adapters: one `default`, or `shared` plus one per task."""
    check_prefix_support(model)
    if not options.tasks:
        return as_prefix_model(get_peft_model(model, build_prefix_config(options.num_virtual_tokens, options)))
    if SHARED in options.tasks:
        raise InputError(f"train.prefix.tasks: {SHARED!r} is the shared prefix's name; rename that task")
    peft_model = get_peft_model(model, build_prefix_config(options.shared_tokens, options), adapter_name=SHARED)
    for task in options.tasks:
        peft_model.add_adapter(task, build_prefix_config(options.num_virtual_tokens, options))
    peft_model = as_prefix_model(peft_model)
    peft_model.set_prefix_tasks(options.tasks)
    return peft_model


def as_prefix_model(peft_model) -> PrefixCausalLM:
    """Give a peft causal-LM model dstune's prefix handling (a no-op for models without prefix adapters)."""
    if isinstance(peft_model, PeftModelForCausalLM) and not isinstance(peft_model, PrefixCausalLM):
        peft_model.__class__ = PrefixCausalLM
        peft_model.prefix_tasks = []
        peft_model.generation_task = None
    return peft_model


class PrefixCausalLM(PeftModelForCausalLM):
    """peft's causal-LM model whose prefix-tuning forward and generation agree, with multi-task prefixes."""

    prefix_tasks: list[str]
    generation_task: str | list[str] | None

    def set_prefix_tasks(self, tasks: list[str]) -> None:
        """Declare the adapters that are task prefixes to be concatenated after the shared one."""
        self.prefix_tasks = list(tasks)
        # peft freezes every adapter but the active one; all prefixes of a multi-task model train together.
        for name in [SHARED, *tasks]:
            self.prompt_encoder[name].requires_grad_(not self.peft_config[name].inference_mode)

    def _uses_prefix(self) -> bool:
        return self.active_peft_config.peft_type == PeftType.PREFIX_TUNING

    def _prefix_parts(self, batch_size: int, task: str | list[str] | None) -> list[list[str]]:
        """Per row, the prefix adapters to concatenate (shared first)."""
        if not self.prefix_tasks:
            return [[self.active_adapter]] * batch_size
        tasks = [task] * batch_size if isinstance(task, str) or task is None else list(task)
        if len(tasks) != batch_size:
            raise ValueError(f"got {len(tasks)} task names for a batch of {batch_size}")
        for name in tasks:
            if name not in self.prefix_tasks:
                raise InputError(f"task {name!r} has no prefix; tasks: {self.prefix_tasks}")
        return [[SHARED, name] for name in tasks]

    def _adapter_key_values(self, name: str) -> torch.Tensor:
        """One adapter's prefix as [layers * 2, kv_heads, tokens, head_dim] (what peft's get_prompt builds)."""
        config = self.peft_config[name]
        encoder = self.prompt_encoder[name]
        if config.inference_mode:  # saved prefixes are the encoder's output; peft loads them into the embedding
            values = encoder.embedding.weight
        else:
            tokens = self.prompt_tokens[name][: config.num_virtual_tokens].to(encoder.embedding.weight.device)
            values = encoder(tokens.unsqueeze(0))[0]
        if self.base_model_torch_dtype is not None:
            values = values.to(self.base_model_torch_dtype)
        heads = config.num_attention_heads
        values = values.view(config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
        return values.permute(1, 2, 0, 3)

    @torch.no_grad()
    def init_from_activations(self, token_ids: torch.Tensor) -> None:
        """Set every plain prefix to the base model's keys and values of real text (Li & Liang's init).

        Random prefixes start the model far from its own distribution; keys and values it produced itself
        keep the first steps near the base loss. Prefixes behind a projection MLP keep peft's init.
        """
        base = self.get_base_model()
        cache = self._new_cache()
        # The base model alone: peft's prefix lives in this wrapper, not in the base modules.
        base(input_ids=token_ids.view(1, -1).to(base.device), **{_cache_keyword(base): cache}, use_cache=True)
        keys = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # L,2,H,T,D
        keys = keys.flatten(0, 1)  # [layers * 2, heads, T, head_dim], the layout of _adapter_key_values
        start = 0
        for name in [SHARED, *self.prefix_tasks] if self.prefix_tasks else [self.active_adapter]:
            config = self.peft_config[name]
            encoder = self.prompt_encoder[name]
            if config.prefix_projection:
                continue
            n = config.num_virtual_tokens
            # Each prefix takes its own stretch of the text, repeated if the text is short.
            index = torch.arange(start, start + n) % keys.shape[2]
            start += n
            values = keys[:, :, index].permute(2, 0, 1, 3).reshape(n, -1)
            encoder.embedding.weight.copy_(values.to(encoder.embedding.weight.dtype))

    def prefix_length(self, task: str | list[str] | None = None) -> int:
        """Virtual tokens in front of every row (shared plus task prefix; every task prefix has the same length)."""
        if isinstance(task, list):
            task = task[0]
        return sum(self.peft_config[name].num_virtual_tokens for name in self._prefix_parts(1, task)[0])

    def fill_prefix(self, cache, batch_size: int, task: str | list[str] | None = None) -> int:
        """Write each row's prefix keys and values into an empty cache; returns the prefix length."""
        parts = self._prefix_parts(batch_size, task)
        built = {name: self._adapter_key_values(name) for name in {n for row in parts for n in row}}
        rows = torch.stack([torch.cat([built[name] for name in row], dim=2) for row in parts], dim=1)
        num_layers = rows.shape[0] // 2
        for layer in range(num_layers):
            cache.update(rows[2 * layer], rows[2 * layer + 1], layer)
        return rows.shape[3]

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.get_base_model().config)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                task=None, **kwargs):
        """The base model's forward behind the prefix; `task` names each row's task on multi-task models."""
        if not self._uses_prefix():
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, position_ids=position_ids, **kwargs)
        reference = input_ids if input_ids is not None else inputs_embeds
        batch_size, length = reference.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=reference.device)
        cache = self._new_cache()
        prefix = self.fill_prefix(cache, batch_size, task)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs[_cache_keyword(self.get_base_model())] = cache
        return self.base_model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels,
            attention_mask=torch.cat([attention_mask.new_ones(batch_size, prefix), attention_mask], dim=1),
            # peft's convention: the text's positions follow the virtual tokens.
            position_ids=position_ids + prefix, **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        """Each generation step sees the prefix in the cache, and positions counted as in training."""
        if not self._uses_prefix():
            return super().prepare_inputs_for_generation(*args, task_ids=task_ids, **kwargs)
        model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
        key = _cache_keyword(self.get_base_model())
        input_ids = model_kwargs.get("input_ids")
        reference = input_ids if input_ids is not None else model_kwargs["inputs_embeds"]
        batch_size, new = reference.shape[:2]
        cache = model_kwargs.get(key)
        if cache is None:
            cache = model_kwargs[key] = self._new_cache()
        if cache.get_seq_length() == 0:
            self.fill_prefix(cache, batch_size, self.generation_task)
        prefix = self.prefix_length(self.generation_task)
        mask = kwargs.get("attention_mask")
        if mask is None:  # generate drops an all-ones mask; rebuild it over the text seen so far
            mask = torch.ones(batch_size, cache.get_seq_length() - prefix + new, dtype=torch.long,
                              device=reference.device)
        model_kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:] + prefix
        model_kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, prefix), mask], dim=1)
        if model_kwargs.get("cache_position") is not None:
            model_kwargs["cache_position"] = model_kwargs["cache_position"] + prefix
        return model_kwargs

    @contextlib.contextmanager
    def for_task(self, task: str | list[str] | None):
        """Generate with the prefix of `task` (a name, or one name per row) on a multi-task model."""
        saved, self.generation_task = self.generation_task, task
        try:
            yield self
        finally:
            self.generation_task = saved

    def save_pretrained(self, save_directory, *args, **kwargs):
        """peft's save, plus the shared/task layout of a multi-task prefix."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.prefix_tasks:
            layout = {"shared": SHARED, "tasks": self.prefix_tasks}
            (Path(save_directory) / PREFIX_MANIFEST).write_text(json.dumps(layout, indent=2))


def _cache_keyword(model) -> str:
    """`cache` in transformers >= 5.2x, `past_key_values` before."""
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
