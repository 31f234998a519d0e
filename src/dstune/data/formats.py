"""Record forms (OpenAI `messages`, Alpaca, ShareGPT) normalised to a list of chat messages, or raw text."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import InputError

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that cannot become a conversation, with a reason code the data report counts by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _from_messages(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise RecordError("malformed_record", "'messages' must be a list")
    out = []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RecordError("missing_field", "each message needs 'role' and 'content'")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def _from_alpaca(record: dict) -> list[dict]:
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    out = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, assistant in record.get("history") or []:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def _from_sharegpt(record: dict) -> list[dict]:
    out = []
    for turn in record["conversations"]:
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RecordError("unknown_role", f"unknown ShareGPT speaker {turn.get('from')!r}")
        out.append({"role": role, "content": turn.get("value")})
    return out


RECORD_FORMS = {"messages": _from_messages, "instruction": _from_alpaca, "conversations": _from_sharegpt}


def validate_messages(messages: list[dict]) -> None:
    """Raise ValueError unless roles are known, contents are non-empty strings and an assistant turn ends it."""
    if not messages:
        raise RecordError("empty_field", "no messages")
    for i, turn in enumerate(messages):
        if turn["role"] not in ROLES:
            raise RecordError("unknown_role", f"message {i}: unknown role {turn['role']!r}")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            raise RecordError("empty_field", f"message {i}: empty or non-text content")
        if turn["role"] == "system" and i != 0:
            raise RecordError("role_order", f"message {i}: a system message must come first")
        if i and turn["role"] == messages[i - 1]["role"]:
            raise RecordError("role_order", f"message {i}: two {turn['role']} turns in a row")
    if messages[-1]["role"] != "assistant":
        raise RecordError("role_order", "the last message must be from the assistant")


def rename_fields(record: dict, fields: dict[str, str]) -> dict:
    """The record with its own field names mapped to dstune's (`data.fields`: dstune name -> file's name)."""
    if not fields or not isinstance(record, dict):
        return record
    record = dict(record)
    for ours, theirs in fields.items():
        if theirs in record:
            record[ours] = record.pop(theirs)
    return record


def to_messages(record: dict) -> list[dict]:
    """Normalise one record of any supported form to chat messages (ValueError if it fits none)."""
    if not isinstance(record, dict):
        raise RecordError("malformed_record", "a record must be a JSON object")
    for key, convert in RECORD_FORMS.items():
        if key in record:
            try:
                messages = convert(record)
            except KeyError as exc:
                raise RecordError("missing_field", f"missing field {exc.args[0]!r}") from None
            except (TypeError, AttributeError):
                raise RecordError("malformed_record", f"field {key!r} has the wrong shape") from None
            validate_messages(messages)
            return messages
    raise RecordError("unknown_form", f"unknown record form: expected one of the fields {sorted(RECORD_FORMS)} "
                                      "or 'text' (see data.fields to map other names)")


def to_sample(record: dict, location: str, fields: dict[str, str] | None = None) -> dict:
    """A dataset sample from a raw record: id (default: its location), then messages or, for continued
    pre-training, raw `text`; and meta (with task and source)."""
    record = rename_fields(record, fields or {})
    if isinstance(record, dict) and "text" in record and not any(k in record for k in RECORD_FORMS):
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise RecordError("empty_field", "empty or non-text 'text'")
        body = {"text": text}
    else:
        body = {"messages": to_messages(record)}
    meta = dict(record["meta"]) if isinstance(record.get("meta"), dict) else {}
    if "task" in record:  # multi-task data: the task name picks e.g. the task prefix
        meta["task"] = str(record["task"])
    meta["source"] = location
    return {"id": str(record.get("id", location)), **body, "meta": meta}


def read_samples(path: str | Path, fields: dict[str, str] | None = None) -> Iterator[dict]:
    """Every sample of a file or folder, strictly: a bad record raises an error naming file:line."""
    from .readers import read_records

    for raw in read_records(path):
        if raw.reason:
            raise InputError(f"{raw.location}: {raw.detail}")
        try:
            yield to_sample(raw.record, raw.location, fields)
        except RecordError as exc:
            raise InputError(f"{raw.location}: {exc}") from None
