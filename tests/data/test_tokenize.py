import pytest

from dstune.data.templates import TEMPLATES, get_template
from dstune.data.tokenize import IGNORE_INDEX, audit_labels, encode_conversation
from dstune.errors import InputError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Code for asthma?"},
    {"role": "assistant", "content": "J45"},
    {"role": "user", "content": "And for COPD?"},
    {"role": "assistant", "content": "J44"},
]


def supervised_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["auto", "chatml"])
def test_only_assistant_turns_are_supervised(tokenizer, name):
    template = get_template(name, tokenizer)
    sample = encode_conversation(tokenizer, template, CONVERSATION, "s1", 256)
    text = supervised_text(tokenizer, sample)
    assert text.replace("\n", "") == "J45<|im_end|>J44<|im_end|>"
    assert "asthma" not in text and "Be brief" not in text
    # The unmasked ids are the ids of the whole rendering: masking never changes the input.
    full = tokenizer(template.prompt_text(CONVERSATION[:-1]) + "J44<|im_end|>", add_special_tokens=False)
    assert sample.input_ids[: len(full["input_ids"])] == full["input_ids"]


def test_auto_template_matches_tokenizer_rendering(tokenizer):
    template = get_template("auto", tokenizer)
    rendered = "".join(text for text, _ in template.render(CONVERSATION, False))
    assert rendered == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert template.prompt_text(CONVERSATION[:3]) == tokenizer.apply_chat_template(
        CONVERSATION[:3], tokenize=False, add_generation_prompt=True)


def test_deepseek_r1_keeps_think_block_in_target():
    template = TEMPLATES["deepseek-r1"]
    segments = template.render([{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "<think>\nreason\n</think>\n\nA"}], False)
    target = "".join(text for text, trainable in segments if trainable)
    assert target == "<think>\nreason\n</think>\n\nA<｜end▁of▁sentence｜>"
    prompt = "".join(text for text, trainable in segments if not trainable)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜>"


def test_audit_fails_on_truncated_end_of_turn(tokenizer):
    template = get_template("auto", tokenizer)
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 50}]
    sample = encode_conversation(tokenizer, template, long_answer, "long-7", 48)
    with pytest.raises(InputError, match=r"sample long-7: its end-of-turn token '<\|im_end\|>' is not supervised"):
        audit_labels([sample], tokenizer, template, 48)


def test_audit_fails_on_no_supervised_token(tokenizer):
    template = get_template("auto", tokenizer)
    sample = encode_conversation(tokenizer, template, CONVERSATION, "cut-3", 8)
    with pytest.raises(InputError, match="sample cut-3: no supervised token"):
        audit_labels([sample], tokenizer, template, 8)


def test_audit_passes_good_samples(tokenizer):
    template = get_template("auto", tokenizer)
    samples = [encode_conversation(tokenizer, template, CONVERSATION, "ok", 256)]
    audit_labels(samples, tokenizer, template, 256)
