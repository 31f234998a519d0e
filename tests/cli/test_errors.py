"""Errors a user can act on: one line `dstune: error: ...` on stderr, exit 2 for bad input, no traceback."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from cli_runner import run_cli

CUSTOM_CODE = '''
open({marker!r}, "w").close()  # what a model's own code could do on import
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "dstune_custom"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
'''


def write_gguf(path, architecture):
    """A minimal GGUF file of the given architecture (one tensor)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def custom_code_model(src, dst, marker):
    """A copy of a tiny Llama whose config asks for its own Python code (which would create `marker`)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="dstune_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom_model.CustomConfig",
                            "AutoModelForCausalLM": "custom_model.CustomModel"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "custom_model.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return dst


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_model_dirs, tokenizer_dir):
    """Each error situation run once through the CLI (forked children of one process that imported dstune)."""
    tmp = tmp_path_factory.mktemp("errors")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(8)))
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dirs["llama"] / "config.json", no_weights)
    marker = tmp / "marker"
    paths = {
        "data": tmp / "nope.jsonl", "adapter": tmp / "no-adapter", "model": tmp / "no-model",
        "no_weights": no_weights, "gguf": write_gguf(tmp / "tiny-rwkv6.gguf", "rwkv6"),
        "custom": custom_code_model(tiny_model_dirs["llama"], tmp / "custom", marker), "marker": marker,
        # The same code in a recipe that trusts it: the control that shows the marker appears when it runs.
        "trusted": custom_code_model(tiny_model_dirs["llama"], tmp / "trusted", tmp / "trusted-marker"),
        "trusted_marker": tmp / "trusted-marker",
        "invalid": tmp / "invalid.yaml",
    }

    def recipe(name, model=tiny_model_dirs["llama"], train_file=data, trust_remote_code=False):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "output_dir": str(tmp / "runs"),
            "model": {"name_or_path": str(model), "trust_remote_code": trust_remote_code},
            "data": {"source": "files", "train_file": str(train_file), "max_length": 64},
        }))
        return str(path)

    chat = ["--prompt", "hi", "--max-new-tokens", "2"]
    commands = {
        "data_file": ["data", recipe("data", train_file=paths["data"])],
        "adapter": ["chat", recipe("adapter"), "--adapter", str(paths["adapter"]), *chat],
        "model": ["chat", recipe("model"), "--model", str(paths["model"]), *chat],
        "no_weights": ["chat", recipe("no_weights", model=no_weights), *chat],
        "gguf": ["chat", recipe("gguf", model=paths["gguf"]), *chat],
        "remote_code": ["chat", recipe("remote_code", model=paths["custom"]), *chat],
        "invalid": ["chat", recipe("invalid"), "train.lora.r=many", *chat],
        "trusted": ["chat", recipe("trusted", model=paths["trusted"], trust_remote_code=True), *chat],
    }
    env = {"DSTUNE_CACHE": str(tmp / "cache"), "HF_MODULES_CACHE": str(tmp / "hf-modules")}
    # fresh: HF_MODULES_CACHE is read when transformers is imported, so the driver must start with it.
    return dict(zip(commands, run_cli(list(commands.values()), env=env, fresh=True))), commands, paths


@pytest.mark.parametrize("case, message", [
    ("data_file", "{data}: data file not found"),
    ("adapter", "{adapter}: adapter folder not found"),
    ("model", "{model}: model not found (neither a local directory, a .gguf file, nor one of: smollm2-135m-instruct)"),
    ("no_weights", "{no_weights}: no weights in this model directory (no *.safetensors, no pytorch_model*.bin)"),
    ("remote_code", "{custom}: this model needs its own Python code (custom_model.py), which dstune runs only when "
                    "the recipe sets model.trust_remote_code: true (read that code first)"),
    ("invalid", "{invalid}: train.lora.r: Input should be a valid integer"),
])
def test_bad_input_is_one_line_exit_2(cases, case, message):
    results, _, paths = cases
    result = results[case]
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("dstune: error: " + message.format(**paths)), result.stderr


def test_unsupported_gguf_names_file_architecture_and_supported_ones(cases):
    results, _, paths = cases
    result = results["gguf"]
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"dstune: error: {paths['gguf']}: GGUF architecture 'rwkv6' is not supported by "
                                    "transformers 5.")
    supported = result.stderr.split("(supported: ")[1].split(")")[0].split(", ")
    assert {"llama", "qwen2", "mistral"} <= set(supported) and "general" not in supported


def test_remote_code_never_runs_unless_the_recipe_trusts_it(cases):
    results, _, paths = cases
    assert results["remote_code"].returncode == 2 and not paths["marker"].exists()
    assert results["trusted"].returncode == 0, results["trusted"].stderr
    assert paths["trusted_marker"].exists()


def test_forked_runner_sees_what_a_fresh_process_sees(cases):
    results, commands, _ = cases
    proc = subprocess.run([sys.executable, "-m", "dstune", *commands["model"]], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (results["model"].returncode, results["model"].stderr)
