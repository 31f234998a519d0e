"""The `continual` objective's controls against forgetting: the KL anchor, EWC and O-LoRA, each against its maths."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from dstune import api
from dstune.config import load_recipe
from dstune.errors import InputError
from dstune.preflight import check_train
from dstune.train.logit_cache import TopKLogits, topk_kl
from dstune.train.objectives.continual import FISHER_FILE, Continual, orthogonality


def objective(raw: dict, tmp_path, init: str | None = None, **continual):
    """The objective as the loop builds it: the recipe's model with its fresh adapter (and the init adapter)."""
    from dstune.models.loading import load_model, load_tokenizer
    from dstune.train.init_adapter import load_initial_adapter
    from dstune.tuners.methods import add_method

    train = {**raw["train"], "objective": "continual", "continual": continual}
    if init:
        train["init_adapter"] = str(init)
    recipe = load_recipe({**raw, "train": train})
    torch.manual_seed(0)
    model = add_method(load_model(Path(recipe.model.name_or_path), "float32"), recipe.train)
    if init:
        load_initial_adapter(model, init)
    tokenizer = load_tokenizer(Path(recipe.model.name_or_path))
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    from dstune.train.loop import encode_records
    from dstune.data.formats import read_samples
    from dstune.data.templates import get_template

    records = list(read_samples(raw["data"]["train_file"]))
    train_set = encode_records(records, tokenizer, get_template("auto", tokenizer), 64)
    context = SimpleNamespace(recipe=recipe, tokenizer=tokenizer, model=model, accelerator=accelerator,
                              train_set=train_set, run_dir=tmp_path)
    obj = Continual(recipe.train.continual, context)
    obj.setup()
    return obj, model


@pytest.fixture(scope="module")
def trained(workspace):
    """A LoRA adapter trained 6 steps on the toy task, once for the module."""
    raw = yaml.safe_load(workspace["recipe"]("first").read_text())
    return raw, api.train(load_recipe(raw)).adapter_dir


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    ref_logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5]]])
    logits = torch.tensor([[[1.0, 1.5, 0.2, -0.5, 0.0]]])
    ref = F.log_softmax(ref_logits, -1)
    values, ids = ref.topk(2, -1)
    got = topk_kl(logits, values, ids, torch.ones(1, 1))
    p = ref.exp()[0, 0].tolist()
    q = F.softmax(logits, -1)[0, 0].tolist()
    # buckets: token 0, token 1 (the reference's two largest), and the rest
    pb = [p[0], p[1], 1 - p[0] - p[1]]
    qb = [q[0], q[1], 1 - q[0] - q[1]]
    assert float(got) == pytest.approx(sum(a * math.log(a / b) for a, b in zip(pb, qb)), rel=1e-5)
    # with k = the vocabulary it is the full KL; equal distributions give 0; padding positions count nothing
    values, ids = ref.topk(5, -1)
    full = F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="sum")
    assert float(topk_kl(logits, values, ids, torch.ones(1, 1))) == pytest.approx(float(full), rel=1e-5)
    assert float(topk_kl(ref_logits, values, ids, torch.ones(1, 1))) == pytest.approx(0.0, abs=1e-7)
    assert float(topk_kl(logits, values, ids, torch.zeros(1, 1))) == 0.0


def test_the_kl_anchor_is_zero_at_its_reference_and_moves_only_trainable_weights(tmp_path, trained):
    raw, adapter = trained
    anchor = {"weight": 1.0, "file": raw["data"]["train_file"], "text_file": "", "batch_size": 3}
    obj, model = objective(raw, tmp_path, init=adapter, kl={**anchor, "reference": "start"})
    model.eval()
    assert len(obj.anchor.samples) == len(open(raw["data"]["train_file"]).read().splitlines())
    assert float(obj.anchor_kl(model)) == pytest.approx(0.0, abs=1e-6)
    # the base model as reference: the trained adapter is away from it
    base_obj, model = objective(raw, tmp_path, init=adapter, kl=anchor)
    model.eval()
    kl = base_obj.anchor_kl(model)
    assert float(kl) > 1e-4
    kl.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                             if n in trainable and "lora_" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_the_topk_cache_round_trips(tmp_path, trained):
    raw, adapter = trained
    obj, _ = objective(raw, tmp_path, kl={"weight": 1.0, "file": raw["data"]["train_file"], "top_k": 4})
    assert len(obj.anchor.samples) > len(open(raw["data"]["train_file"]).read().splitlines())  # and the prose
    obj.anchor.save(tmp_path / "anchor.safetensors", {"reference": "base"})
    loaded, meta = TopKLogits.load(tmp_path / "anchor.safetensors")
    assert meta == {"reference": "base"} and loaded.samples == obj.anchor.samples
    assert all(torch.equal(a, b) for a, b in zip(loaded.logprobs, obj.anchor.logprobs))


def test_orthogonality_matches_a_hand_computation():
    a_prev = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    a_new = torch.tensor([[1.0, 1.0, 0.0]])
    # A_prev A_new^T = [1, 2]: 5 / (5 * 2)
    assert float(orthogonality(a_prev, a_new)) == pytest.approx(0.5)
    assert float(orthogonality(a_prev, torch.tensor([[0.0, 0.0, 3.0]]))) == 0.0
    assert float(orthogonality(a_prev[:1], a_prev[:1])) == pytest.approx(1.0)  # the same subspace: the maximum


def test_ewc_penalty_equals_the_closed_form(tmp_path, trained):
    raw, adapter = trained
    obj, model = objective(raw, tmp_path, ewc={"weight": 2.0, "samples": 4})
    assert obj.ewc is None  # a first stage: nothing to hold on to yet
    generator = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=generator) for n, p in obj.trainable}
    anchor = {n: torch.randn(p.shape, generator=generator) for n, p in obj.trainable}
    obj.ewc = (fisher, anchor)
    want = sum(float((fisher[n].double() * (p.detach().double() - anchor[n].double()) ** 2).sum())
               for n, p in obj.trainable)
    assert float(obj.ewc_penalty()) == pytest.approx(want, rel=1e-5)
    # the empirical Fisher is a mean of squared per-sample gradients: non-negative, and not all zero
    estimate = obj.empirical_fisher(model)
    assert set(estimate) == {n for n, _ in obj.trainable}
    assert all((f >= 0).all() for f in estimate.values()) and any(f.sum() > 0 for f in estimate.values())


def test_ewc_needs_the_parent_s_fisher_before_any_stage(tmp_path, trained):
    raw, adapter = trained
    recipe = load_recipe({**raw, "train": {**raw["train"], "objective": "continual", "init_adapter": str(adapter),
                                           "continual": {"ewc": {"weight": 1.0}}}})
    with pytest.raises(InputError, match=f"train.continual.ewc: .* has no {FISHER_FILE}"):
        check_train(recipe)


def test_o_lora_starts_at_the_earlier_adapter_and_saves_one_standard_lora(tmp_path, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw, adapter = trained
    obj, model = objective(raw, tmp_path, orthogonal={"previous": str(adapter), "weight": 1.0})
    base = AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"])
    earlier = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, earlier(input_ids=ids).logits, atol=1e-6)
    assert float(obj.orthogonality()) > 0  # fresh random A rows are not orthogonal to the earlier ones
    assert model.peft_config["default"].r == 8  # 4 earlier + 4 new
    # a step that moves every weight: the earlier block comes back exactly, the new one keeps its change
    before = {id(p): p.detach().clone() for p, *_ in obj.frozen}
    with torch.no_grad():
        for param, *_ in obj.frozen:
            param.add_(0.01)
    obj.on_step_end(1)
    for param, saved, dim, r_prev in obj.frozen:
        assert torch.equal(param.narrow(dim, 0, r_prev), saved)
        assert torch.equal(param.narrow(dim, r_prev, param.shape[dim] - r_prev),
                           before[id(param)].narrow(dim, r_prev, param.shape[dim] - r_prev) + 0.01)
    # the gradient of the frozen block is zero
    model.train()
    out = model(input_ids=ids).logits.pow(2).mean() + obj.orthogonality()
    out.backward()
    for param, _, dim, r_prev in obj.frozen:
        assert param.grad.narrow(dim, 0, r_prev).abs().sum() == 0
        assert param.grad.narrow(dim, r_prev, param.shape[dim] - r_prev).abs().sum() > 0
    # saved, it is one standard peft LoRA that loads and computes what the in-memory model does
    model.save_pretrained(tmp_path / "grown")
    config = json.loads((tmp_path / "grown" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]),
                                         tmp_path / "grown").eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)


def test_o_lora_refuses_other_targets_and_methods(tmp_path, trained):
    raw, adapter = trained
    with pytest.raises(InputError, match="train.continual.orthogonal: .* targets"):
        objective({**raw, "train": {**raw["train"], "lora": {**raw["train"]["lora"], "targets": ["q_proj"]}}},
                  tmp_path, orthogonal={"previous": str(adapter)})
    recipe = load_recipe({**raw, "train": {**raw["train"], "method": "ia3", "objective": "continual",
                                           "continual": {"orthogonal": {"previous": str(adapter)}}}})
    with pytest.raises(InputError, match="O-LoRA grows a LoRA adapter"):
        check_train(recipe)
    with pytest.raises(Exception, match="choose one"):
        load_recipe({**raw, "train": {**raw["train"], "objective": "continual", "continual": {
            "ewc": {"weight": 1.0}, "orthogonal": {"previous": str(adapter)}}}})
