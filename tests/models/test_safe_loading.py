"""Pickle weights: refused by default; when allowed, unpickled only by torch's weights_only unpickler.

The payloads are real: unpickled by `pickle.loads` (or `torch.load(weights_only=False)`) they create a marker file.
"""

import json
import pickle
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dstune import api
from dstune.tuners.lora import LoraOptions
from dstune.errors import InputError
from dstune.models import safety
from dstune.models.loading import load_model, resolve_model_path
from dstune.tuners.lora import add_lora
from dstune.tuners.methods import load_adapters

from cli_runner import run_cli


class Payload:
    """What a malicious weight file can do on unpickling: here, only create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def pickles_refused(monkeypatch):
    monkeypatch.delenv("DSTUNE_ALLOW_PICKLE", raising=False)
    safety.allow_pickle(False)
    yield
    safety.allow_pickle(False)


def pickled_copy(src, dst, weights, pickle_name, content):
    """A copy of an adapter/model folder whose safetensors weights are replaced by a pickle file."""
    shutil.copytree(src, dst)
    (dst / weights).unlink()
    if isinstance(content, bytes):
        (dst / pickle_name).write_bytes(content)
    else:
        torch.save(content, dst / pickle_name)
    return dst


def test_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # so its absence below means the payload never ran


def test_cli_refuses_pickle_adapter_and_payloads_even_with_allow_pickle(tiny_recipe, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={"max_steps": 2})))
    adapter = api.train(str(recipe)).adapter_dir
    marker = tmp_path / "marker"
    weights = "adapter_model.safetensors"
    pickled = pickled_copy(adapter, tmp_path / "pickled", weights, "adapter_model.bin", pickle.dumps(Payload(marker)))
    torched = pickled_copy(adapter, tmp_path / "torched", weights, "adapter_model.bin", {"w": Payload(marker)})
    legit = pickled_copy(adapter, tmp_path / "legit", weights, "adapter_model.bin", load_file(adapter / weights))
    to_convert = shutil.copytree(legit, tmp_path / "to-convert")
    eval_ = ["eval", str(recipe), "--adapter"]
    refused, allowed_pickle, allowed_torch, on_bin, on_safetensors, legit_refused, converted, not_converted = run_cli([
        eval_ + [str(pickled)], eval_ + [str(pickled), "--allow-pickle"], eval_ + [str(torched), "--allow-pickle"],
        eval_ + [str(legit), "--allow-pickle", "--tag", "bin"], eval_ + [str(adapter), "--tag", "safetensors"],
        eval_ + [str(legit)], ["convert-weights", str(to_convert)], ["convert-weights", str(torched)],
    ])
    for result, folder in ((refused, pickled), (legit_refused, legit)):
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"dstune: error: {folder / 'adapter_model.bin'}: pickle weight file refused (unpickling can run code); "
            f"convert it once with `dstune convert-weights {folder / 'adapter_model.bin'}` (loads with "
            "weights_only=True, writes safetensors), or pass --allow-pickle (DSTUNE_ALLOW_PICKLE=1 for the Python API)"]
    for result, folder in ((allowed_pickle, pickled), (allowed_torch, torched)):
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"dstune: error: {folder / 'adapter_model.bin'}: refused to unpickle")
        assert "Unsupported" in result.stderr
    assert not_converted.returncode == 2 and "refused to unpickle" in not_converted.stderr, not_converted.stderr
    assert not marker.exists()
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == f"dstune: wrote {to_convert / weights}\n"
    reference = load_file(adapter / weights)
    assert all(torch.equal(load_file(to_convert / weights)[k], v) for k, v in reference.items())
    assert on_bin.returncode == 0 and on_safetensors.returncode == 0, on_bin.stderr + on_safetensors.stderr
    assert on_bin.stdout.startswith("exact_match: ") and on_bin.stdout == on_safetensors.stdout
    evals = tmp_path / "runs" / "tiny" / "eval"
    predictions = [json.loads((evals / f"{tag}.json").read_text())["predictions"] for tag in ("bin", "safetensors")]
    assert predictions[0] == predictions[1]


def adapter_dir(tiny_model_dirs, tmp_path):
    """A LoRA adapter with non-zero B (so it changes the logits), saved as safetensors."""
    torch.manual_seed(1)
    model = add_lora(load_model(tiny_model_dirs["llama"]), LoraOptions(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 12).unsqueeze(0)).logits


def test_python_api_follows_env_and_convert_weights_round_trips(tiny_model_dirs, tmp_path, monkeypatch):
    adapter = adapter_dir(tiny_model_dirs, tmp_path)
    state = load_file(adapter / "adapter_model.safetensors")
    legit = pickled_copy(adapter, tmp_path / "legit", "adapter_model.safetensors", "adapter_model.bin", state)
    base = tiny_model_dirs["llama"]
    expected = logits(load_adapters(load_model(base), {"a": adapter}))
    with pytest.raises(InputError, match="pickle weight file refused"):
        load_adapters(load_model(base), {"a": legit})
    monkeypatch.setenv("DSTUNE_ALLOW_PICKLE", "1")
    assert torch.equal(logits(load_adapters(load_model(base), {"a": legit})), expected)
    monkeypatch.delenv("DSTUNE_ALLOW_PICKLE")
    assert safety.convert_to_safetensors(legit) == [legit / "adapter_model.safetensors"]
    converted = load_file(legit / "adapter_model.safetensors")
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    assert torch.equal(logits(load_adapters(load_model(base), {"a": legit})), expected)


def test_pickle_model_dir_refused_then_loaded_weights_only_then_converted(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["llama"]
    state = load_file(src / "model.safetensors")
    legit = pickled_copy(src, tmp_path / "legit", "model.safetensors", "pytorch_model.bin", state)
    marker = tmp_path / "marker"
    evil = pickled_copy(src, tmp_path / "evil", "model.safetensors", "pytorch_model.bin", {"w": Payload(marker)})
    with pytest.raises(InputError, match="pickle weight file refused.*dstune convert-weights"):
        resolve_model_path(str(legit))
    safety.allow_pickle(True)
    with pytest.raises(InputError, match="pytorch_model.bin: refused to unpickle"):
        resolve_model_path(str(evil))
    with pytest.raises(InputError, match="refused to unpickle"):  # load_model checks too, resolved or not
        load_model(evil)
    assert not marker.exists()
    expected = logits(load_model(src))
    assert torch.equal(logits(load_model(resolve_model_path(str(legit)))), expected)
    safety.allow_pickle(False)
    assert safety.convert_to_safetensors(legit) == [legit / "model.safetensors"]
    assert torch.equal(logits(load_model(resolve_model_path(str(legit)))), expected)


def test_tied_weights_convert(tmp_path):
    shared = torch.randn(4, 3)
    torch.save({"embed.weight": shared, "lm_head.weight": shared}, tmp_path / "pytorch_model.bin")
    out = load_file(safety.convert_to_safetensors(tmp_path / "pytorch_model.bin")[0])
    assert torch.equal(out["embed.weight"], shared) and torch.equal(out["lm_head.weight"], shared)
