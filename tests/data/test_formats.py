import json

import pytest

from dstune.data.formats import read_samples, to_messages
from dstune.errors import InputError

EXPECTED = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_three_record_forms_normalise_to_messages():
    assert to_messages({"messages": EXPECTED}) == EXPECTED
    assert to_messages({"instruction": "q", "output": "a"}) == EXPECTED
    assert to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) == EXPECTED


def test_alpaca_input_system_and_history():
    messages = to_messages({"system": "s", "instruction": "do", "input": "this", "output": "ok",
                            "history": [["hi", "hello"]]})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "do\n\nthis"


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be from the assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message must come first"),
    ({"instruction": "q"}, "missing field 'output'"),
    ({"text": "raw"}, "unknown record form"),
])
def test_bad_records_say_why(record, reason):
    with pytest.raises(ValueError, match=reason):
        to_messages(record)


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n\n{not json\n")
    with pytest.raises(InputError, match=rf"{path}:3: not valid JSON"):
        list(read_samples(path))


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"instruction": "q", "output": "a"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(InputError, match=rf"{path}:2: not valid UTF-8"):
        list(read_samples(path))


def test_ids_default_to_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" +
                    json.dumps({"id": "x7", "instruction": "q", "output": "a"}) + "\n")
    ids = [sample["id"] for sample in read_samples(path)]
    assert ids == [f"{path}:1", "x7"]
