"""Domain data: record forms, chat templates, the label mask and the dataset stage."""

from .build import build_dataset, load_split
from .formats import read_samples, to_messages
from .sources import DATA_SOURCES, register_source
from .templates import TEMPLATES, ChatTemplate, get_template, register_template
from .tokenize import IGNORE_INDEX, EncodedSample, audit_labels, encode_conversation

__all__ = [
    "DATA_SOURCES", "IGNORE_INDEX", "TEMPLATES", "ChatTemplate", "EncodedSample", "audit_labels",
    "build_dataset", "encode_conversation", "get_template", "load_split", "read_samples", "register_source",
    "register_template", "to_messages",
]
