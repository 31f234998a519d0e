"""Calibrated int4: RTN is fake_quantize_int4, GPTQ and AWQ beat it on held-out tokens, the export carries GPTQ's
codes exactly, and calibration reads the train split alone."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune.config import load_recipe
from dstune.data.build import load_split
from dstune.data.templates import get_template
from dstune.data.tokenize import encode_conversation
from dstune.export import calibrate
from dstune.export.calibrate import calibration_samples
from dstune.export.int4 import (awq_transform, dequantize, gptq_codes, gptq_model, rtn_codes, rtn_model)
from dstune.export.onnx import export_onnx
from dstune.export.onnx_calibrated import NODE_LINEARS, _stacked, int4_layer_nodes, pack_int4
from dstune.export.sensitivity import place, scan
from dstune.train.qat import fake_quantize_int4
from tiny import make_tiny_model_dir

BLOCK = 16
TRAIN = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hidden-64 matrices gain nothing from a second thread; on a busy 2-core machine its waits made this file
    take 90 s instead of 15."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def anisotropic_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Llama whose layer inputs are correlated (a mixed embedding) and uneven across channels (log-normal
    norm gains), as a trained model's are: with isotropic random inputs calibration has nothing to exploit."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("aniso") / "llama", "llama", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        mixer = rotation @ torch.diag(torch.exp(torch.randn(64, generator=g))) @ rotation.T
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ mixer)
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.exp(torch.randn(norm.weight.shape, generator=g)))
    model.save_pretrained(path)
    return path


def random_text(tokenizer, rng, n):
    return tokenizer.decode([rng.randrange(300, 20000) for _ in range(n)])


@pytest.fixture(scope="module")
def run(tmp_path_factory, anisotropic_dir, tokenizer):
    """A recipe whose run folder holds train/dev/test splits; dev and test records carry a sentinel."""
    root, rng = tmp_path_factory.mktemp("run"), random.Random(0)
    recipe = load_recipe({"name": "int4", "output_dir": str(root), "model": {"name_or_path": str(anisotropic_dir)},
                          "data": {"max_length": 64}})
    data = recipe.run_dir / "data"
    data.mkdir(parents=True)
    for split, count in (("train", TRAIN), ("dev", 4), ("test", 8)):
        mark = "" if split == "train" else " SENTINEL"
        records = [{"id": f"{split}-{i}", "messages": [
            {"role": "user", "content": random_text(tokenizer, rng, 24) + mark},
            {"role": "assistant", "content": random_text(tokenizer, rng, 8)}]} for i in range(count)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return recipe


@pytest.fixture(scope="module")
def calibration(run, tokenizer):
    return calibration_samples(run, tokenizer, 64)


@pytest.fixture(scope="module")
def held_out(run, tokenizer):
    """The test split's records, encoded as calibration encodes the train split's, cut to one length."""
    template = get_template(run.model.template, tokenizer)
    encoded = [encode_conversation(tokenizer, template, r["messages"], r["id"], 64).input_ids
               for r in load_split(run.run_dir / "data", "test")]
    return torch.tensor([ids[:32] for ids in encoded])


@pytest.fixture(scope="module")
def fp32(anisotropic_dir):
    return AutoModelForCausalLM.from_pretrained(anisotropic_dir, dtype=torch.float32).eval()


def logits_error(model, reference, ids) -> float:
    with torch.no_grad():
        return float(((model(ids).logits - reference(ids).logits) ** 2).mean())


def test_rtn_codes_are_fake_quantize_int4():
    torch.manual_seed(0)
    weight = torch.randn(24, 40) * torch.exp(torch.randn(40))  # 40: the last block is partial
    weight[0, :16] = torch.tensor([1.0, -1.0] * 8)  # a tie of magnitudes: the negative one sets the scale
    weight[1, 16:32] = 0.0  # an all-zero block
    codes, scales = rtn_codes(weight, BLOCK)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 48) and scales.shape == (24, 3)
    assert torch.equal(dequantize(codes, scales, 40), fake_quantize_int4(weight, BLOCK))
    assert (codes[:, 40:] == 8).all() and (codes <= 15).all()


def test_gptq_and_awq_beat_rtn_on_held_out_tokens(fp32, calibration, held_out):
    rtn = copy.deepcopy(fp32)
    rtn_model(rtn, BLOCK)
    gptq = copy.deepcopy(fp32)
    gptq_model(gptq, calibration.samples, BLOCK)
    awq = copy.deepcopy(fp32)
    alphas = awq_transform(awq, calibration.samples, BLOCK)
    rtn_model(awq, BLOCK)
    errors = {name: logits_error(model, fp32, held_out) for name, model in
              (("rtn", rtn), ("gptq", gptq), ("awq", awq))}
    # Logits MSE here: RTN 0.709, GPTQ 0.461, AWQ 0.456 (alphas 0.3-0.4).
    assert errors["gptq"] < 0.9 * errors["rtn"] and errors["awq"] < 0.9 * errors["rtn"], errors
    # Neither is a no-op: GPTQ's weights are not RTN's, and AWQ chose scales (alpha > 0) somewhere.
    first = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(gptq.state_dict()[first], rtn.state_dict()[first])
    assert any(a["alpha"] > 0 for a in alphas)


def test_gptq_without_correlations_is_rtn():
    """With a diagonal H no error has anywhere to go: GPTQ must round exactly as RTN does."""
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    codes, scales = gptq_codes(weight, torch.diag(torch.rand(32) + 0.5), BLOCK, percdamp=0.0)
    rtn = rtn_codes(weight, BLOCK)
    assert torch.equal(codes, rtn[0]) and torch.equal(scales, rtn[1])


def test_awq_transform_keeps_the_fp32_logits(fp32, calibration, held_out):
    ids = held_out[:2]
    exact = copy.deepcopy(fp32).double()
    awq_transform(exact, calibration.samples[:8], BLOCK)
    with torch.no_grad():  # in float64 the folded scales cancel exactly, up to float64 rounding
        reference = copy.deepcopy(fp32).double()(ids).logits
        assert float((exact(ids).logits - reference).abs().max()) < 1e-9
    single = copy.deepcopy(fp32)
    awq_transform(single, calibration.samples, BLOCK)
    with torch.no_grad():
        before, after = fp32(held_out).logits, single(held_out).logits
    # float32 rounding of the rescaled weights only: 1e-5 of the logits' range.
    assert float((after - before).abs().max()) < 1e-5 * float(before.abs().max())
    assert not torch.equal(single.model.layers[0].input_layernorm.weight, fp32.model.layers[0].input_layernorm.weight)


def decoded_weights(folder, nodes):
    """The dequantized weight of each named 4-bit MatMulNBits node of folder/model.onnx, and its raw bytes."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(folder / "model.onnx").graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.name in nodes:
            packed, scales = values[node.input[1]], values[node.input[2]]
            rows = packed.shape[0]
            codes = np.stack([packed & 15, packed >> 4], -1).reshape(rows, -1)
            out[node.name] = (codes, dequantize(torch.from_numpy(codes.astype(np.uint8)),
                                                torch.from_numpy(scales.reshape(rows, -1)), codes.shape[1]))
    return out


def ort_logits_error(folder, reference, ids) -> float:
    """Teacher-forced logits of the export (onnxruntime-genai, one token at a time) against the HF model's."""
    import onnxruntime_genai as og

    model, total = og.Model(str(folder)), []
    with torch.no_grad():
        expected = reference(ids).logits
    for row, want in zip(ids, expected):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(row) + 1)
        generator = og.Generator(model, params)
        for position, token in enumerate(row.tolist()):
            generator.append_tokens(np.asarray([[token]], dtype=np.int32))
            got = torch.from_numpy(generator.get_logits()[0, -1].copy())
            total.append(float(((got - want[position]) ** 2).mean()))
    return float(np.mean(total))


def test_gptq_export_writes_gptq_codes_and_beats_plain_int4(anisotropic_dir, fp32, calibration, held_out, tmp_path):
    plain = export_onnx(anisotropic_dir, tmp_path / "int4", "int4")
    calibrated = export_onnx(anisotropic_dir, tmp_path / "int4-gptq", "int4-gptq", calibration=calibration)
    record = json.loads((calibrated / "dstune_onnx.json").read_text())["calibration"]
    nodes = int4_layer_nodes(plain / "model.onnx")
    assert sorted(nodes) == record["gptq_nodes"] and "/model/layers.1/attn/qkv_proj/MatMul_Q4" in nodes
    assert record["scheme"] == "gptq" and record["block_size"] == BLOCK
    assert record["samples"] == len(calibration.samples) == 24 and record["split"] == "train"
    assert record["ids_sha256"] == calibration.manifest()["ids_sha256"]
    # The same bytes as plain int4: only the rounding changed.
    sizes = [sum(p.stat().st_size for p in folder.glob("model.onnx*")) for folder in (plain, calibrated)]
    assert abs(sizes[0] - sizes[1]) < 1024
    # Plain int4 is the builder's RTN in our packing (checks the layout and the fused qkv order) ...
    weights = {n: p.weight.detach() for n, p in fp32.named_modules() if hasattr(p, "weight")}
    builder = decoded_weights(plain, nodes)
    for node, (layer, linears) in nodes.items():
        stacked = torch.cat([weights[f"model.layers.{layer}.{name}"] for name in linears])
        assert np.array_equal(builder[node][0], pack_and_unpack(rtn_codes(stacked, BLOCK)[0]))
    # ... and the calibrated export decodes exactly to GPTQ's weights.
    model = copy.deepcopy(fp32)
    only = {f"model.layers.{layer}.{name}" for layer, linears in nodes.values() for name in linears}
    codes = gptq_model(model, calibration.samples, BLOCK, only=only)
    written = decoded_weights(calibrated, nodes)
    for node, (layer, linears) in nodes.items():
        ours, scales = _stacked(codes, layer, linears)
        assert torch.equal(written[node][1], dequantize(ours, scales, ours.shape[1]))
        assert not np.array_equal(written[node][0], builder[node][0])
    # Against fp32 with the int4 embedding and LM head that both exports share (RTN, untouched by calibration):
    # here they dominate the error (0.98 of 1.0 in torch), which would hide what the layers' rounding changed.
    shared = with_int4_head(fp32)
    awq = export_onnx(anisotropic_dir, tmp_path / "int4-awq", "int4-awq", calibration=calibration)
    errors = {folder.name: ort_logits_error(folder, shared, held_out[:4]) for folder in (plain, calibrated, awq)}
    # Here: int4 0.228, int4-gptq 0.058, int4-awq 0.198.
    assert errors["int4-gptq"] < 0.9 * errors["int4"] and errors["int4-awq"] < 0.9 * errors["int4"], errors


def with_int4_head(fp32):
    """The fp32 model with the LM head and embedding every int4 export shares (RTN)."""
    shared = copy.deepcopy(fp32)
    with torch.no_grad():
        for weight in (shared.lm_head.weight, shared.model.embed_tokens.weight):
            weight.copy_(fake_quantize_int4(weight, BLOCK))
    return shared


def int8_weights(folder, nodes):
    """Each named 8-bit MatMulNBits node's codes [N, blocks, block] and scales [N, blocks]."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(folder / "model.onnx").graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.name: (values[n.input[1]], values[n.input[2]].reshape(values[n.input[1]].shape[:2]))
            for n in graph.node if n.name in nodes}


def pack_and_unpack(codes):
    packed = pack_int4(codes)
    return np.stack([packed & 15, packed >> 4], -1).reshape(codes.shape[0], -1)


def test_calibration_reads_the_train_split_only(run, tokenizer, monkeypatch):
    read = []
    original = calibrate.load_split
    monkeypatch.setattr(calibrate, "load_split", lambda folder, split: read.append(split) or original(folder, split))
    found = calibration_samples(run, tokenizer, 1000)
    assert read == ["train"]
    assert len(found.ids) == 24 and all(i.startswith("train-") for i in found.ids)
    assert not any("SENTINEL" in tokenizer.decode(s[0]) for s in found.samples)
    few = calibration_samples(run, tokenizer, 6)
    assert few.ids == [f"train-{i}" for i in range(0, 24, 4)]  # spread over the split, not its head


def test_export_and_score_passes_calibration_to_calibrated_quants_only(run, anisotropic_dir, monkeypatch):
    from dstune.export import artifacts
    from dstune.export.formats import ExportFormat

    seen = {}

    class Stop(Exception):
        pass

    def export(merged_dir, out_dir, quant, **kwargs):
        seen[quant] = kwargs.get("calibration")
        raise Stop

    fake = ExportFormat(name="fake", quants=("plain", "calibrated"), description="", export=export, load=None,
                        calibrated=("calibrated",))
    monkeypatch.setattr(artifacts, "get_format", lambda name, quant: fake)
    for quant in fake.quants:
        with pytest.raises(Stop):
            artifacts.export_and_score(run, f"fake:{quant}", anisotropic_dir, {})
    assert seen["plain"] is None
    assert seen["calibrated"].ids == [f"train-{i}" for i in range(TRAIN)]  # export.calibration_samples: 128 > 24


def test_qwen2_layers_calibrate_too(tiny_model_dirs, calibration):
    """Qwen2 (q/k/v biases) is the exporter's other architecture: AWQ keeps its float64 logits, GPTQ runs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2"], dtype=torch.float64).eval()
    samples, ids = calibration.samples[:6], calibration.samples[6][:, :24]
    with torch.no_grad():
        before = model(ids).logits
    awq_transform(model, samples, BLOCK)
    with torch.no_grad():
        assert float((model(ids).logits - before).abs().max()) < 1e-9
    codes = gptq_model(model.float(), samples, BLOCK)
    assert len(codes) == 7 * len(model.model.layers)


def test_sensitivity_scan_equals_one_matmul_quantized_in_a_full_forward(fp32, calibration):
    """The scan runs each node from its own layer's cached inputs, right-padded in batches: its divergence must
    equal KL(fp32 || model with only that node in int4) from whole forward passes, one sample at a time, on the
    supervised tokens (here with every token in the top k, so the exact KL)."""
    samples, labels = calibration.samples[:8], calibration.labels[:8]
    nodes = {"/model/layers.1/attn/qkv_proj/MatMul_Q4": (1, NODE_LINEARS["attn/qkv_proj"]),
             "/model/layers.0/mlp/down_proj/MatMul_Q4": (0, NODE_LINEARS["mlp/down_proj"])}
    before = {k: v.clone() for k, v in fp32.state_dict().items()}
    deltas = scan(fp32, samples, labels, BLOCK, nodes, k=fp32.config.vocab_size)
    assert all(torch.equal(v, before[k]) for k, v in fp32.state_dict().items())  # the model is left unchanged

    def logprobs(model):
        with torch.no_grad():
            return torch.cat([model(ids).logits[0, :-1][target[0, 1:] != -100].log_softmax(-1)
                              for ids, target in zip(samples, labels)])

    reference = logprobs(fp32)
    assert len(reference) == sum(int((t[0, 1:] != -100).sum()) for t in labels) > 0
    for name, (layer, linears) in nodes.items():
        model = copy.deepcopy(fp32)
        with torch.no_grad():
            for linear in linears:
                weight = model.model.layers[layer].get_submodule(linear).weight
                weight.copy_(fake_quantize_int4(weight, BLOCK))
        exact = float((reference.exp() * (reference - logprobs(model))).sum(-1).mean())
        assert exact > 1e-5 and abs(deltas[name] - exact) < 1e-3 * exact + 1e-7, (name, deltas[name], exact)


def test_placement_takes_the_most_sensitive_nodes_that_fit():
    deltas = {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.0, "e": -0.1}
    costs = {"a": 10, "b": 30, "c": 10, "d": 1, "e": 1}
    placed = place(deltas, costs, budget=25)
    assert placed.int8 == ["a", "c"] and placed.extra_bytes == 20  # b does not fit; d and e gain nothing
    assert place(deltas, costs, budget=1000).int8 == ["a", "b", "c"]
    assert place(deltas, costs, budget=5).int8 == []


def int8_nodes(folder) -> set[str]:
    import onnx

    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    return {n.name for n in graph.node if n.op_type == "MatMulNBits"
            and next(a.i for a in n.attribute if a.name == "bits") == 8}


def test_mixed_export_keeps_exactly_the_nodes_it_reports_in_int8(anisotropic_dir, fp32, calibration, held_out,
                                                                  tmp_path, monkeypatch):
    import dataclasses

    from dstune.export.artifacts import weight_bytes

    # Every node that gains from int8 fits in the whole fp32 size: this measures the costs and the int4-only size.
    full = export_onnx(anisotropic_dir, tmp_path / "full", "int4-mixed",
                       calibration=dataclasses.replace(calibration, max_size=1.0))
    measured = json.loads((full / "dstune_onnx.json").read_text())["calibration"]
    ranking = list(measured["sensitivity"]["delta_loss"])
    assert int8_nodes(full) == set(measured["int8_nodes"]) and len(ranking) == 2 * 5  # tiny: 2 layers of 5 nodes
    # The next export of the same weights and samples reuses the scan (a --quant int4 choice writes two mixed ones).
    from dstune.export import sensitivity

    monkeypatch.setattr(sensitivity, "scan", lambda *args, **kwargs: pytest.fail("the scan ran again"))
    # A budget of half the int8 growth: some nodes, not all, and the most sensitive ones first.
    fp32_bytes = weight_bytes(anisotropic_dir)
    half = (measured["int4_only_bytes"] + measured["int8_extra_bytes"] // 2) / fp32_bytes
    mixed = export_onnx(anisotropic_dir, tmp_path / "mixed", "int4-gptq-mixed",
                        calibration=dataclasses.replace(calibration, max_size=half))
    record = json.loads((mixed / "dstune_onnx.json").read_text())["calibration"]
    kept = record["int8_nodes"]
    assert 0 < len(kept) < len(measured["int8_nodes"])
    assert int8_nodes(mixed) == set(kept)
    assert kept[0] == ranking[0] and record["sensitivity"] == measured["sensitivity"]
    assert weight_bytes(mixed) <= half * fp32_bytes
    assert sorted(record["gptq_nodes"]) == sorted(set(ranking) - set(kept))
    assert json.loads((mixed / "dstune_onnx.json").read_text())["builder_options"].get("matmul_mixed_precision") is None
    # The int8 nodes carry the fp32 weights to within half an int8 step, and the export computes with them:
    # closer to fp32 than the same graph all in int4 (shared int4 embedding and head, as above).
    weights = {n: p.weight.detach() for n, p in fp32.named_modules() if hasattr(p, "weight")}
    for node, (codes, scales) in int8_weights(mixed, kept).items():
        layer, linears = int(node.split("layers.")[1].split("/")[0]), NODE_LINEARS["/".join(node.split("/")[3:5])]
        stacked = torch.cat([weights[f"model.layers.{layer}.{name}"] for name in linears]).numpy()
        width = stacked.shape[1]
        dequantized = ((codes.astype(np.float32) - 128) * scales[..., None]).reshape(len(codes), -1)[:, :width]
        step = np.abs(scales).repeat(BLOCK, 1)[:, :width]
        assert (np.abs(dequantized - stacked) <= step / 2 + 1e-7).all(), node
    shared = with_int4_head(fp32)
    gptq = export_onnx(anisotropic_dir, tmp_path / "int4-gptq", "int4-gptq", calibration=calibration)
    errors = {f.name: ort_logits_error(f, shared, held_out[:4]) for f in (full, mixed, gptq)}
    # Here: full (10 of 10 int8) 0.022, mixed (5 int8, GPTQ on the rest) 0.043, int4-gptq 0.058.
    assert errors["full"] < errors["mixed"] < errors["int4-gptq"], errors


def test_auto_quant_chooses_on_dev_and_scores_the_choice_on_test(run, anisotropic_dir, monkeypatch):
    """onnx:int4 stands for a choice: every scheme is exported and scored on dev, the best passing one is kept,
    and only that one is scored on test (choosing on test would flatter its test score)."""
    from dstune.export import artifacts
    from dstune.export.formats import ExportFormat
    from dstune.models import loading

    metric = run.eval.metrics[0]
    dev = {"fp32": 0.5, "a": 0.40, "b": 0.495, "c": 0.492}  # a fails the 0.98 gate; b is the best that passes
    test = {"fp32": 0.5, "a": 0.5, "b": 0.49, "c": 0.5}  # a and c would look better on test
    exported, evaluated = [], []

    def export(merged_dir, out_dir, quant, **kwargs):
        exported.append(quant)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.onnx").write_bytes(b"x" * {"a": 10, "b": 20, "c": 30}[quant])
        return out_dir

    def evaluate(recipe, model, tokenizer, records, progress=None):
        split = {r["id"].split("-")[0] for r in records}
        assert len(split) == 1
        evaluated.append((model, split.pop()))
        score = (dev if evaluated[-1][1] == "dev" else test)[model]
        return {"metrics": {metric: score}, "predictions": [{"got": str(score)}] * len(records),
                "generated_tokens": 0}

    fake = ExportFormat(name="fake", quants=("best", "a", "b", "c"), description="", export=export,
                        load=lambda artifact, merged: (artifact.name.split("-")[1], None),
                        auto={"best": ("a", "b", "c")})
    monkeypatch.setattr(artifacts, "get_format", lambda name, quant: fake)
    monkeypatch.setattr(artifacts, "evaluate_tiers", evaluate)
    monkeypatch.setattr(artifacts, "write_eval", lambda result, path: None)
    monkeypatch.setattr(loading, "load_model", lambda *args: "fp32")
    monkeypatch.setattr(loading, "load_tokenizer", lambda *args: None)
    stale = run.run_dir / "exports" / "fake-a" / "dstune_export.json"  # an earlier export's record
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("{}")
    record = artifacts.export_and_score(run, "fake:best", anisotropic_dir, {"metrics": {metric: 0.5},
                                                                            "predictions": []})
    assert exported == ["a", "b", "c"]
    assert evaluated == [("fp32", "dev"), ("a", "dev"), ("b", "dev"), ("c", "dev"), ("b", "test")]
    assert record["quant"] == "b" and record["requested"] == "best" and record["score"] == 0.49
    assert record["retention"] == 0.98 and record["passed"]
    selection = record["selection"]
    assert selection["chosen"] == "b" and selection["split"] == "dev" and selection["any_passed"]
    assert [(c["quant"], c["dev_retention"], c["passed"]) for c in selection["candidates"]] == [
        ("a", 0.8, False), ("b", 0.99, True), ("c", 0.984, True)]
    for folder in ("fake-b", "fake-best"):
        assert json.loads((run.run_dir / "exports" / folder / "dstune_export.json").read_text())["quant"] == "b"
    assert not stale.exists()  # a was rewritten and not scored on test: no record may describe it


def test_onnxruntime_quantizers_rewrite_every_matmul(anisotropic_dir, fp32, held_out, tmp_path):
    """onnxruntime's HQQ and k-quant rows: every MatMul becomes asymmetric 4-bit MatMulNBits (zero points given),
    the embedding Gather stays fp32, and the graph runs in onnxruntime-genai."""
    import onnx

    plain = export_onnx(anisotropic_dir, tmp_path / "int4", "int4")
    errors = {"int4": ort_logits_error(plain, fp32, held_out[:2])}
    for quant in ("int4-ort-hqq", "int4-ort-kquant"):
        folder = export_onnx(anisotropic_dir, tmp_path / quant, quant)
        graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
        assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1].endswith("weight")]
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 * 5 + 1  # two layers' qkv, o, gate, up, down, and the LM head
        for node in nbits:
            attributes = {a.name: a.i for a in node.attribute}
            assert attributes["bits"] == 4 and attributes["block_size"] == 16 and len(node.input) >= 4 and node.input[3]
        assert [n.op_type for n in graph.node if "Gather" in n.op_type and "embed" in n.name] == ["Gather"]
        manifest = json.loads((folder / "dstune_onnx.json").read_text())
        assert manifest["quantizer"]["algorithm"] == {"int4-ort-hqq": "hqq", "int4-ort-kquant": "k_quant"}[quant]
        errors[quant] = ort_logits_error(folder, fp32, held_out[:2])
    # With the fp32 embedding and zero points they are closer to fp32 than the builder's int4 (and larger).
    assert errors["int4-ort-hqq"] < errors["int4"] and errors["int4-ort-kquant"] < errors["int4"], errors
