"""Prometheus metrics of `dstune serve`, in a registry of the server's own (one per app, so tests can run several)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests by route and status, queue depth, running rows, tokens/s, TTFT, latency and decode batch size."""

    def __init__(self, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dstune_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.queue = Gauge("dstune_queue_depth", "requests waiting for a decode slot", registry=r)
        self.running = Gauge("dstune_running_requests", "requests in the running decode batch", registry=r)
        self.tokens = Counter("dstune_generated_tokens", "tokens generated", registry=r)
        self.rate = Gauge("dstune_tokens_per_second", f"tokens generated per second over the last {window_s:g} s",
                          registry=r)
        self.ttft = Histogram("dstune_time_to_first_token_seconds", "from queueing to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("dstune_request_latency_seconds", "from queueing to the last token of a choice",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("dstune_decode_batch_size", "rows decoded together in one step (its _sum/_count is "
                               "the mean decode batch size)", buckets=BATCH_BUCKETS, registry=r)
        self._window = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.rate.set_function(self._tokens_per_second)

    def bind(self, engine) -> None:
        """Read the queue depth and running rows from the engine at each scrape."""
        self.queue.set_function(engine.queue_depth)
        self.running.set_function(engine.running)

    def _tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window

    def decode_step(self, rows: int) -> None:
        self.batch.observe(rows)
        self.tokens.inc(rows)
        with self._lock:
            self._recent.append((time.perf_counter(), rows))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.tokens.inc()
        with self._lock:
            self._recent.append((time.perf_counter(), 1))

    def finished(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
