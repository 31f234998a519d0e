"""Continuous batching for `dstune serve`: one scheduler thread decodes every running request together.

A request is prefilled alone as soon as a slot is free, and its KV cache joins the running batch at the next decode
step; a finished or cancelled request leaves the batch at once. How a cache joins, shrinks and decodes is the
backend's: `torch_backend` (transformers' DynamicCache, left-padded, with peft adapters) and `onnx_backend`
(dstune's onnxruntime-genai exports run by onnxruntime, right-padded as their GroupQueryAttention expects). The
scheduler, sampling, stops and streaming are shared.
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
    """Rows decoding together: one backend state (their KV cache), one adapter regime (the backend's key)."""

    def __init__(self, key: str | None):
        self.key = key
        self.rows: list[_Row] = []
        self.state = None
        self.next_ids: list[int] = []


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


class Engine:
    """The scheduler: a bounded waiting queue, at most `max_batch` running rows, one thread stepping them.

    `backend` holds the model(s) and their KV caches: `adapters`, `batch_key(adapter)`, `prefill`, `join`,
    `decode`, `keep`, `load_adapter` and `unload_adapter` (see torch_backend.TorchBackend).
    """

    def __init__(self, backend, tokenizer, stop_ids: list[int], max_batch: int = 32, max_queue: int = 64,
                 metrics=None):
        self.backend = backend
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
        self._thread = threading.Thread(target=self._run, name="dstune-serve-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the HTTP side
    @property
    def adapters(self) -> list[str]:
        return self.backend.adapters

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
        self.backend.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter no request is using (on the engine thread, through `call`)."""
        rows = [r for b in self._batches.values() for r in b.rows] + list(self._waiting)
        if any(r.request.adapter == name for r in rows):
            raise InputError(f"adapter {name!r} has requests running or waiting; unload it when they end")
        self.backend.unload_adapter(name)

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- the engine thread
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

    def _admit(self) -> None:
        while self._waiting and self.running() < self.max_batch:
            with self._wake:
                row = self._waiting.popleft()
            if row.stream.cancelled.is_set():
                row.stream.deliver(Event("done", finish_reason="cancelled"))
                continue
            adapter = row.request.adapter
            if adapter is not None and adapter not in self.adapters:
                row.stream.deliver(Event("error", text=f"adapter {adapter!r} was unloaded"))
                continue
            key = self.backend.batch_key(adapter)
            logits, state = self.backend.prefill(key, row.request.prompt_ids, adapter)
            row.length = len(row.request.prompt_ids)
            token = sample(logits, row.request.sampling, row.generator)
            row.stream.first_token = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token(row.stream.first_token - row.stream.submitted)
            if self._advance(row, token):
                continue
            batch = self._batches.setdefault(key, _Batch(key))
            batch.state = state if batch.state is None else self.backend.join(batch.state, state)
            batch.rows.append(row)
            batch.next_ids.append(token)

    def _decode(self, batch: _Batch) -> None:
        rows = batch.rows
        logits, batch.state = self.backend.decode(batch.key, batch.state, batch.next_ids,
                                                  [r.request.adapter for r in rows], [r.length for r in rows])
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
                batch.state = self.backend.keep(batch.state, keep)
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
        row.stream.deliver(Event("done", text=text, finish_reason=reason, completion_tokens=tokens))
        if self.metrics is not None:
            self.metrics.finished(time.perf_counter() - row.stream.submitted)
