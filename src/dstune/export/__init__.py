"""Exports: the merged HF directory (merge.py), and deployable formats from the EXPORTS registry (formats.py):
ONNX with a KV cache (onnx.py), GGUF for llama.cpp (gguf.py) and torchao int8 (torchao.py), each scored against the
fp32 model with an accuracy gate (artifacts.py)."""

from .merge import merge_adapter

__all__ = ["merge_adapter"]
