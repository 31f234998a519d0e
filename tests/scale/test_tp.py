"""Tensor-parallel inference on 2 CPU processes (gloo): logits and greedy answers as on one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_cli

SRC = str(Path(__file__).parents[2] / "src")


@pytest.mark.slow
def test_tp2_logits_and_greedy_tokens_equal_one_process(tiny_model_dirs, tmp_path):
    out = tmp_path / "tp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSTUNE_TENSOR_PARALLEL": "2", "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).with_name("tp_worker.py")), str(out),
         str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen2"])],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"llama", "qwen2"}
    for name, result in results.items():
        assert result["sharded"], name  # the weights really are split across the two ranks
        assert result["max_abs_diff"] < 1e-4, (name, result)
        assert result["tokens_equal"], (name, result)


@pytest.mark.slow
def test_chat_tp2_answers_as_one_process_and_refuses_what_it_cannot(tiny_recipe, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    prompt = ["chat", str(recipe), "--prompt", "colour of item 3", "--max-new-tokens", "6"]
    env = {"OMP_NUM_THREADS": "1"}
    evaluate = ["eval", str(recipe)]
    one, sharded, no_prompt, qlora, odd, scored, scored_tp = run_cli(
        [prompt, prompt + ["--tp", "2"], ["chat", str(recipe), "--tp", "2"],
         prompt + ["--tp", "2", "model.load_in_4bit=true"], prompt + ["--tp", "3"], evaluate, evaluate + ["--tp", "2"]],
        env=env)
    assert one.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded.stdout == one.stdout and one.stdout.strip()  # rank 0 prints, once, the same answer
    assert scored.returncode == 0 and scored_tp.returncode == 0, scored_tp.stderr[-2000:]
    metrics = [line for line in scored.stdout.splitlines() if line.startswith("exact_match")]
    assert metrics and metrics == [line for line in scored_tp.stdout.splitlines() if line.startswith("exact_match")]
    assert "4 attention heads (2 key/value heads) do not split over 3 processes; use --tp 2" in odd.stderr
    for refused, word in ((no_prompt, "--prompt"), (qlora, "4-bit")):
        assert refused.returncode == 2 and word in refused.stderr and refused.stderr.strip().count("\n") == 0
