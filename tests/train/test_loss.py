import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune.data.tokenize import IGNORE_INDEX
from dstune.train.collate import CausalCollator
from dstune.train.loss import supervised_lm_loss, supervised_positions

from tiny import tiny_config


def make_samples(seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for length, answer in [(9, 3), (14, 2), (6, 4)]:
        ids = torch.randint(3, 500, (length,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length - answer) + ids[-answer:]})
    return samples


@pytest.fixture(params=["llama", "qwen2", "deepseek_v3"])
def model(request):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(request.param, vocab_size=500)).float()


def test_positions_cover_exactly_the_supervised_targets():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    assert supervised_positions(labels).tolist() == [0, 1, 2]


def test_loss_and_grads_equal_full_logits_path(model):
    batch = CausalCollator(pad_token_id=0)(make_samples())
    loss_sum, count, logits = supervised_lm_loss(model, batch)
    assert logits.shape[1] < batch["input_ids"].shape[1]  # the LM head ran on fewer columns
    (loss_sum / count).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(**batch).loss  # HF's own loss over full-vocabulary logits
    reference.backward()
    assert torch.allclose(loss_sum / count, reference, atol=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(fast[name], param.grad, atol=1e-6), name


def test_left_padding_matches_each_sample_alone(model):
    model.eval()
    samples = make_samples(1)
    loss_sum, count, _ = supervised_lm_loss(model, CausalCollator(pad_token_id=0)(samples))
    alone = [supervised_lm_loss(model, CausalCollator(pad_token_id=0)([s]))[0] for s in samples]
    assert torch.isfinite(loss_sum)
    assert torch.allclose(loss_sum, torch.stack(alone).sum(), atol=1e-4)
    assert int(count) == sum(sum(t != IGNORE_INDEX for t in s["labels"]) for s in samples)
