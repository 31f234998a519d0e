"""The torch backend of `dstune serve`: a transformers model (with peft adapters) and its DynamicCache rows.

A joining request's cache is left-padded to the batch's length (or the batch to its), the padding masked and the
positions kept per row; a leaving row's cache goes, and so do the leading columns no remaining row uses. Requests
for plain LoRA adapters and for the base decode in one batch through peft's mixed-batch `adapter_names`; DoRA,
IA3 and the bottleneck adapter get one batch per adapter.
"""

from __future__ import annotations

import torch

from ..errors import InputError


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def join_caches(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` in place, left-padding the shorter side; returns the joined mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    total = max(length, other_length)
    for layer, new in zip(cache.layers, other.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, total - length), _pad_left(new.keys, total - other_length)])
        layer.values = torch.cat([_pad_left(layer.values, total - length),
                                  _pad_left(new.values, total - other_length)])
    pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], dim=1)  # noqa: E731
    return torch.cat([pad(mask, total - length), pad(other_mask, total - other_length)])


def keep_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows `keep` of `cache` in place and drop the leading columns no kept row uses; returns the mask."""
    index = torch.tensor(keep, dtype=torch.long)
    mask = mask.index_select(0, index)
    used = mask.sum(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:]


def mixable(peft_config) -> bool:
    """Whether peft can run this adapter beside others in one batch (`adapter_names`): plain LoRA only."""
    return peft_config.peft_type.value == "LORA" and not getattr(peft_config, "use_dora", False)


class TorchBackend:
    """A transformers causal LM, optionally a peft model with named adapters; state = (DynamicCache, mask)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model.eval()
        self._active: str | None = None
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        if kinds - {"DynamicLayer"}:
            raise InputError(f"dstune serve: the torch engine joins plain KV caches only; this model's cache has "
                             f"{sorted(kinds)} layers (sliding-window attention). Serve it with --engine vllm")

    @property
    def adapters(self) -> list[str]:
        config = getattr(self.model, "peft_config", None)
        return sorted(config) if config else []

    def load_adapter(self, name: str, path: str) -> None:
        from .adapters import add_adapter

        self._enable()
        self.model = add_adapter(self.model, name, path).eval()

    def unload_adapter(self, name: str) -> None:
        from .adapters import remove_adapter

        self._enable()
        self.model = remove_adapter(self.model, name).eval()

    def batch_key(self, adapter: str | None) -> str | None:
        """Rows with the same key decode together: the base and plain LoRA adapters share "mixed"."""
        if adapter is None or mixable(self.model.peft_config[adapter]):
            return "mixed"
        return adapter

    def _enable(self) -> None:
        """Adapter layers on, the active adapter unknown (peft's): the state a load or unload expects."""
        if self._active == "off":
            self.model.base_model.enable_adapter_layers()
        self._active = None

    def _use(self, mode: str | None) -> None:
        """Put the peft model in `mode`: "off" (adapter layers disabled), "hooks" (mixed batches) or an adapter name.

        Switching walks every adapter layer (peft's disable_adapter context costs 33 ms a step on SmolLM2-135M), so
        the mode stays until a batch needs another one.
        """
        if mode == self._active:
            return
        if mode == "off":
            self.model.base_model.disable_adapter_layers()
        else:
            if self._active in (None, "off"):
                self.model.base_model.enable_adapter_layers()
            if mode != "hooks":
                self.model.set_adapter(mode)
        self._active = mode

    def forward(self, key: str | None, adapters: list[str | None], **inputs):
        """The model's forward pass for rows of one batch key, each with its adapter.

        A batch whose rows all use one adapter (or none) runs as a plain forward pass with that adapter active (or
        the adapter layers off); only a batch that mixes them pays for peft's per-row `adapter_names` hooks.
        """
        if not getattr(self.model, "peft_config", None):
            return self.model(**inputs)
        names = set(adapters)
        if len(names) == 1:
            self._use("off" if None in names else next(iter(names)))
            return self.model(**inputs)
        self._use("hooks")
        return self.model(**inputs, adapter_names=[a or "__base__" for a in adapters])

    def prefill(self, key: str | None, prompt_ids: list[int], adapter: str | None):
        """The last position's logits and the state of one prompt run alone."""
        from transformers import DynamicCache

        ids = torch.tensor([prompt_ids])
        out = self.forward(key, [adapter], input_ids=ids, attention_mask=torch.ones_like(ids),
                           position_ids=torch.arange(ids.shape[1])[None],
                           past_key_values=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], (out.past_key_values, torch.ones(1, ids.shape[1], dtype=torch.long))

    def join(self, state, other):
        cache, mask = state
        return cache, join_caches(cache, mask, other[0], other[1])

    def decode(self, key: str | None, state, tokens: list[int], adapters: list[str | None], lengths: list[int]):
        """One step for every row: logits [rows, vocab] and the grown state."""
        cache, mask = state
        mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
        out = self.forward(key, adapters, input_ids=torch.tensor(tokens)[:, None], attention_mask=mask,
                           position_ids=torch.tensor(lengths)[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1], (cache, mask)

    def keep(self, state, keep: list[int]):
        cache, mask = state
        return cache, keep_rows(cache, mask, keep)
