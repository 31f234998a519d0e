"""dstune serve --engine onnx: the same routes and scheduler over dstune's ONNX exports (a merged model per name)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from serving import short_finishes_first, start


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory, tiny_model_dirs, adapters):
    """The tiny Llama exported as it is, and merged with adapter alpha, both fp32."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dstune.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("serve-onnx")
    base = tiny_model_dirs["llama"]
    merged = root / "merged-alpha"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters["alpha"]).merge_and_unload() \
        .save_pretrained(merged)
    for item in base.iterdir():
        if item.name.startswith("tokenizer") or item.name.endswith(".jinja"):
            shutil.copy(item, merged / item.name)
    return {"base": export_onnx(base, root / "base", "fp32"), "alpha": export_onnx(merged, root / "alpha", "fp32")}


@pytest.fixture(scope="module")
def onnx_served(serve_recipe, onnx_exports):
    running = start(serve_recipe, {"alpha": onnx_exports["alpha"]}, engine="onnx", model=str(onnx_exports["base"]),
                    api_key="sk-test", max_queue=128)
    yield running
    running.stop()


def client(served):
    return openai.OpenAI(base_url=served.url, api_key="sk-test", max_retries=0, timeout=120)


def ask(served, model, text, max_tokens=8, **kw):
    reply = client(served).chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                   max_tokens=max_tokens, temperature=0, **kw)
    return reply.choices[0].message.content


def test_right_padded_rows_decode_as_alone(onnx_exports):
    from dstune.serve.onnx_backend import OnnxBackend

    backend = OnnxBackend(onnx_exports["base"])
    prompts = [list(range(100, 105)), list(range(300, 311)), list(range(500, 508))]
    alone, state, tokens = [], None, []
    for ids in prompts:
        logits, one = backend.prefill(None, ids, None)
        token = int(logits.argmax())
        expected, _ = backend.decode(None, one, [token], [None], [len(ids)])
        alone.append(expected[0])
        state = one if state is None else backend.join(state, one)
        tokens.append(token)
    logits, state = backend.decode(None, state, tokens, [None] * 3, [len(p) for p in prompts])
    for row, expected in enumerate(alone):
        assert torch.allclose(logits[row], expected, atol=1e-4), (row, (logits[row] - expected).abs().max())
    # The longest row leaves; the others go on as if alone.
    state = backend.keep(state, [0, 2])
    assert state[0][0].shape[2] == 9 and state[1] == [6, 9]
    nxt = logits[[0, 2]].argmax(-1).tolist()
    together, _ = backend.decode(None, state, nxt, [None, None], [6, 9])
    for row, (ids, token) in enumerate(((prompts[0], tokens[0]), (prompts[2], tokens[2]))):
        _, solo = backend.prefill(None, ids + [token], None)
        expected, _ = backend.decode(None, solo, [nxt[row]], [None], [len(ids) + 1])
        assert torch.allclose(together[row], expected[0], atol=1e-4)


def test_onnx_answers_equal_onnxruntime_genai_and_torch(onnx_served, onnx_exports, served):
    from dstune.export.onnx import GenaiModel

    server = onnx_served.server
    ids = [m.id for m in client(onnx_served).models.list()]
    assert ids == [server.settings.base_name, "alpha"]
    for name, folder in (("base", onnx_exports["base"]), ("alpha", onnx_exports["alpha"])):
        genai = GenaiModel(folder)
        model = server.settings.base_name if name == "base" else "alpha"
        for text in ("Acute bronchitis", "fracture of the wrist"):
            prompt = server.chat_prompt_ids([{"role": "user", "content": text}])
            expected = genai.greedy(prompt, 10, server.engine.stop_ids)
            expected = [t for t in expected if t not in server.engine.stop_ids]
            got = ask(onnx_served, model, text, max_tokens=10)
            assert got == server.tokenizer.decode(expected, skip_special_tokens=True), (name, text)
            # the torch backend with the adapter (unmerged) gives the same greedy answer
            torch_model = served.server.settings.base_name if name == "base" else "alpha"
            assert got == ask(served, torch_model, text, max_tokens=10)


def test_onnx_continuous_batching_and_mixed_burst(onnx_served):
    base = onnx_served.server.settings.base_name
    jobs = [(["alpha", base][i % 2], f"patient {i} has condition {i * 7}") for i in range(16)]
    alone = [ask(onnx_served, m, p, max_tokens=10) for m, p in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: ask(onnx_served, job[0], job[1], max_tokens=10), jobs))
    assert sum(a == b for a, b in zip(alone, together)) / len(jobs) >= 0.99

    assert short_finishes_first(client(onnx_served), "alpha", base)
