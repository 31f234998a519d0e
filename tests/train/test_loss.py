import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune.data.tokenize import IGNORE_INDEX
from dstune.train.collate import CausalCollator
import torch.nn.functional as F

from dstune.train import loss as loss_module
from dstune.train.loss import linear_cross_entropy, supervised_lm_loss, supervised_positions

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


@pytest.mark.parametrize("head_path", ["chunked", "logits_to_keep"])
def test_loss_and_grads_equal_full_logits_path(model, head_path, monkeypatch):
    if head_path == "logits_to_keep":  # the fallback for architectures outside PLAIN_HEAD_MODELS
        monkeypatch.setattr(loss_module, "PLAIN_HEAD_MODELS", frozenset())
    batch = CausalCollator(pad_token_id=0)(make_samples())
    loss_sum, count = supervised_lm_loss(model, batch)
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
    loss_sum, count = supervised_lm_loss(model, CausalCollator(pad_token_id=0)(samples))
    alone = [supervised_lm_loss(model, CausalCollator(pad_token_id=0)([s]))[0] for s in samples]
    assert torch.isfinite(loss_sum)
    assert torch.allclose(loss_sum, torch.stack(alone).sum(), atol=1e-4)
    assert int(count) == sum(sum(t != IGNORE_INDEX for t in s["labels"]) for s in samples)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_linear_cross_entropy_equals_full_logits(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=gen)
    loss = linear_cross_entropy(hidden, weight, targets, chunk)
    (2.5 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (2.5 * reference).backward()
    assert torch.allclose(loss, reference, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(grads[1], weight.grad, atol=1e-5)


def test_chunked_loss_never_builds_full_logits(model, monkeypatch):
    """The model's own LM head runs on no position: the loss projects the hidden states itself, a chunk at a time."""
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    supervised_lm_loss(model, CausalCollator(pad_token_id=0)(make_samples()))
    assert seen and all(shape[1] == 0 for shape in seen)
