"""Exports: the merged HF directory today; ONNX and GGUF join it as registered formats."""

from .merge import merge_adapter

__all__ = ["merge_adapter"]
