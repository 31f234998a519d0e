"""The ONNX backend of `dstune serve`: dstune's onnxruntime-genai exports, each name its own merged model.

onnxruntime-genai's own `Engine` (0.18) schedules requests only in its static mode for these exports: one that
arrives while a batch decodes waits for the whole batch (its dynamic mode needs a paged-cache graph the model
builder does not make). So dstune runs the exported graph with onnxruntime and schedules the rows itself. The
graph's GroupQueryAttention reads each row's length from the attention mask and writes a new token's key and value
at that row's own position, so the cache is right-padded: a joining row is padded at the end, and a decode step's
logits for a row equal that row decoded alone (tests/serve/test_onnx_backend.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def check_export(path: str | Path, what: str) -> Path:
    """An ONNX export folder made by `dstune export --format onnx` (genai_config.json and its model file)."""
    path = Path(path)
    config = path / "genai_config.json"
    if not config.is_file():
        raise InputError(f"{what} {path}: not an ONNX export folder (no genai_config.json); make one with dstune export "
                         "--format onnx")
    decoder = json.loads(config.read_text())["model"]["decoder"]
    if not (path / decoder["filename"]).is_file():
        raise InputError(f"{what} {path}: {decoder['filename']} is missing")
    return path


class _Model:
    """One exported decoder in an onnxruntime session."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        from ..export.onnx import session_threads

        self.path = path
        self.config = json.loads((path / "genai_config.json").read_text())
        decoder = self.config["model"]["decoder"]
        options = ort.SessionOptions()
        threads = session_threads(self.config)
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / decoder["filename"]), options,
                                            providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in inputs if n.startswith("past_key_values.")),
                           key=lambda n: (int(n.split(".")[1]), n.endswith(".value")))
        self.present = [n.replace("past_key_values", "present") for n in self.past]
        self.dtype = DTYPES[inputs[self.past[0]].type]
        self.heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        self.positions = "position_ids" in inputs
        self.context_length = self.config["model"]["context_length"]
        self.tokenizer_bytes = (path / "tokenizer.json").read_bytes() if (path / "tokenizer.json").is_file() else b""

    def run(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray], positions: np.ndarray):
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past, past))}
        if self.positions:
            feed["position_ids"] = positions
        out = self.session.run(["logits", *self.present], feed)
        return out[0][:, -1], out[1:]


class OnnxBackend:
    """The base export and one export per name; state = (cache arrays [rows, heads, columns, size], lengths)."""

    def __init__(self, base: str | Path):
        self.models: dict[str | None, _Model] = {None: _Model(check_export(base, "--model"))}

    @property
    def base(self) -> _Model:
        return self.models[None]

    @property
    def adapters(self) -> list[str]:
        return sorted(n for n in self.models if n is not None)

    def load_adapter(self, name: str, path: str) -> None:
        """Serve another export (a merged adapter) under `name`; it must share the base's tokenizer."""
        if name in self.models:
            raise InputError(f"adapter {name!r} is already loaded")
        model = _Model(check_export(path, f"--adapter {name}="))
        if model.tokenizer_bytes != self.base.tokenizer_bytes:
            raise InputError(f"--adapter {name}={path}: its tokenizer.json differs from the base export's; one server "
                             "serves models of one tokenizer")
        self.models[name] = model

    def unload_adapter(self, name: str) -> None:
        if name not in self.models or name is None:
            raise InputError(f"adapter {name!r} is not loaded")
        del self.models[name]

    def batch_key(self, adapter: str | None) -> str | None:
        return adapter  # each export decodes its own rows

    def prefill(self, key: str | None, prompt_ids: list[int], adapter: str | None):
        model = self.models[key]
        empty = np.zeros((1, model.heads, 0, model.head_size), dtype=model.dtype)
        n = len(prompt_ids)
        logits, present = model.run(np.asarray([prompt_ids], dtype=np.int64), np.ones((1, n), dtype=np.int64),
                                    [empty] * len(model.past), np.arange(n, dtype=np.int64)[None])
        return torch.from_numpy(logits[0].copy()), (present, [n])

    def join(self, state, other):
        cache, lengths = state
        new, new_lengths = other
        columns = max(cache[0].shape[2], new[0].shape[2])
        pad = lambda a: np.pad(a, ((0, 0), (0, 0), (0, columns - a.shape[2]), (0, 0)))  # noqa: E731
        return [np.concatenate([pad(a), pad(b)]) for a, b in zip(cache, new)], lengths + new_lengths

    def decode(self, key: str | None, state, tokens: list[int], adapters: list[str | None], lengths: list[int]):
        cache, _ = state
        model = self.models[key]
        columns = cache[0].shape[2]
        mask = (np.arange(columns + 1)[None] <= np.asarray(lengths)[:, None]).astype(np.int64)
        logits, present = model.run(np.asarray(tokens, dtype=np.int64)[:, None], mask, cache,
                                    np.asarray(lengths, dtype=np.int64)[:, None])
        return torch.from_numpy(logits.copy()), (present, [n + 1 for n in lengths])

    def keep(self, state, keep: list[int]):
        cache, lengths = state
        lengths = [lengths[i] for i in keep]
        columns = max(lengths)
        return [a[keep, :, :columns] for a in cache], lengths
