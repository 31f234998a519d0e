"""Continuous batching for `dstune serve`: one scheduler thread decodes every running request together.

A request is prefilled alone as soon as a slot is free, and its KV cache joins the running batch at the next decode
step (left-padded to the batch's length, with the padding masked and positions kept per row). A finished or
cancelled request leaves the batch at once; columns that only padding uses are trimmed. Requests for different
LoRA adapters share one batch through peft's mixed-batch `adapter_names`; adapters peft cannot mix (DoRA, IA3,
...) get one batch each. transformers' own continuous batching packs every request into one paged sequence, where
a per-row adapter has no row to attach to, so it cannot serve several adapters at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError

log = logging.getLogger("dstune.serve")

BASE = None  # the adapter name of a request for the base model


class QueueFull(Exception):
    """The waiting queue is at capacity: the HTTP layer answers 429."""


@dataclass
class Sampling:
    """How one choice picks its tokens: greedy at temperature 0, else nucleus sampling with its own generator."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenRequest:
    """One choice to generate: prompt tokens, adapter, limits and stops."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """What the engine tells a request's reader: new text, or the end (with the reason and the full text)."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Stream:
    """The reader's side of a request: events arrive through `deliver` (a thread-safe callback), cancel any time."""

    def __init__(self, deliver: Callable[[Event], None]):
        self.deliver = deliver
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    request: GenRequest
    stream: Stream
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text delivered so far
    length: int = 0  # real tokens in this row's cache: the position of the next token


class _Batch:
    """Rows decoding together: one KV cache, one attention mask over its columns, one adapter regime."""

    def __init__(self, key: str | None):
        self.key = key
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a real token
        self.next_ids: list[int] = []


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


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from a row of logits: argmax at temperature 0, else temperature and top-p (nucleus) sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def mixable(peft_config) -> bool:
    """Whether peft can run this adapter beside others in one batch (`adapter_names`): plain LoRA only."""
    return peft_config.peft_type.value == "LORA" and not getattr(peft_config, "use_dora", False)


class Engine:
    """The scheduler: a bounded waiting queue, at most `max_batch` running rows, one thread stepping them."""

    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch: int = 32, max_queue: int = 64,
                 metrics=None):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: collections.deque[_Row] = collections.deque()
        self._batches: dict[str | None, _Batch] = {}
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._active_adapter: str | None = None
        self._thread = threading.Thread(target=self._run, name="dstune-serve-engine", daemon=True)
        self._check_cache()
        self.model.eval()
        self._thread.start()

    # ---------------------------------------------------------------- the HTTP side
    @property
    def adapters(self) -> list[str]:
        config = getattr(self.model, "peft_config", None)
        return sorted(config) if config else []

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return sum(len(b.rows) for b in self._batches.values())

    def submit(self, request: GenRequest, stream: Stream) -> None:
        """Queue one choice; raises QueueFull when `max_queue` requests already wait."""
        generator = None
        if request.sampling.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(request.sampling.seed if request.sampling.seed is not None
                                  else int(torch.randint(0, 2**62, (1,))))
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(_Row(request, stream, generator))
            self._wake.notify()

    def call(self, fn: Callable) -> Future:
        """Run `fn()` on the engine thread between two steps (adapter loads and unloads); returns its future."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter (on the engine thread, through `call`)."""
        from .adapters import add_adapter

        self.model = add_adapter(self.model, name, path)
        self.model.eval()
        self._active_adapter = None

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter no request is using (on the engine thread, through `call`)."""
        from .adapters import remove_adapter

        rows = [r for b in self._batches.values() for r in b.rows] + list(self._waiting)
        if any(r.request.adapter == name for r in rows):
            raise InputError(f"adapter {name!r} has requests running or waiting; unload it when they end")
        self.model = remove_adapter(self.model, name)
        self.model.eval()
        self._active_adapter = None

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- the engine thread
    def _check_cache(self) -> None:
        from transformers import DynamicCache

        cache = DynamicCache(config=self._base_config())
        kinds = {type(layer).__name__ for layer in cache.layers}
        if kinds - {"DynamicLayer"}:
            raise InputError(f"dstune serve: the torch engine joins plain KV caches only; this model's cache has "
                             f"{sorted(kinds)} layers (sliding-window attention). Serve it with --engine vllm")

    def _base_config(self):
        return self.model.config

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopped or self._waiting or self._calls or self.running()):
                        self._wake.wait()
                    if self._stopped:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, future in calls:
                    try:
                        future.set_result(fn())
                    except Exception as error:  # noqa: BLE001 - the caller's future reports it
                        future.set_exception(error)
                try:
                    self._step()
                except Exception as error:  # noqa: BLE001 - one failure must not stop the server
                    log.exception("engine step failed")
                    for batch in self._batches.values():
                        for row in batch.rows:
                            row.stream.deliver(Event("error", text=f"generation failed: {error}"))
                    self._batches.clear()
        for batch in self._batches.values():
            for row in batch.rows:
                row.stream.deliver(Event("error", text="the server is shutting down"))
        while self._waiting:
            self._waiting.popleft().stream.deliver(Event("error", text="the server is shutting down"))

    def _step(self) -> None:
        self._admit()
        sizes = []
        for key in list(self._batches):
            batch = self._batches[key]
            if batch.rows:
                sizes.append(len(batch.rows))
                self._decode(batch)
            if not batch.rows:
                del self._batches[key]
        if self.metrics is not None and sizes:
            self.metrics.decode_step(sum(sizes))

    def _batch_key(self, adapter: str | None) -> str | None:
        if adapter is None or mixable(self.model.peft_config[adapter]):
            return "mixed"
        return adapter

    def _forward(self, key: str | None, adapters: list[str | None], **inputs):
        peft_config = getattr(self.model, "peft_config", None)
        if not peft_config:
            return self.model(**inputs)
        if key == "mixed":
            if all(a is None for a in adapters):
                with self.model.disable_adapter():
                    return self.model(**inputs)
            return self.model(**inputs, adapter_names=[a or "__base__" for a in adapters])
        if self._active_adapter != key:
            self.model.set_adapter(key)
            self._active_adapter = key
        return self.model(**inputs)

    def _admit(self) -> None:
        from transformers import DynamicCache

        while self._waiting and self.running() < self.max_batch:
            with self._wake:
                row = self._waiting.popleft()
            if row.stream.cancelled.is_set():
                row.stream.deliver(Event("done", finish_reason="cancelled"))
                continue
            if row.request.adapter is not None and row.request.adapter not in self.adapters:
                row.stream.deliver(Event("error", text=f"adapter {row.request.adapter!r} was unloaded"))
                continue
            ids = torch.tensor([row.request.prompt_ids])
            cache = DynamicCache(config=self._base_config())
            key = self._batch_key(row.request.adapter)
            out = self._forward(key, [row.request.adapter], input_ids=ids, attention_mask=torch.ones_like(ids),
                                position_ids=torch.arange(ids.shape[1])[None], past_key_values=cache, use_cache=True,
                                logits_to_keep=1)
            row.length = ids.shape[1]
            token = sample(out.logits[0, -1], row.request.sampling, row.generator)
            row.stream.first_token = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token(row.stream.first_token - row.stream.submitted)
            if self._advance(row, token):
                continue
            batch = self._batches.setdefault(key, _Batch(key))
            mask = torch.ones(1, ids.shape[1], dtype=torch.long)
            if batch.cache is None:
                batch.cache, batch.mask = out.past_key_values, mask
            else:
                batch.mask = join_caches(batch.cache, batch.mask, out.past_key_values, mask)
            batch.rows.append(row)
            batch.next_ids.append(token)

    def _decode(self, batch: _Batch) -> None:
        rows = batch.rows
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        out = self._forward(batch.key, [r.request.adapter for r in rows], input_ids=torch.tensor(batch.next_ids)[:, None],
                            attention_mask=mask, position_ids=torch.tensor([[r.length] for r in rows]),
                            past_key_values=batch.cache, use_cache=True)
        batch.mask = mask
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()
        keep, next_ids = [], []
        for i, row in enumerate(rows):
            row.length += 1
            token = greedy[i] if row.request.sampling.temperature == 0 else sample(logits[i], row.request.sampling,
                                                                                    row.generator)
            if not self._advance(row, token):
                keep.append(i)
                next_ids.append(token)
        if len(keep) < len(rows):
            if keep:
                batch.mask = keep_rows(batch.cache, batch.mask, keep)
            batch.rows = [rows[i] for i in keep]
        batch.next_ids = next_ids

    def _advance(self, row: _Row, token: int) -> bool:
        """Take one new token for `row`; deliver new text; return True when the row is finished."""
        if row.stream.cancelled.is_set():
            self._finish(row, "cancelled", self._text(row))
            return True
        if token in self.stop_ids:
            self._finish(row, "stop", self._text(row), counted=1)
            return True
        row.ids.append(token)
        text = self._text(row)
        for stop in row.request.stop:
            at = text.find(stop)
            if at >= 0:
                self._finish(row, "stop", text[:at])
                return True
        if len(row.ids) >= row.request.max_tokens:
            self._finish(row, "length", text)
            return True
        # Hold back an incomplete UTF-8 character, and any tail that could be the start of a stop string.
        ready = len(text.rstrip("\ufffd"))
        for stop in row.request.stop:
            for n in range(min(len(stop) - 1, ready), 0, -1):
                if text[:ready].endswith(stop[:n]):
                    ready -= n
                    break
        if ready > row.sent:
            row.stream.deliver(Event("delta", text=text[row.sent:ready]))
            row.sent = ready
        return False

    def _text(self, row: _Row) -> str:
        return self.tokenizer.decode(row.ids, skip_special_tokens=True)

    def _finish(self, row: _Row, reason: str, text: str, counted: int = 0) -> None:
        if len(text) > row.sent:
            row.stream.deliver(Event("delta", text=text[row.sent:]))
        tokens = len(row.ids) + counted
        row.stream.deliver(Event("done", text=text, finish_reason=reason,
                                 prompt_tokens=len(row.request.prompt_ids), completion_tokens=tokens))
        if self.metrics is not None:
            self.metrics.finished(tokens, time.perf_counter() - row.stream.submitted)
