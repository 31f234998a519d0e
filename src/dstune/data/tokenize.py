"""Turn conversations into token ids with labels on assistant tokens only, and audit the mask."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .templates import ChatTemplate

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """Token ids and labels (IGNORE_INDEX where no loss is taken) of one conversation."""

    sample_id: str
    input_ids: list[int]
    labels: list[int]
    # Raw text for continued pre-training: every token is supervised, and it ends with EOS, not end-of-turn.
    raw_text: bool = False


def encode_text(tokenizer, text: str, sample_id: str, max_length: int) -> EncodedSample:
    """Continued pre-training: the text and EOS, every token supervised."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return EncodedSample(sample_id, ids, list(ids), raw_text=True)


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[dict], sample_id: str,
                        max_length: int) -> EncodedSample:
    """Tokenize the rendered conversation once and label the tokens that fall inside assistant segments."""
    segments = template.render(messages, False)
    text = "".join(t for t, _ in segments)
    spans, start = [], 0
    for piece, trainable in segments:
        if trainable:
            spans.append((start, start + len(piece)))
        start += len(piece)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for i, (begin, _end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and begin >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= begin < spans[span_index][1]:
            labels[i] = ids[i]
    return EncodedSample(sample_id, ids[:max_length], labels[:max_length])


def encode_record(tokenizer, template: ChatTemplate, record: dict, max_length: int) -> EncodedSample:
    """A dataset record as training encodes it: raw `text` (encode_text), else its `messages` (encode_conversation)."""
    if "text" in record:
        return encode_text(tokenizer, record["text"], str(record["id"]), max_length)
    return encode_conversation(tokenizer, template, record["messages"], str(record["id"]), max_length)


def audit_labels(samples: list[EncodedSample], tokenizer, template: ChatTemplate, max_length: int) -> None:
    """Fail loudly, naming the sample, if it has no supervised token or its end-of-turn token is not supervised."""
    eot_ids = tokenizer.encode(template.end_of_turn, add_special_tokens=False)
    if len(eot_ids) != 1:
        raise InputError(f"model.template: end-of-turn {template.end_of_turn!r} is not a single token for this tokenizer")
    eot = eot_ids[0]
    for sample in samples:
        supervised = [t for t in sample.labels if t != IGNORE_INDEX]
        if not supervised:
            raise InputError(
                f"sample {sample.sample_id}: no supervised token after the label mask "
                f"(is the assistant turn cut by data.max_length={max_length}?)"
            )
        if not sample.raw_text and supervised[-1] != eot and eot not in supervised[-2:]:
            raise InputError(
                f"sample {sample.sample_id}: its end-of-turn token {template.end_of_turn!r} is not supervised "
                f"(cut by data.max_length={max_length}, or the template does not close assistant turns)"
            )
