"""A cache of generated answers keyed by (model fingerprint, prompt, decoding settings), so that re-running a
report or an evaluation doesn't generate again. SQLite under $DSTUNE_CACHE (default ~/.cache/dstune)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import torch


def _plain_tensors(name: str, tensor: torch.Tensor, digest) -> list[tuple[str, torch.Tensor]]:
    """A tensor's plain parts: itself, or a subclass's inner tensors (its type and attributes go into `digest`)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return [(name, tensor)]
    inner, attributes = tensor.__tensor_flatten__()
    # The attributes tell int8 from int8 weight-only (same qdata and scale, different matmul): hash them too.
    digest.update(f"{name}{type(tensor).__name__}{attributes!r}".encode())
    return [part for key in inner for part in _plain_tensors(f"{name}.{key}", getattr(tensor, key), digest)]


def model_fingerprint(model) -> str:
    """A hash of the weights: trainable tensors (adapters) in full, frozen ones by shape and a strided sample.

    Any training step changes a trainable tensor, and a different checkpoint differs in its sampled values;
    hashing every frozen byte of a 14B model would take longer than the generation it saves.
    """
    # A model that is not a torch module (the ONNX Runtime GenAI wrapper) hashes its own files.
    if callable(getattr(model, "fingerprint", None)):
        return model.fingerprint()
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Quantized weights cannot be reshaped or read as floats; their int8 data and scales can.
            for part_name, part in _plain_tensors(name, param.detach(), digest):
                flat = part.reshape(-1)
                if not param.requires_grad and flat.numel() > 65536:
                    flat = flat[:: flat.numel() // 4096]
                digest.update(f"{part_name}{tuple(part.shape)}{part.dtype}".encode())
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
