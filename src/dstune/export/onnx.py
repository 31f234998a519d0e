"""ONNX export through onnxruntime-genai's model builder, and a wrapper dstune's generation loop can drive.

The builder writes model.onnx (+ model.onnx.data): a decoder with GroupQueryAttention and a KV cache, for the CPU
execution provider; genai_config.json; and the tokenizer files. Llama and Qwen2 architectures only (the ones tested).
- fp32: the weights as they are; greedy decoding matches PyTorch's token for token.
- int8, int4: the builder's own precisions (int8 is `precision="int8"` in 0.18, not an extra option): weight-only
  MatMulNBits, block-wise (one scale per 32 or 16 weights of a column), activations quantized to int8 inside the
  kernel (accuracy_level 4, the builder's CPU default).
Measured on SmolLM2-135M-Instruct (6 prompts, 307 teacher-forced tokens: the share of positions whose argmax
equals the fp32 export's; size of model.onnx.data against fp32's 540 MB; greedy tokens/s on 2 cores, fp32 15.6):
- int8, block 32: 97.7%, 0.49x (the tied embedding stays fp32: int8 Gather is not supported), 36 tok/s.
  accuracy_level 1 (fp32 activations) gained 1.7 points but ran at 2 tok/s.
- int4, block 16, the llama.cpp "mixed" layers (first and last eighth, every third qkv/v/down) in int8 and the
  embedding in int4: 82.4%, 0.21x, 43 tok/s. Plain int4 block 32: 71.3%; block 16: 79.2%. k_quant rounding with
  those mixed layers reached 86.0% at 0.25x, but took 8x longer to build and leaves untied embeddings fp32.
  An int8 LM head added 1 to 5 points, but the builder's tied-embedding graph breaks with it (a missing
  initializer), so the LM head stays int4.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from ..errors import DstuneError, InputError
from .formats import ExportFormat, register_format

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
QUANTS = ("fp32", "int8", "int4")
# The builder's --extra_options per precision; numbers in the module docstring.
BUILDER_OPTIONS = {
    "fp32": {},
    "int8": {"block_size": "32", "accuracy_level": "4"},
    "int4": {"block_size": "16", "accuracy_level": "4", "op_types_to_quantize": "MatMul/Gather",
             "matmul_mixed_precision": "mixed_layers:int8"},
}


def _check_architecture(merged_dir: Path) -> None:
    config = json.loads((merged_dir / "config.json").read_text())
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if architecture not in ARCHITECTURES:
        raise InputError(f"{merged_dir}: ONNX export supports {' and '.join(ARCHITECTURES)}, not {architecture!r}")


def export_onnx(merged_dir: Path, out_dir: Path, quant: str) -> Path:
    """Write an onnxruntime-genai model folder (model.onnx, genai_config.json, tokenizer) of a merged HF directory."""
    import huggingface_hub
    import onnxruntime_genai

    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    _check_architecture(merged_dir)
    try:
        # Importing the builder also puts its own folder on sys.path (it imports `builders`, `quantization`).
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:  # onnxruntime-genai does not declare the builder's dependencies (onnx-ir)
        raise DstuneError(f"ONNX export needs {exc.name!r}, which onnxruntime-genai's model builder imports "
                          f"(pip install {(exc.name or 'onnx-ir').replace('_', '-')})") from exc
    options = {**BUILDER_OPTIONS[quant], "hf_token": "false", "hf_remote": "false"}
    out_dir.mkdir(parents=True, exist_ok=True)
    # Offline mode turns any hub request the builder might make into an error instead of a download.
    offline = mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with tempfile.TemporaryDirectory() as cache_dir, offline, (out_dir / "builder.log").open("w") as log, \
            contextlib.redirect_stdout(log):
        try:
            extra = parse_extra_options(None, str(merged_dir), str(out_dir), quant, "cpu", cache_dir,
                                        [f"{k}={v}" for k, v in options.items()])
            create_model(None, str(merged_dir), str(out_dir), quant, "cpu", cache_dir, **extra)
        except Exception as exc:  # the builder raises bare Exceptions, ValueErrors and ORT errors alike
            raise DstuneError(f"ONNX export of {merged_dir} failed in onnxruntime-genai's builder: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    (out_dir / "dstune_onnx.json").write_text(json.dumps({
        "format": "onnx", "quant": quant, "source": str(merged_dir), "execution_provider": "cpu",
        "builder_options": BUILDER_OPTIONS[quant], "onnxruntime_genai": onnxruntime_genai.__version__,
    }, indent=2))
    return out_dir


def files_fingerprint(folder: Path) -> str:
    """A hash of the ONNX graph, its genai config and a strided sample of each weight file."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted([*folder.glob("*.onnx*"), folder / "genai_config.json"]):
        size = path.stat().st_size
        digest.update(f"{path.name}{size}".encode())
        with path.open("rb") as handle:
            if size <= 1 << 24:
                digest.update(handle.read())
                continue
            # Reading every byte of a multi-GB file would cost more than most generations it saves.
            for offset in range(0, size, size // 1024):
                handle.seek(offset)
                digest.update(handle.read(4096))
    return digest.hexdigest()


class GenaiModel:
    """An onnxruntime-genai model with the part of a transformers model that dstune's generation loop uses."""

    def __init__(self, path: Path):
        import onnxruntime_genai as og

        self.path = Path(path)
        self.config = json.loads((self.path / "genai_config.json").read_text())
        settings = og.Config(str(self.path))
        # No built-in EOS: generate() stops on the caller's eos_token_id list, as transformers does.
        settings.overlay(json.dumps({"model": {"eos_token_id": []}}))
        self.model = og.Model(settings)
        self.context_length = self.config["model"]["context_length"]
        self.device = torch.device("cpu")
        self.training = False
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> GenaiModel:
        """Record the mode (the generation loop restores it); an ONNX model has no training behaviour."""
        self.training = mode
        return self

    def eval(self) -> GenaiModel:
        """Inference mode."""
        return self.train(False)

    def fingerprint(self) -> str:
        """The generation cache's model key: a hash of the ONNX files."""
        if self._fingerprint is None:
            self._fingerprint = files_fingerprint(self.path)
        return self._fingerprint

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: set[int], min_new_tokens: int = 0) -> list[int]:
        """Greedy continuation of one unpadded prompt, ending with the first stop token if one comes."""
        import onnxruntime_genai as og

        max_length = min(len(prompt) + max_new_tokens, self.context_length)
        params = og.GeneratorParams(self.model)
        # min_length keeps the model's own EOS away until then (benchmarks time a fixed number of tokens).
        params.set_search_options(do_sample=False, max_length=max_length, min_length=len(prompt) + min_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        new: list[int] = []
        while len(prompt) + len(new) < max_length and not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            if new[-1] in stops:
                break
        return new

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, min_new_tokens: int = 0) -> torch.Tensor:
        """transformers-style greedy `generate` on a left-padded batch: [batch, prompt + new] token ids."""
        if do_sample:
            raise ValueError("GenaiModel.generate decodes greedily only (do_sample=False)")
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else min(stops, default=0)
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        # onnxruntime-genai's batched generator mishandles left padding (tests/export/test_onnx.py), so each row
        # runs alone, its padding stripped.
        rows = [self.greedy(ids[keep].tolist(), max_new_tokens, stops, min_new_tokens)
                for ids, keep in zip(input_ids, mask)]
        out = torch.full((len(rows), input_ids.shape[1] + max(map(len, rows), default=0)), pad, dtype=torch.long)
        out[:, :input_ids.shape[1]] = input_ids
        for i, row in enumerate(rows):
            out[i, input_ids.shape[1]:input_ids.shape[1] + len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def load_onnx(artifact: Path, merged_dir: Path):
    """The exported model behind a GenaiModel, and the merged directory's tokenizer."""
    from ..models.loading import load_tokenizer

    return GenaiModel(artifact), load_tokenizer(Path(merged_dir))


register_format(ExportFormat(
    name="onnx", quants=QUANTS, export=export_onnx, load=load_onnx,
    description="ONNX Runtime GenAI (model builder): KV-cache decoder for CPU, fp32 or block-wise int8/int4",
))
