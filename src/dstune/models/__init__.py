"""Base models: embedded names, GGUF files and HF directories, loaded safely."""

from .loading import EMBEDDED_MODELS, load_model, load_tokenizer, resolve_model_path

__all__ = ["EMBEDDED_MODELS", "load_model", "load_tokenizer", "resolve_model_path"]
