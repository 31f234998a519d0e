"""The HTTP side of `dstune serve`: OpenAI's wire format on FastAPI, with keys, limits and errors a client can act on.

Every failure a request can cause is a 4xx in OpenAI's error shape ({"error": {"message", "type", "param",
"code"}}): 400 malformed JSON or an unsupported field, 401 a missing or wrong key, 403 admin routes without the
admin key, 404 an unknown model or route, 405 a wrong method, 408 a request past its time limit, 409 an adapter in
use, 413 an oversized body, 422 a field of the wrong type or range (named in `param`), 429 a full queue (with
Retry-After). A 5xx means a fault of the server itself.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from .engine import Engine, Event, GenRequest, QueueFull, Sampling, Stream
from .metrics import ServeMetrics
from .protocol import AdapterLoad, ChatRequest, CompletionRequest, Unsupported

log = logging.getLogger("dstune.serve")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServeSettings:
    """What the server was started with (see `dstune serve --help`)."""

    base_name: str
    api_key: str | None = None
    admin_key: str | None = None
    system_prompt: str | None = None
    context_length: int = 2048
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    reasoning: bool = False  # split <think>...</think> into reasoning_content (deepseek-r1 template)
    created: int = field(default_factory=lambda: int(time.time()))


class ThinkSplitter:
    """Splits an answer that opens with <think>...</think> into (reasoning, content), also when fed in pieces."""

    def __init__(self, enabled: bool):
        self.state = "start" if enabled else "content"
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buffer = "thinking", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head) and not final:
                return "", ""
            else:
                self.state = "content"
        if self.state == "thinking":
            at = self.buffer.find(THINK_CLOSE)
            if at >= 0:
                reasoning, self.buffer = self.buffer[:at], self.buffer[at + len(THINK_CLOSE):]
                self.state = "after"
            else:
                keep = 0 if final else next((n for n in range(len(THINK_CLOSE) - 1, 0, -1)
                                             if self.buffer.endswith(THINK_CLOSE[:n])), 0)
                reasoning, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
        if self.state == "after":  # the blank lines between the reasoning and the answer belong to neither
            self.buffer = self.buffer.lstrip("\n")
            if not self.buffer:
                return reasoning, ""
            self.state = "content"
        content, self.buffer = self.buffer, ""
        return reasoning, content


class Server:
    """The engine and what the routes need around it: tokenizer, template, names, limits, metrics."""

    def __init__(self, engine: Engine, tokenizer, template, settings: ServeSettings, metrics: ServeMetrics):
        self.engine, self.tokenizer, self.template, self.settings, self.metrics = (
            engine, tokenizer, template, settings, metrics)

    def adapter_for(self, model: str) -> str | None:
        if model == self.settings.base_name:
            return None
        if model in self.engine.adapters:
            return model
        names = [self.settings.base_name, *self.engine.adapters]
        raise APIError(404, f"model {model!r} does not exist; served: {', '.join(names)}", "model", "model_not_found")

    def limits(self, prompt_ids: list[int], asked: int | None, param: str, prompt_param: str) -> int:
        """The token limit of the answer, or a 400 when the prompt or the ask does not fit the context."""
        context, cap = self.settings.context_length, self.settings.max_tokens_cap
        room = context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the context holds {context}", prompt_param,
                           "context_length_exceeded")
        if asked is None:
            return min(cap, room)
        if asked > cap:
            raise APIError(400, f"{param}={asked} is over this server's cap of {cap} (dstune serve --max-tokens-cap)",
                           param)
        if asked > room:
            raise APIError(400, f"{param}={asked}: the prompt ({len(prompt_ids)} tokens) leaves room for {room} in "
                           f"the context of {context}", param, "context_length_exceeded")
        return asked

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        """The prompt's token ids: the request's messages under the recipe's template and system prompt."""
        return self.chat_prompt_ids([{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                                     for m in body.messages])

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        messages = list(messages)
        if self.settings.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.settings.system_prompt})
        try:
            text = self.template.prompt_text(messages)
        except Exception as error:  # noqa: BLE001 - a Jinja template may refuse an order of roles
            raise APIError(400, f"the chat template refused these messages: {error}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, requests: list[GenRequest]) -> tuple[list[Stream], asyncio.Queue]:
        """Queue every choice; all or none (429 when the queue is full). Events arrive as (choice, Event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streams = []
        for index, request in enumerate(requests):
            def deliver(event: Event, index=index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            stream = Stream(deliver)
            try:
                self.engine.submit(request, stream)
            except QueueFull:
                for s in streams:
                    s.cancel()
                raise APIError(429, f"the server is at capacity ({self.engine.max_queue} requests waiting); retry "
                               "shortly", None, "queue_full", {"Retry-After": "1"}) from None
            streams.append(stream)
        return streams, queue


def _requests(server: Server, body, prompts: list[list[int]], adapter: str | None, param: str,
              prompt_param: str) -> list[GenRequest]:
    out = []
    for ids in prompts:
        limit = server.limits(ids, body.token_limit, param, prompt_param)
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            sampling = Sampling(1.0 if body.temperature is None else body.temperature,
                                1.0 if body.top_p is None else body.top_p, seed)
            out.append(GenRequest(ids, adapter, limit, sampling, body.stops))
    return out


async def _collect(request: Request, streams: list[Stream], queue: asyncio.Queue, timeout: float) -> list[Event]:
    """Every choice's end: 503 when the engine fails, 408 past the time limit; a client gone away cancels them."""
    done: dict[int, Event] = {}
    deadline = time.monotonic() + timeout
    async for index, event in _events(request, streams, queue, timeout):
        if event.kind == "error":
            raise APIError(503, event.text, None, "engine_error")
        if event.kind == "done":
            done[index] = event
    if len(done) < len(streams):
        if time.monotonic() <= deadline:  # _events stopped early: the client disconnected
            raise asyncio.CancelledError
        raise APIError(408, f"the answer took longer than this server's limit of {timeout:g} s "
                       "(dstune serve --request-timeout)", None, "timeout")
    return [done[i] for i in range(len(streams))]


def _usage(prompt_tokens: int, events: list[Event]) -> dict:
    """OpenAI's usage: the prompts' tokens once (not once per choice), and every choice's generated tokens."""
    completion = sum(e.completion_tokens for e in events)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics and admin routes."""
    settings = server.settings
    app = FastAPI(title="dstune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path
        status = 500
        try:
            if route != "/health":
                key = settings.admin_key if route.startswith("/admin") else settings.api_key
                if route.startswith("/admin") and not settings.admin_key:
                    raise APIError(403, "admin routes are off; start the server with --admin-key or DSTUNE_ADMIN_KEY")
                if key is not None and not _key_matches(request, key):
                    raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                                   "invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                raise APIError(413, f"request body over {settings.max_body_bytes} bytes (dstune serve --max-body-bytes)")
            response = await call_next(request)
            status = response.status_code
            return response
        except APIError as error:
            status = error.status
            return error.response()
        finally:
            server.metrics.request(route if route in KNOWN_ROUTES else "other", status)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        message = {404: "no such route", 405: "method not allowed on this route"}.get(error.status_code, error.detail)
        return APIError(error.status_code, str(message)).response()

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception):
        log.exception("internal error")
        return APIError(500, f"internal error: {type(error).__name__}").response()

    async def parse(request: Request, model):
        body = await _read_body(request, settings.max_body_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the body is not valid JSON: {error}") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise _validation_error(error) from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        names = [settings.base_name, *server.engine.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": settings.created, "owned_by":
                "dstune", **({"parent": settings.base_name} if n != settings.base_name else {})} for n in names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        adapter = server.adapter_for(body.model)
        ids = server.chat_prompt(body)
        streams, queue = server.submit(_requests(server, body, [ids], adapter, "max_completion_tokens"
                                                 if body.max_completion_tokens is not None else "max_tokens", "messages"))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": body.model}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(server, request, streams, queue, head, len(ids) if usage else None),
                                     media_type="text/event-stream")
        events = await _collect(request, streams, queue, settings.request_timeout_s)
        choices = []
        for i, event in enumerate(events):
            reasoning, content = ThinkSplitter(settings.reasoning).feed(event.text, final=True)
            message = {"role": "assistant", "content": content}
            if settings.reasoning:
                message["reasoning_content"] = reasoning or None
            choices.append({"index": i, "message": message, "finish_reason": event.finish_reason, "logprobs": None})
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(ids), events)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        adapter = server.adapter_for(body.model)
        prompts = [server.tokenizer(p)["input_ids"] for p in body.prompts]
        streams, queue = server.submit(_requests(server, body, prompts, adapter, "max_tokens", "prompt"))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_stream(server, request, streams, queue, head,
                                                        sum(len(p) for p in prompts) if usage else None),
                                     media_type="text/event-stream")
        events = await _collect(request, streams, queue, settings.request_timeout_s)
        choices = [{"index": i, "text": e.text, "finish_reason": e.finish_reason, "logprobs": None}
                   for i, e in enumerate(events)]
        return {**head, "object": "text_completion", "choices": choices,
                "usage": _usage(sum(len(p) for p in prompts), events)}

    @app.post("/admin/adapters")
    async def load_adapter(request: Request):
        body = await parse(request, AdapterLoad)
        if body.name == settings.base_name or body.name in server.engine.adapters:
            raise APIError(409, f"a model named {body.name!r} is already served", "name", "name_taken")
        try:
            await asyncio.wrap_future(server.engine.call(lambda: server.engine.load_adapter(body.name, body.path)))
        except InputError as error:
            raise APIError(400, str(error), "path") from None
        return {"object": "model", "id": body.name, "loaded": True}

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str):
        if name not in server.engine.adapters:
            raise APIError(404, f"adapter {name!r} is not loaded", "name", "model_not_found")
        try:
            await asyncio.wrap_future(server.engine.call(lambda: server.engine.unload_adapter(name)))
        except InputError as error:
            raise APIError(409, str(error), "name", "adapter_in_use") from None
        return {"object": "model", "id": name, "deleted": True}

    return app


KNOWN_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/admin/adapters"}


def _key_matches(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def _read_body(request: Request, cap: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `cap` bytes (a chunked body has no Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise APIError(413, f"request body over {cap} bytes (dstune serve --max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


# pydantic names the union member that failed in an error's location ("stop.str", "content.list[TextPart]").
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\]|TextPart|Message|StreamOptions)$")


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Unsupported):
        return APIError(400, str(cause), cause.param, "unsupported_parameter")
    param = ".".join(str(p) for p in first["loc"] if not _UNION_TAG.match(str(p))) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "required"
    named = re.match(r"^([\w.]+): ", message)
    if param is None and named:  # a check across fields names the field it refuses
        param, message = named.group(1), message[named.end():]
    return APIError(422, f"{param}: {message}" if param else message, param, "invalid_value")


async def _events(request: Request, streams: list[Stream], queue: asyncio.Queue, timeout: float):
    """(choice, Event) pairs until every choice ends; cancels them all when the client leaves or time runs out."""
    ended, deadline = 0, time.monotonic() + timeout
    try:
        while ended < len(streams):
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected() or time.monotonic() > deadline:
                    return
                continue
            if event.kind in ("done", "error"):
                ended += 1
            yield index, event
    finally:
        for stream in streams:
            stream.cancel()


async def _chat_stream(server: Server, request: Request, streams, queue, head: dict, usage: int | None):
    """Chunks of every choice, then the usage chunk when asked (`usage`: the prompt's tokens, or None)."""
    head = {**head, "object": "chat.completion.chunk"}
    splitters = [ThinkSplitter(server.settings.reasoning) for _ in streams]
    for i in range(len(streams)):
        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
    ends = []
    async for index, event in _events(request, streams, queue, server.settings.request_timeout_s):
        if event.kind == "error":
            yield _sse({"error": {"message": event.text, "type": "server_error", "param": None, "code": "engine_error"}})
            ends.append(event)
            continue
        reasoning, content = splitters[index].feed(event.text if event.kind == "delta" else "",
                                                   final=event.kind == "done")
        delta = {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {})}
        if delta:
            yield _sse({**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        if event.kind == "done":
            ends.append(event)
            yield _sse({**head, "choices": [{"index": index, "delta": {}, "finish_reason": event.finish_reason}]})
    if usage is not None:
        yield _sse({**head, "choices": [], "usage": _usage(usage, ends)})
    yield _sse("[DONE]")


async def _completion_stream(server: Server, request: Request, streams, queue, head: dict, usage: int | None):
    """Text chunks of every choice, then the usage chunk when asked (`usage`: the prompts' tokens, or None)."""
    head = {**head, "object": "text_completion"}
    ends = []
    async for index, event in _events(request, streams, queue, server.settings.request_timeout_s):
        if event.kind == "error":
            yield _sse({"error": {"message": event.text, "type": "server_error", "param": None, "code": "engine_error"}})
        elif event.kind == "delta":
            yield _sse({**head, "choices": [{"index": index, "text": event.text, "finish_reason": None,
                                             "logprobs": None}]})
        else:
            ends.append(event)
            yield _sse({**head, "choices": [{"index": index, "text": "", "finish_reason": event.finish_reason,
                                             "logprobs": None}]})
    if usage is not None:
        yield _sse({**head, "choices": [], "usage": _usage(usage, ends)})
    yield _sse("[DONE]")
