"""The OpenAI request bodies that `dstune serve` accepts, validated strictly: a field it does not honour is refused.

OpenAI's own defaults apply where a field is left out (temperature 1, top_p 1, n 1). Fields that dstune does not
implement are refused with a 400 naming them, unless they are set to the value that changes nothing (a
presence_penalty of 0, logprobs false): a client that sends its defaults still works.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

# Set to these values, an unsupported field changes nothing and is accepted.
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,), "logit_bias": ({},),
           "parallel_tool_calls": (True, False), "store": (False,), "echo": (False,), "best_of": (1,),
           "tools": ([],), "response_format": ({"type": "text"},)}
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "tools",
               "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format", "store",
               "metadata", "modalities", "audio", "prediction", "reasoning_effort", "service_tier", "web_search_options",
               "echo", "best_of", "suffix", "verbosity", "prompt_cache_key", "safety_identifier")

class Unsupported(ValueError):
    """A field the server does not implement, set to a value that would change the answer."""

    def __init__(self, name: str):
        super().__init__(f"{name} is not supported by dstune serve; leave it out")
        self.param = name


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: StrictStr | list[Annotated[StrictStr, Field(min_length=1)]] | None = None
    seed: StrictInt | None = None
    n: StrictInt = Field(default=1, ge=1, le=8)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # a caller's id: it changes no answer

    @model_validator(mode="after")
    def _extras(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED:
                if value is None or value in NEUTRAL.get(name, ()):
                    continue
                raise Unsupported(name)
            raise ValueError(f"{name}: unknown field")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 sequences")
        if isinstance(self.stop, str) and not self.stop:
            raise ValueError("stop: an empty string stops nothing")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # newer clients send it; there is nothing to obfuscate


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _turns(self):
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (continuing an assistant turn is not "
                             "supported)")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens; give one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] = Field(min_length=1)

    @model_validator(mode="after")
    def _prompts(self):
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if any(not p for p in prompts):
            raise ValueError("prompt: empty")
        if len(prompts) * self.n > 32:
            raise ValueError("prompt: at most 32 prompts × n per request")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    path: StrictStr = Field(min_length=1)


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
