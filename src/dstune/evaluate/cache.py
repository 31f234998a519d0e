"""A cache of generated answers keyed by (model fingerprint, prompt, decoding settings), so that re-running a
report or an evaluation doesn't generate again. SQLite under $DSTUNE_CACHE (default ~/.cache/dstune)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import torch


def model_fingerprint(model) -> str:
    """A hash of the weights: trainable tensors (adapters) in full, frozen ones by shape and a strided sample.

    Any training step changes a trainable tensor, and a different checkpoint differs in its sampled values;
    hashing every frozen byte of a 14B model would take longer than the generation it saves.
    """
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            if not param.requires_grad and flat.numel() > 65536:
                flat = flat[:: flat.numel() // 4096]
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()


class GenerationCache:
    """Answers by key; `key()` folds in the model fingerprint, the prompt and the decoding settings."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT, tokens INTEGER)")

    @staticmethod
    def key(fingerprint: str, prompt: str, settings: dict) -> str:
        """The cache key of one generation."""
        payload = json.dumps([fingerprint, prompt, settings], sort_keys=True, ensure_ascii=False)
        return hashlib.blake2b(payload.encode("utf-8"), digest_size=20).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """The cached (text, tokens) of the keys that are present."""
        found = {}
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            part = keys[start:start + 500]
            rows = self.db.execute(f"SELECT key, text, tokens FROM answers WHERE key IN ({','.join('?' * len(part))})",
                                   part)
            found.update({k: (t, n) for k, t, n in rows})
        return found

    def put_many(self, items: list[tuple[str, str, int]]) -> None:
        """Store (key, text, tokens) triples."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", items)


def default_cache() -> GenerationCache:
    """The cache file under $DSTUNE_CACHE."""
    from ..models.loading import cache_root

    return GenerationCache(cache_root() / "generations.sqlite")
