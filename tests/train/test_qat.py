"""QAT fake-quantizes the merged weight exactly as the deployment quantizers do, and trains LoRA through it."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from dstune import api
from dstune.config import load_recipe
from dstune.errors import InputError
from dstune.train.qat import disable_qat, enable_qat, fake_quantize, fake_quantize_int4, qat_lora_class

from tiny import tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Net(nn.Module):
    # 80 inputs: not a whole number of int4 blocks, so the export's zero padding is exercised too.
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(80, 48)

    def forward(self, x):
        return self.proj(x)


def qat_layer(scheme: str, group_size: int = 32):
    """A QAT LoRA layer with a nonzero adapter, and its merged weight as peft's merge writes it (int4 blocks of 32
    by default: 80 inputs then end in a padded block)."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    assert enable_qat(model, scheme, group_size) == 1
    merged = copy.deepcopy(model).merge_and_unload().proj.weight.detach()
    return model, model.base_model.model.proj, merged


def matmulnbits_weight(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight onnxruntime's MatMulNBits int4 uses for y = x Wᵀ: read from the packed initializers, and run."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "B")])
    # The settings onnxruntime-genai's builder passes for int4: symmetric, DEFAULT (MLAS) quantizer.
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), bits=4,
                                     block_size=block_size, is_symmetric=True, accuracy_level=0)
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(inits) == {"B_Q4", "B_scales"}  # symmetric: no zero points, the kernel uses 8
    packed, scales = inits["B_Q4"], inits["B_scales"].reshape(rows, -1, 1)
    q = np.stack([packed & 0xF, packed >> 4], -1).reshape(rows, scales.shape[1], block_size).astype(np.float32)
    unpacked = torch.from_numpy(((q - 8) * scales).reshape(rows, -1)[:, :cols])
    # Run on the identity: accuracy_level 0 computes in fp32, so the output is the weight it dequantized.
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ran = torch.from_numpy(session.run(None, {"x": np.eye(cols, dtype=np.float32)})[0].T.copy())
    return unpacked, ran


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_equals_onnxruntime_matmulnbits(group_size):
    model, layer, merged = qat_layer("int4", group_size)
    assert torch.equal(layer.merged_weight("default").detach(), merged)
    # Rows where the details decide: exact halves (roundf goes away from zero) and a +/- tie of the largest magnitude.
    merged[:3, :group_size] = 0.0  # row 2: an all-zero block, scale 0
    merged[0, 0], merged[0, 1:9] = -1.0, 0.0625 * (2 * torch.arange(8) + 1)
    merged[1, :2], merged[1, 2:10] = torch.tensor([0.5, -0.5]), 0.03125 * (2 * torch.arange(8) + 1)
    unpacked, ran = matmulnbits_weight(merged, group_size)
    ours = fake_quantize_int4(merged, group_size)
    assert torch.equal(ours, unpacked) and torch.equal(ours, ran)  # bit for bit
    assert ours[0, 1] == 0.125 and ours[1, 0] == 0.4375  # 8.5 rounds to 9; the tie picks the negative end
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight("default"), matmulnbits_weight(layer.merged_weight("default"),
                                                                                 group_size)[0])


def test_int8_equals_torchao_int8_tensor():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    model, layer, merged = qat_layer("int8")
    merged[0, 3] = 2 * merged[0].abs().max()  # the largest value maps to 127.5: rounds to 128, clamped to 127
    merged[1] = 0.0
    for config in (Int8WeightOnlyConfig(), Int8DynamicActivationInt8WeightConfig()):
        linear = nn.Linear(80, 48, bias=False)
        linear.weight.data.copy_(merged)
        quantize_(linear, config)
        assert torch.equal(fake_quantize(merged, "int8"), linear.weight.dequantize())  # bit for bit


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_forward_is_the_quantized_merged_linear_and_gradients_reach_lora(scheme):
    model, layer, merged = qat_layer(scheme)
    x = torch.randn(3, 5, 80)
    y = model(x)
    expected = F.linear(x, fake_quantize(merged, scheme, 32), layer.base_layer.bias)
    assert torch.equal(y, expected)
    assert not torch.allclose(y, F.linear(x, merged, layer.base_layer.bias), atol=1e-4)  # it really quantizes
    g = torch.randn_like(y)
    y.backward(g)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    # Straight-through: the gradient of the merged weight, g^T x, reaches B and A through W + s B A.
    grad_w = g.reshape(-1, 48).t() @ x.reshape(-1, 80)
    for grad, want in ((a.grad, s * b.t() @ grad_w), (b.grad, s * grad_w @ a.t())):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert torch.allclose(grad, want, atol=1e-4)
    assert layer.base_layer.weight.grad is None  # frozen base


def tiny_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300)).float()


def test_qat_model_is_the_quantized_merged_model_and_saves_loads_merges(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    assert enable_qat(model, "int4") == 2 * len(TARGETS)
    ids = torch.randint(0, 300, (2, 12))
    model.train()
    model(input_ids=ids).logits.square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.eval()
    with torch.no_grad():
        qat_logits = model(input_ids=ids).logits
        # Deployment: merge, then quantize every merged linear layer.
        deployed = copy.deepcopy(model).merge_and_unload()
        for name in TARGETS:
            for module in deployed.modules():
                if isinstance(getattr(module, name, None), nn.Linear):
                    layer = getattr(module, name)
                    layer.weight.copy_(fake_quantize_int4(layer.weight))
        assert torch.allclose(deployed(input_ids=ids).logits, qat_logits, atol=1e-5)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and all(torch.equal(p, saved[n]) for n, p in loaded.named_parameters() if "lora_" in n)
    assert disable_qat(model) == 2 * len(TARGETS)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, plain, atol=1e-5)
        assert torch.allclose(loaded.merge_and_unload()(input_ids=ids).logits, plain, atol=1e-4)


def test_cached_weight_follows_updates():
    model, layer, _ = qat_layer("int4")
    with torch.no_grad():
        first = layer.quantized_weight("default")
        assert layer.quantized_weight("default") is first  # generation reuses it
        layer.lora_B["default"].weight.mul_(3.0)
        assert not torch.equal(layer.quantized_weight("default"), first)


def test_train_with_qat_records_it_and_learns(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 12, "learning_rate": 2e-2,
                                            "qat": {"scheme": "int4", "group_size": 32}}))
    result = api.train(recipe)
    summary = result.summary
    assert summary["qat"] == {"scheme": "int4", "group_size": 32, "layers": 14}
    assert summary["fused_lora_layers"] == 0
    losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
    assert sum(losses[-3:]) / 3 < losses[0], losses
    # Afterwards the in-memory model is plain peft again: the fp32 model that gets merged and exported.
    assert not any(type(m) is qat_lora_class() for m in result.model.modules())
    assert any(torch.count_nonzero(p) for n, p in result.model.named_parameters() if "lora_B" in n)
    assert load_recipe(tiny_recipe()).train.qat is None


@pytest.mark.parametrize("train, match", [
    ({"qat": {"scheme": "int4"}, "lora": {"dropout": 0.1}}, "train.lora.dropout to 0"),
    ({"qat": {"scheme": "int8"}, "method": "dora"}, "covers method lora, not dora"),
    ({"qat": {"scheme": "int3"}}, "train.qat.scheme"),
    ({"qat": {"scheme": "int4", "group_size": 48}}, "train.qat.group_size"),
])
def test_qat_config_errors(tiny_recipe, train, match):
    with pytest.raises(InputError, match=match):
        load_recipe(tiny_recipe(train=train))


def test_int4_blocks_default_to_the_exports():
    from inspect import signature

    from dstune.config import QatConfig
    from dstune.export.onnx import BUILDER_OPTIONS, INT4_BLOCK_SIZE

    assert INT4_BLOCK_SIZE == 16 and BUILDER_OPTIONS["int4"]["block_size"] == "16"
    assert QatConfig(scheme="int4").group_size == INT4_BLOCK_SIZE
    assert all(signature(f).parameters["group_size"].default == INT4_BLOCK_SIZE
               for f in (enable_qat, fake_quantize, fake_quantize_int4))
