"""Chat templates as segments of (text, trainable), so the loss mask follows the template exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError

Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class ChatTemplate:
    """Renders messages into text segments; assistant segments are the training target."""

    name: str
    render: Callable[[list[dict], bool], Segments]
    # The text that closes an assistant turn; it must be supervised so the model learns to stop.
    end_of_turn: str
    # The whole conversation as one text, when that is cheaper than joining the segments (Jinja templates).
    full_text: Callable[[list[dict]], str] | None = None

    def conversation_text(self, messages: list[dict]) -> str:
        """The rendered conversation (what training tokenizes)."""
        if self.full_text is not None:
            return self.full_text(messages)
        return "".join(text for text, _ in self.render(messages, False))

    def prompt_text(self, messages: list[dict]) -> str:
        """The prompt for generating the next assistant turn."""
        return "".join(text for text, _ in self.render(messages, True))


def _chatml(messages: list[dict], add_generation_prompt: bool) -> Segments:
    segments: Segments = []
    for turn in messages:
        head = f"<|im_start|>{turn['role']}\n"
        if turn["role"] == "assistant":
            segments += [(head, False), (f"{turn['content']}<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"{head}{turn['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _deepseek_r1(messages: list[dict], add_generation_prompt: bool) -> Segments:
    # Unlike the released template, which strips <think> blocks from past turns, the training target keeps them:
    # the reasoning is what the model has to learn.
    segments: Segments = [("<｜begin▁of▁sentence｜>", False)]
    for turn in messages:
        if turn["role"] == "system":
            segments.append((turn["content"], False))
        elif turn["role"] == "user":
            segments.append((f"<｜User｜>{turn['content']}", False))
        else:
            segments += [("<｜Assistant｜>", False), (f"{turn['content']}<｜end▁of▁sentence｜>", True)]
    if add_generation_prompt:
        segments.append(("<｜Assistant｜>", False))
    return segments


def _llama3(messages: list[dict], add_generation_prompt: bool) -> Segments:
    segments: Segments = [("<|begin_of_text|>", False)]
    for turn in messages:
        head = f"<|start_header_id|>{turn['role']}<|end_header_id|>\n\n"
        if turn["role"] == "assistant":
            segments += [(head, False), (f"{turn['content']}<|eot_id|>", True)]
        else:
            segments.append((f"{head}{turn['content']}<|eot_id|>", False))
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", _chatml, "<|im_end|>"),
    "qwen2": ChatTemplate("qwen2", _chatml, "<|im_end|>"),
    "deepseek-r1": ChatTemplate("deepseek-r1", _deepseek_r1, "<｜end▁of▁sentence｜>"),
    # DeepSeek-V2/V3 chat: the same turns as R1, whose targets simply carry no <think> block.
    "deepseek-v3": ChatTemplate("deepseek-v3", _deepseek_r1, "<｜end▁of▁sentence｜>"),
    "llama3": ChatTemplate("llama3", _llama3, "<|eot_id|>"),
}


def register_template(template: ChatTemplate) -> None:
    """Add a chat template to the registry (recipes pick it with `model.template`)."""
    TEMPLATES[template.name] = template


def tokenizer_template(tokenizer) -> ChatTemplate:
    """The tokenizer's own Jinja template, cut into segments by rendering growing prefixes."""
    if not tokenizer.chat_template:
        raise InputError("model.template: the tokenizer has no chat template; name one of " + ", ".join(TEMPLATES))

    def apply(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(messages: list[dict], add_generation_prompt: bool) -> Segments:
        segments: Segments = []
        done = ""
        for i, turn in enumerate(messages):
            if turn["role"] == "assistant":
                before = apply(messages[:i], True)
                if not before.startswith(done):
                    raise InputError("model.template: the tokenizer's template is not prefix-stable; name a registry template")
                segments.append((before[len(done):], False))
                done = before
            text = apply(messages[: i + 1], False)
            if not text.startswith(done):
                raise InputError("model.template: the tokenizer's template is not prefix-stable; name a registry template")
            segments.append((text[len(done):], turn["role"] == "assistant"))
            done = text
        if add_generation_prompt:
            full = apply(messages, True)
            segments.append((full[len(done):], False))
        return [(text, trainable) for text, trainable in segments if text]

    return ChatTemplate("auto", render, tokenizer.eos_token, lambda messages: apply(messages, False))


def get_template(name: str, tokenizer) -> ChatTemplate:
    """Resolve `model.template`: `auto` means the tokenizer's own template."""
    if name == "auto":
        return tokenizer_template(tokenizer)
    if name not in TEMPLATES:
        raise InputError(f"model.template: unknown template {name!r}; choose auto or one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
