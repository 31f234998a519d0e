import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_cpu_processes_hold_identical_adapters(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2, "batch_size": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(recipe_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world_size"] for m in meta] == [2, 2] and [m["steps"] for m in meta] == [2, 2]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    trained = [t for n, t in ranks[0].items() if "lora_B" in n]
    assert any(torch.count_nonzero(t) for t in trained)  # the weights moved, and moved the same on both ranks
