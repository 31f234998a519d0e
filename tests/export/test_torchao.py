"""The torchao export: int8 linear layers saved as safetensors, loaded back bit-exact, without unpickling anything."""

import copy
import pickle

import pytest
import torch
from safetensors import safe_open

from dstune.data.templates import get_template
from dstune.evaluate.cache import model_fingerprint
from dstune.evaluate.generate import generate
from dstune.export.formats import EXPORT_FORMATS
from dstune.export.torchao import QUANTS, export_torchao, load_torchao, torchao_config
from dstune.models.safety import PICKLE_SUFFIXES, allow_pickle

CASES = [(model_type, quant) for model_type in ("llama", "qwen2") for quant in QUANTS]


@pytest.fixture(scope="module")
def artifacts(tiny_model_dirs, tmp_path_factory):
    """Every (model type, quant) export of the tiny models, written once."""
    root = tmp_path_factory.mktemp("torchao")
    return {(t, q): export_torchao(tiny_model_dirs[t], root / f"{t}-{q}", q) for t, q in CASES}


@pytest.fixture
def no_pickle(monkeypatch):
    """Pickle weight files refused (dstune's default), and any unpickling call an error."""
    monkeypatch.delenv("DSTUNE_ALLOW_PICKLE", raising=False)
    allow_pickle(False)

    def refuse(*args, **kwargs):
        raise AssertionError("loading a torchao artifact unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def quantized_in_memory(merged_dir, quant):
    """The fp32 model and the same model quantized by torchao's quantize_ in memory (LM head left out)."""
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    quantized = copy.deepcopy(fp32)
    quantize_(quantized, torchao_config(quant).quant_type,
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn != "lm_head")
    return fp32, quantized


@pytest.mark.parametrize("model_type,quant", CASES)
def test_round_trip_is_lossless_close_to_fp32_and_generates(artifacts, tiny_model_dirs, tokenizer, no_pickle,
                                                             model_type, quant):
    model, loaded_tokenizer = load_torchao(artifacts[model_type, quant], tiny_model_dirs[model_type])
    fp32, in_memory = quantized_in_memory(tiny_model_dirs[model_type], quant)
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj.weight).__name__ == type(layer.mlp.down_proj.weight).__name__ == "Int8Tensor"
    assert all(type(w.data) is torch.Tensor for w in (model.lm_head.weight, model.model.embed_tokens.weight))
    ids = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected, reference = model(ids).logits, in_memory(ids).logits, fp32(ids).logits
    assert torch.equal(logits, expected)  # the safetensors round trip loses nothing
    # Measured on these random tiny models: 3.2-5.1% relative error (int8wo 3.2-3.4%, int8 5.1%), 87-98% of
    # argmaxes kept.
    assert (logits - reference).norm() / reference.norm() < 0.07
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.75
    # Greedy answers through the evaluation loop (left-padded batches) are the in-memory quantized model's. Not
    # always a lone prompt's: with int8 activations, padding's ~1e-6 float noise can flip an activation's rounding.
    template = get_template("chatml", loaded_tokenizer)
    conversations = [[{"role": "user", "content": text}] for text in ("hi", "what colour is item 7?", "2+2")]
    answers = generate(model, loaded_tokenizer, template, conversations, batch_size=3, max_new_tokens=6)
    expected_answers = generate(in_memory, tokenizer, template, conversations, batch_size=3, max_new_tokens=6)
    assert answers.texts == expected_answers.texts
    assert answers.new_tokens > 0 and all(answers.texts)


def _tensor_bytes(path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file."""
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key).nbytes for key in handle.keys()}


@pytest.mark.parametrize("quant", QUANTS)
def test_int8_weights_take_a_quarter_of_fp32_on_disk_in_safetensors_only(artifacts, tiny_model_dirs, quant):
    artifact = artifacts["llama", quant]
    files = sorted(p.name for p in artifact.iterdir())
    assert not [f for f in files if any(f.endswith(s) for s in PICKLE_SUFFIXES)]
    assert {p.suffix for p in artifact.iterdir()} <= {".safetensors", ".json", ".jinja"}, files
    stored = _tensor_bytes(artifact / "model.safetensors")
    parts = {key: size for key, size in stored.items() if "._weight_" in key}  # qdata, scale, zero point
    linears = {key.split("._weight_")[0] for key in parts}
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each layer; the LM head stays fp32
    fp32 = sum(_tensor_bytes(tiny_model_dirs["llama"] / "model.safetensors")[f"{name}.weight"] for name in linears)
    int8 = sum(parts.values())
    # int8 data plus a float32 scale and an int8 zero point per output row: 26.7% here (rows of 64 and 128
    # inputs; 25 + 125/inputs %, so 25.2% for 576-wide rows).
    assert 0.25 < int8 / fp32 <= 0.27


def test_registered_and_fingerprinted_for_the_generation_cache(artifacts, tiny_model_dirs):
    assert EXPORT_FORMATS["torchao"].quants == QUANTS == ("int8", "int8wo")
    assert EXPORT_FORMATS["torchao"].load is load_torchao
    int8, _ = load_torchao(artifacts["llama", "int8"], tiny_model_dirs["llama"])
    again, _ = load_torchao(artifacts["llama", "int8"], tiny_model_dirs["llama"])
    weight_only, _ = load_torchao(artifacts["llama", "int8wo"], tiny_model_dirs["llama"])
    # Same int8 data and scales, different matmul: the fingerprint tells them apart.
    assert model_fingerprint(int8) == model_fingerprint(again) != model_fingerprint(weight_only)
    with torch.no_grad():
        again.model.layers[0].mlp.up_proj.weight.qdata[0, 0] += 1
    assert model_fingerprint(again) != model_fingerprint(int8)
