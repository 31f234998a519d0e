"""The continuous-batching engine's parts: joined KV caches decode as each row alone would, sampling, <think>."""

from __future__ import annotations

import pytest
import torch

from dstune.serve.app import ThinkSplitter
from dstune.serve.engine import Sampling, sample
from dstune.serve.torch_backend import join_caches, keep_rows


@pytest.fixture(scope="module")
def engine(tiny_model_dirs, adapters, tokenizer):
    from transformers import AutoModelForCausalLM

    from dstune.serve.engine import Engine
    from dstune.serve.torch_backend import TorchBackend

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    engine = Engine(TorchBackend(model), tokenizer, [tokenizer.eos_token_id])
    for name, path in adapters.items():
        engine.call(lambda name=name, path=path: engine.load_adapter(name, path)).result()
    yield engine
    engine.close()


def prefill(engine, ids, adapter):
    from transformers import DynamicCache

    ids = torch.tensor([ids])
    with torch.inference_mode():
        out = engine.backend.forward("mixed", [adapter], input_ids=ids, attention_mask=torch.ones_like(ids),
                              position_ids=torch.arange(ids.shape[1])[None],
                              past_key_values=DynamicCache(config=engine.backend.model.config), use_cache=True)
    return out.past_key_values, torch.ones(1, ids.shape[1], dtype=torch.long), int(out.logits[0, -1].argmax())


def decode(engine, cache, mask, tokens, lengths, adapters):
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with torch.inference_mode():
        out = engine.backend.forward("mixed", adapters, input_ids=torch.tensor(tokens)[:, None], attention_mask=mask,
                              position_ids=torch.tensor(lengths)[:, None], past_key_values=cache, use_cache=True)
    return out.logits[:, -1], mask


def test_rows_of_a_joined_mixed_adapter_batch_decode_as_alone(engine):
    prompts = [list(range(100, 105)), list(range(300, 311)), list(range(500, 508))]
    adapters = ["alpha", "beta", None]
    alone = []
    for ids, adapter in zip(prompts, adapters):
        cache, mask, token = prefill(engine, ids, adapter)
        logits, _ = decode(engine, cache, mask, [token], [len(ids)], [adapter])
        alone.append((token, logits[0]))
    cache, mask, first = prefill(engine, prompts[0], adapters[0])
    tokens = [first]
    for ids, adapter in zip(prompts[1:], adapters[1:]):
        other, other_mask, token = prefill(engine, ids, adapter)
        mask = join_caches(cache, mask, other, other_mask)
        tokens.append(token)
    assert mask.shape == (3, 11) and mask.sum(1).tolist() == [5, 11, 8]
    logits, mask = decode(engine, cache, mask, tokens, [len(p) for p in prompts], adapters)
    for row, (token, expected) in enumerate(alone):
        assert tokens[row] == token
        assert torch.allclose(logits[row], expected, atol=1e-4), (row, (logits[row] - expected).abs().max())
    # The adapters differ, so a row decoded with another's adapter would not match.
    assert not torch.allclose(alone[0][1], alone[2][1], atol=1e-2)

    # The longest row leaves: the padding columns only it used go, and the others decode on unchanged.
    mask = keep_rows(cache, mask, [0, 2])
    assert mask.shape == (2, 9) and mask.sum(1).tolist() == [6, 9]
    nxt = logits[[0, 2]].argmax(-1).tolist()
    together, _ = decode(engine, cache, mask, nxt, [6, 9], ["alpha", None])
    for row, (ids, adapter, token) in enumerate(((prompts[0], "alpha", tokens[0]), (prompts[2], None, tokens[2]))):
        solo_cache, solo_mask, _ = prefill(engine, ids + [token], adapter)
        expected, _ = decode(engine, solo_cache, solo_mask, [nxt[row]], [len(ids) + 1], [adapter])
        assert torch.allclose(together[row], expected[0], atol=1e-4)


def test_sampling():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert sample(logits, Sampling(temperature=0), None) == 0
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        seen.add(sample(logits, Sampling(temperature=1.0, top_p=0.6), generator))
    assert seen == {0, 1}  # the nucleus: the fewest tokens whose mass reaches 0.6
    draws = [[sample(logits, Sampling(1.0), torch.Generator().manual_seed(s)) for s in range(20)] for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


@pytest.mark.parametrize("pieces", [["<think>a b</think>\n\nanswer"], list("<think>a b</think>\n\nanswer"),
                                    ["<thi", "nk>a b</th", "ink>\n", "\nanswer"]])
def test_think_splitter(pieces):
    splitter = ThinkSplitter(True)
    parts = [splitter.feed(p) for p in pieces] + [splitter.feed("", final=True)]
    assert "".join(r for r, _ in parts) == "a b" and "".join(c for _, c in parts) == "answer"
    assert ThinkSplitter(True).feed("no reasoning", final=True) == ("", "no reasoning")
    assert ThinkSplitter(False).feed("<think>x</think>y", final=True) == ("", "<think>x</think>y")
