"""Malformed and hostile requests get the right 4xx, never a 5xx; overflow gets 429; disconnects cancel work."""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from serving import start

KEY, ADMIN = "sk-test", "admin-test"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def raw(served, method: str, path: str, body=None, headers=None, timeout=60):
    """One request over a fresh connection: (status, headers, parsed JSON or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=AUTH if headers is None else headers)
    response = connection.getresponse()
    text = response.read().decode("utf-8", "replace")
    connection.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return response.status, dict(response.getheaders()), parsed


def chat(**changes):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


DROP = object()
U = {"role": "user", "content": "hi"}

CHAT_CASES = [
    # (changes, status, param that the error names)
    ({"model": DROP}, 422, "model"), ({"model": 123}, 422, "model"), ({"model": ""}, 422, "model"),
    ({"model": None}, 422, "model"), ({"model": ["alpha"]}, 422, "model"), ({"model": "nope"}, 404, "model"),
    ({"model": "../../etc/passwd"}, 404, "model"),
    ({"messages": DROP}, 422, "messages"), ({"messages": []}, 422, "messages"), ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{}]}, 422, "messages.0.role"), ({"messages": [{"role": "user"}]}, 422, "messages.0.content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, 422, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 422, "messages"),
    ({"messages": [U, {"role": "assistant", "content": "x"}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422,
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, 422, "messages.0.extra"),
    ({"messages": [None]}, 422, "messages.0"), ({"messages": [[U]]}, 422, "messages.0"),
    ({"messages": [{"role": "user", "content": "word " * 4000}]}, 400, "messages"),
    ({"temperature": -1}, 422, "temperature"), ({"temperature": 3}, 422, "temperature"),
    ({"temperature": "hot"}, 422, "temperature"), ({"temperature": True}, 422, "temperature"),
    ({"temperature": [1]}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"), ({"top_p": 1.5}, 422, "top_p"), ({"top_p": "x"}, 422, "top_p"),
    ({"max_tokens": 0}, 422, "max_tokens"), ({"max_tokens": -5}, 422, "max_tokens"),
    ({"max_tokens": 10**12}, 400, "max_tokens"), ({"max_tokens": 2000}, 400, "max_tokens"),
    ({"max_tokens": "10"}, 422, "max_tokens"), ({"max_tokens": 1.5}, 422, "max_tokens"),
    ({"max_tokens": True}, 422, "max_tokens"), ({"max_tokens": 500}, 400, "max_tokens"),
    ({"max_completion_tokens": 0}, 422, "max_completion_tokens"),
    ({"max_completion_tokens": 2}, 422, "max_completion_tokens"), ({"max_completion_tokens": 10**9, "max_tokens": DROP}, 400,
                                                "max_completion_tokens"),
    ({"stop": 5}, 422, "stop"), ({"stop": [""]}, 422, "stop"), ({"stop": ["a"] * 5}, 422, "stop"),
    ({"stop": ""}, 422, "stop"), ({"stop": [1]}, 422, "stop"), ({"stop": {"a": 1}}, 422, "stop"),
    ({"seed": "x"}, 422, "seed"), ({"seed": 1.5}, 422, "seed"),
    ({"n": 0}, 422, "n"), ({"n": 9}, 422, "n"), ({"n": "2"}, 422, "n"), ({"n": 10**6}, 422, "n"),
    ({"stream": "yes"}, 422, "stream"), ({"stream": 1}, 422, "stream"),
    ({"stream_options": {"include_usage": True}}, 422, "stream_options"),
    ({"stream": True, "stream_options": {"bad": 1}}, 422, "stream_options.bad"),
    ({"logprobs": True}, 400, "logprobs"), ({"top_logprobs": 3}, 400, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"tool_choice": "auto"}, 400, "tool_choice"), ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"), ({"frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias"), ({"functions": [{"name": "f"}]}, 400, "functions"),
    ({"foo": 1}, 422, "foo"), ({"__proto__": {}}, 422, "__proto__"), ({"user": 5}, 422, "user"),
]

COMPLETION_CASES = [
    ({"prompt": DROP}, 422, "prompt"), ({"prompt": ""}, 422, "prompt"), ({"prompt": []}, 422, "prompt"),
    ({"prompt": [""]}, 422, "prompt"), ({"prompt": 5}, 422, "prompt"), ({"prompt": [1, 2, 3]}, 422, "prompt"),
    ({"prompt": ["a"] * 40}, 422, "prompt"), ({"suffix": "x"}, 400, "suffix"), ({"echo": True}, 400, "echo"),
    ({"best_of": 2}, 400, "best_of"), ({"model": "nope"}, 404, "model"), ({"max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "word " * 4000}, 400, "prompt"), ({"messages": [U]}, 422, "messages"), ({"logprobs": 2}, 400, "logprobs"),
]

ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/metrics"),
          ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/alpha"), ("GET", "/nope"), ("GET", "/v1")]
BAD_AUTH = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"},
            {"Authorization": f"bearer{KEY}"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}]


def cases():
    """(method, path, body, headers, expected status, expected param or None): over 200 of them."""
    out = []
    for changes, status, param in CHAT_CASES:
        out.append(("POST", "/v1/chat/completions", chat(**changes), None, status, param))
        if "stream" not in changes and "stream_options" not in changes:  # the same refused when streamed
            out.append(("POST", "/v1/chat/completions", chat(stream=True, **changes), None, status, param))
    for changes, status, param in COMPLETION_CASES:
        body = {"model": "beta", "prompt": "hi", "max_tokens": 1}
        body.update({k: v for k, v in changes.items() if v is not DROP})
        body = {k: v for k, v in body.items() if changes.get(k) is not DROP}
        out.append(("POST", "/v1/completions", body, None, status, param))
    for method, path in ROUTES:
        for headers in BAD_AUTH:
            out.append((method, path, chat() if method == "POST" else None,
                        {**headers, "Content-Type": "application/json"}, 401, None))
    admin = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    out += [("POST", "/admin/adapters", {"name": "x", "path": "/x"}, None, 401, None),  # the API key is not admin's
            ("POST", "/admin/adapters", {"name": "x"}, admin, 422, "path"),
            ("POST", "/admin/adapters", {"name": "x y", "path": "/tmp"}, admin, 422, "name"),
            ("POST", "/admin/adapters", {"name": "x", "path": "/no/such/adapter"}, admin, 400, "path"),
            ("POST", "/admin/adapters", {"name": "x", "path": "/etc/passwd"}, admin, 400, "path"),
            ("POST", "/admin/adapters", {"name": "alpha", "path": "/tmp"}, admin, 409, "name"),
            ("DELETE", "/admin/adapters/nope", None, admin, 404, "name")]
    for raw_body in (b"", b"{", b"[]", b"null", b"123", b'"text"', b"\xff\xfe\x00", b"{'model': 1}", b"{\"model\":}",
                     b"NaN", b'{"model": "alpha", "messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}"):
        for path in ("/v1/chat/completions", "/v1/completions"):
            out.append(("POST", path, raw_body, None, 400, None))
    rng = random.Random(0)
    for _ in range(30):
        out.append(("POST", "/v1/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                    None, 400, None))
    out += [("GET", "/v1/chat/completions", None, None, 405, None), ("PUT", "/v1/models", None, None, 405, None),
            ("POST", "/v1/chat/completions", b"x" * (2 << 20), None, 413, None),
            ("POST", "/v1/completions", json.dumps({"model": "beta", "prompt": "y" * (2 << 20)}).encode(), None, 413,
             None)]
    return out


def test_two_hundred_hostile_requests_get_the_right_4xx(served):
    table = cases()
    assert len(table) >= 200
    wrong = []
    for method, path, body, headers, status, param in table:
        got, _, answer = raw(served, method, path, body, headers)
        ok = got == status and isinstance(answer, dict) and "message" in answer.get("error", {})
        if ok and param is not None:
            ok = answer["error"]["param"] == param
        if not ok:
            wrong.append((method, path, str(body)[:80], status, param, got, str(answer)[:160]))
    assert not wrong, "\n".join(map(str, wrong[:20]))
    fives = [line for line in raw(served, "GET", "/metrics")[2].splitlines()
             if line.startswith("dstune_requests_total{") and 'status="5' in line]
    assert not fives, fives
    # Still serving, correctly.
    assert raw(served, "GET", "/health", headers={})[0] == 200
    status, _, answer = raw(served, "POST", "/v1/chat/completions", chat(max_tokens=3, temperature=0))
    assert status == 200 and answer["choices"][0]["message"]["content"] is not None


def test_admin_loads_and_unloads_an_adapter(served, adapters):
    admin = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    status, _, _ = raw(served, "POST", "/admin/adapters", {"name": "gamma", "path": str(adapters["alpha"])}, admin)
    assert status == 200
    ids = [m["id"] for m in raw(served, "GET", "/v1/models")[2]["data"]]
    assert "gamma" in ids
    same = [raw(served, "POST", "/v1/chat/completions", chat(model=m, max_tokens=6, temperature=0))[2]
            ["choices"][0]["message"]["content"] for m in ("alpha", "gamma")]
    assert same[0] == same[1]  # the same weights under another name
    assert raw(served, "DELETE", "/admin/adapters/gamma", None, admin)[0] == 200
    assert raw(served, "POST", "/v1/chat/completions", chat(model="gamma"))[0] == 404


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


def test_overflow_gets_429_then_serves(serve_recipe, adapters):
    running = start(serve_recipe, adapters, max_batch=2, max_queue=4)
    try:
        body = {"model": "alpha", "messages": [U], "max_tokens": 48, "temperature": 0}
        before = rss_mb()
        with ThreadPoolExecutor(60) as pool:  # 10x the queue's capacity, twice
            results = list(pool.map(lambda _: raw(running, "POST", "/v1/chat/completions", body, {}), range(120)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 6
        assert all(h.get("retry-after") == "1" for s, h, _ in results if s == 429)
        assert rss_mb() - before < 300
        assert raw(running, "POST", "/v1/chat/completions", body, {})[0] == 200
    finally:
        running.stop()


def test_a_client_that_leaves_cancels_its_generation(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    body = chat(max_tokens=400, temperature=0, stream=True)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=AUTH)
    response = connection.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 20
    while served.server.engine.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.server.engine.running() == 0
