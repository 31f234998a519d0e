"""Domain data: record forms, chat templates, the label mask and the dataset stage.

Names load on first use: `dstune.data.tokenize` imports without the dataset stage's dependencies.
"""

import importlib

_EXPORTS = {
    "build_dataset": ".build", "load_split": ".build", "read_samples": ".formats", "to_messages": ".formats",
    "DATA_SOURCES": ".sources", "register_source": ".sources", "TEMPLATES": ".templates",
    "ChatTemplate": ".templates", "get_template": ".templates", "register_template": ".templates",
    "IGNORE_INDEX": ".tokenize", "EncodedSample": ".tokenize", "audit_labels": ".tokenize",
    "encode_conversation": ".tokenize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
