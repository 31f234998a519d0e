"""`dstune serve` from the command line: errors before the model loads, and the vLLM path up to its command."""

from __future__ import annotations

import json

import pytest
import yaml

from cli_runner import run_cli
from serving import make_lora


@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory, tiny_model_dirs):
    """Adapters vLLM's loader refuses, each for one reason."""
    root = tmp_path_factory.mktemp("odd-adapters")
    base = tiny_model_dirs["llama"]
    return {"rank32": make_lora(base, root / "rank32", 3, r=32),
            "dora": make_lora(base, root / "dora", 3, use_dora=True),
            "saves_head": make_lora(base, root / "saves_head", 3, modules_to_save=["lm_head"])}


def test_vllm_check_mirrors_its_loader(adapters, odd_adapters, tmp_path):
    from dstune.serve.vllm import vllm_problems

    assert vllm_problems(adapters["alpha"], 16) == []
    assert vllm_problems(odd_adapters["rank32"], 16) == ["rank 32 is over --max-lora-rank 16 (pass --max-lora-rank 32)"]
    assert vllm_problems(odd_adapters["rank32"], 32) == []
    assert any("DoRA" in p for p in vllm_problems(odd_adapters["dora"], 16))
    assert any("modules_to_save ['lm_head']" in p for p in vllm_problems(odd_adapters["saves_head"], 16))
    edited = tmp_path / "edited"
    edited.mkdir()
    config = json.loads((adapters["alpha"] / "adapter_config.json").read_text())
    for change, expected in (({"bias": "all"}, "bias='all'"), ({"target_modules": ["q_proj", "wqkv"]}, "['wqkv']"),
                             ({"init_lora_weights": "pissa"}, "pissa"), ({"peft_type": "IA3"}, "LoRA adapters only"),
                             ({"rank_pattern": {"v_proj": 64}}, "rank 64")):
        (edited / "adapter_config.json").write_text(json.dumps({**config, **change}))
        problems = vllm_problems(edited, 16)
        assert len(problems) == 1 and expected in problems[0], (change, problems)


@pytest.mark.parametrize("name", ["chatml", "deepseek-r1", "llama3", "auto"])
def test_the_template_written_for_vllm_renders_as_dstune(name, tokenizer):
    from dstune.data.templates import get_template
    from dstune.serve.vllm import jinja_template

    template = get_template(name, tokenizer)
    conversations = [[{"role": "user", "content": "Acute bronchitis"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "J20"}, {"role": "user", "content": "b"}]]
    for system in (None, "Answer with the code."):
        jinja = jinja_template(template, system, tokenizer)
        for messages in conversations:
            ours = messages if system is None or messages[0]["role"] == "system" else \
                [{"role": "system", "content": system}, *messages]
            theirs = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                   add_generation_prompt=True)
            assert theirs == template.prompt_text(ours), (name, system, messages)


def test_cli(tmp_path, serve_recipe, adapters, odd_adapters):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(serve_recipe.model_dump(mode="json")))
    alpha = str(adapters["alpha"])
    results = run_cli([
        ["serve", str(recipe), "--engine", "vllm", "--dry-run", "--adapter", f"icd={alpha}", "--tp", "4"],
        ["serve", str(recipe), "--engine", "vllm", "--dry-run", "--adapter", f"big={odd_adapters['rank32']}"],
        ["serve", str(recipe), "--engine", "vllm", "--adapter", f"icd={alpha}"],  # vLLM is not installed here
        ["serve", str(recipe), "--adapter", f"a={alpha}", "--adapter", f"a={alpha}"],
        ["serve", str(recipe), "--adapter", "x=/no/such/folder"],
        ["serve", str(recipe), "--max-queue", "0"],
        ["serve", str(recipe), "--port", "70000"],
        ["serve", str(recipe), "--engine", "vllm", "--max-lora-rank", "20", "--dry-run"],
        ["serve", str(recipe), "--engine", "onnx"],
        ["serve", str(recipe), "--engine", "onnx", "--model", alpha],
        ["serve", str(recipe), "--tp", "2"],
        ["serve", "--help"],
    ])
    dry, big, missing, twice, absent, queue, port, rank, no_export, not_export, torch_tp, helped = results
    assert dry.returncode == 0, dry.stderr
    command = dry.stdout.strip().splitlines()[-1].split()
    assert command[:2] == ["vllm", "serve"] and "--enable-lora" in command
    assert command[command.index("--lora-modules") + 1] == f"icd={alpha}"
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--tensor-parallel-size") + 1] == "4"  # --tp reaches vLLM
    template = command[command.index("--chat-template") + 1]
    assert "You code diagnoses." in open(template).read()
    for result, needle in ((big, "rank 32 is over --max-lora-rank 16 (pass --max-lora-rank 32)"),
                           (missing, "vLLM is not installed here"), (twice, "the name 'a' is given twice"),
                           (absent, "/no/such/folder: adapter folder not found"), (queue, "--max-queue must be"),
                           (port, "not a port number"), (rank, "--max-lora-rank 20: vLLM takes one of"),
                           (no_export, "--engine onnx: --model names the ONNX export folder"),
                           (not_export, "not an ONNX export folder (no genai_config.json)"),
                           (torch_tp, "--tp: the server shards a model through vLLM")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and needle in lines[-1] and "Traceback" not in result.stderr, result.stderr
    assert helped.returncode == 0 and "--max-queue" in helped.stdout and "429" in helped.stdout
