"""dstune serve with the real `openai` client: chat (streamed or not), adapters per request, continuous batching."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

from serving import short_finishes_first


def client(served, key="sk-test"):
    return openai.OpenAI(base_url=served.url, api_key=key, max_retries=0, timeout=120)


def ask(served, model, text, max_tokens=8, **kw):
    reply = client(served).chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                   max_tokens=max_tokens, temperature=0, **kw)
    return reply.choices[0].message.content


def metric(served, name: str) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}/metrics",
                                     headers={"Authorization": "Bearer sk-test"})
    text = urllib.request.urlopen(request).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in client(served).models.list()]
    assert ids == [served.server.settings.base_name, "alpha", "beta"]


def test_sequential_answers_equal_dstune_chat(served, serve_recipe, adapters):
    from dstune import api

    prompts = ["Acute bronchitis", "Type 2 diabetes with neuropathy", "fracture of the left wrist"]
    for name in (None, "alpha", "beta"):
        chat = api.chat_session(serve_recipe, adapter=adapters[name] if name else None, max_new_tokens=12)
        model = name or served.server.settings.base_name
        for prompt in prompts:
            assert ask(served, model, prompt, max_tokens=12) == chat(prompt), (name, prompt)
    # The adapters change the answers, so the routing is visible.
    answers = {name: ask(served, name, prompts[0], max_tokens=12) for name in ("alpha", "beta")}
    answers["base"] = ask(served, served.server.settings.base_name, prompts[0], max_tokens=12)
    assert len(set(answers.values())) == 3


def test_streamed_chat_equals_unstreamed(served):
    plain = ask(served, "alpha", "Acute bronchitis", max_tokens=16)
    stream = client(served).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Acute bronchitis"}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens >= 1
    # The wire format ends with data: [DONE].
    request = urllib.request.Request(served.url + "/chat/completions", method="POST", data=json.dumps(
        {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}).encode(),
        headers={"Authorization": "Bearer sk-test", "Content-Type": "application/json"})
    body = urllib.request.urlopen(request).read().decode()
    assert body.rstrip().endswith("data: [DONE]")


def test_completions_and_sampling(served):
    c = client(served)
    reply = c.completions.create(model="beta", prompt="The code for asthma is", max_tokens=6, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
    # Usage counts the prompt once, not once per choice, and a streamed answer reports what an unstreamed one does.
    two = c.completions.create(model="beta", prompt="The code for asthma is", max_tokens=6, temperature=0, n=2)
    assert two.usage.prompt_tokens == reply.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * reply.usage.completion_tokens
    streamed = list(c.completions.create(model="beta", prompt="The code for asthma is", max_tokens=6, temperature=0,
                                         n=2, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.model_dump() == two.usage.model_dump()
    # A seed makes a sampled answer repeatable; n gives that many choices.
    kw = dict(model="alpha", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=1.0, seed=7)
    first, second = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert first.choices[0].message.content == second.choices[0].message.content
    many = c.chat.completions.create(**{**kw, "n": 3})
    assert len(many.choices) == 3 and many.choices[0].message.content == first.choices[0].message.content
    # A stop string ends the answer before it.
    full = ask(served, "alpha", "hello", max_tokens=12)
    if len(full) > 4:
        cut = ask(served, "alpha", "hello", max_tokens=12, stop=[full[2:4]])
        assert cut == full[:full.find(full[2:4])]


def test_concurrent_mixed_adapters_match_sequential(served):
    prompts = [f"patient {i} has condition {i * 7}" for i in range(24)]
    models = ["alpha", "beta", served.server.settings.base_name]
    jobs = [(models[i % 3], p) for i, p in enumerate(prompts)]
    alone = [ask(served, m, p, max_tokens=10) for m, p in jobs]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda job: ask(served, job[0], job[1], max_tokens=10), jobs))
    same = sum(a == b for a, b in zip(alone, together))
    assert same / len(jobs) >= 0.99, (same, len(jobs))


def test_short_request_overtakes_a_long_generation(served):
    assert short_finishes_first(client(served), "alpha", "beta")


def burst(served, clients: int, max_tokens: int = 24) -> list[str]:
    """`clients` requests sent at once (alternating the two adapters), each answered in full."""
    barrier = threading.Barrier(clients)

    def one(i):
        barrier.wait()
        return ask(served, ["alpha", "beta"][i % 2], f"case {i}", max_tokens=max_tokens)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def test_decode_batches_are_large_under_load(served):
    steps0, rows0 = metric(served, "dstune_decode_batch_size_count"), metric(served, "dstune_decode_batch_size_sum")
    assert len(burst(served, 32)) == 32
    steps = metric(served, "dstune_decode_batch_size_count") - steps0
    rows = metric(served, "dstune_decode_batch_size_sum") - rows0
    assert rows / steps >= 8, rows / steps  # the mean decode batch at 32 concurrent requests


def test_sixty_four_concurrent_clients_all_answered(served):
    ok0 = metric(served, 'dstune_requests_total{route="/v1/chat/completions",status="200"}')
    answers = burst(served, 64, max_tokens=12)  # a failed request raises in its client
    assert len(answers) == 64 and all(isinstance(a, str) for a in answers)
    assert metric(served, 'dstune_requests_total{route="/v1/chat/completions",status="200"}') - ok0 == 64
