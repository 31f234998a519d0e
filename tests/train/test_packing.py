"""Packed rows give every sample the logits, loss and gradients it has alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune.data.tokenize import IGNORE_INDEX
from dstune.train.collate import CausalCollator
from dstune.train.loss import supervised_lm_loss
from dstune.train.packing import PackingCollator, best_fit_decreasing, block_causal_mask, choose_rows

from tiny import tiny_config


def make_samples(lengths=(9, 14, 6, 11, 3, 17), seed=0, raw_text=False):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        ids = torch.randint(3, 500, (length,), generator=gen).tolist()
        answer = length if raw_text else max(1, length // 3)
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length - answer) + ids[-answer:]})
    return samples


def tiny_model(model_type, attn="sdpa"):
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=500)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).float().eval()


def test_best_fit_packs_every_sample_once_within_capacity():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    rows = best_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 40 tokens fill four rows exactly: 9+1, 8+2, 7+3, 5+5
    rows, width = choose_rows(lengths, 20)
    assert width >= max(lengths) and len(rows) * width >= sum(lengths)
    assert len(rows) * width <= 2 * 21  # 40 tokens fit two rows of 20 or 21 columns


def test_block_causal_mask():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "deepseek_v3"])
def test_packed_logits_equal_each_sample_alone(model_type, attn):
    model = tiny_model(model_type, attn)
    samples = make_samples()
    collator = PackingCollator(0, 24, attn)
    batch = collator(samples)
    assert batch["input_ids"].shape[0] < len(samples)  # samples really share rows
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        packed = model(**inputs).logits
        # Where each sample sits: its tokens, in order, in one row.
        worst = 0.0
        for sample in samples:
            ids = torch.tensor(sample["input_ids"])
            alone = model(input_ids=ids[None]).logits[0]
            row, start = _locate(batch["input_ids"], ids)
            worst = max(worst, (packed[row, start:start + len(ids)] - alone).abs().max().item())
    assert worst < 1e-5
    assert 0.0 <= collator.padding_fraction < 0.5


def test_restarted_positions_alone_do_not_isolate_samples():
    """The reason for the mask: without it, a later sample attends to the earlier ones in its row."""
    model = tiny_model("llama")
    samples = make_samples()
    batch = PackingCollator(0, 64, "sdpa")(samples)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"])).logits
        masked = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    assert (leaky - masked).abs().max().item() > 1e-3


@pytest.mark.parametrize("raw_text", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3"])
def test_packed_loss_and_grads_equal_padded(model_type, raw_text):
    model = tiny_model(model_type).train()
    samples = make_samples(raw_text=raw_text)
    padded = CausalCollator(0)(samples)
    packed = PackingCollator(0, 32, "sdpa")(samples)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss_sum, count = supervised_lm_loss(model, batch)
        (loss_sum / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss_sum.item(), int(count), grads, int(batch["num_tokens"])))
    (loss_a, count_a, grads_a, tokens_a), (loss_b, count_b, grads_b, tokens_b) = results
    assert count_a == count_b and tokens_a == tokens_b == sum(len(s["input_ids"]) for s in samples)
    assert abs(loss_a - loss_b) < 1e-4 * max(1.0, abs(loss_a))
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-5), name


def _locate(rows: torch.Tensor, ids: torch.Tensor) -> tuple[int, int]:
    n = len(ids)
    for r in range(rows.shape[0]):
        for start in range(rows.shape[1] - n + 1):
            if torch.equal(rows[r, start:start + n], ids):
                return r, start
    raise AssertionError("sample not found in the packed rows")
