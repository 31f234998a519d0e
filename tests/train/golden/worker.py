"""Run under torchrun: the golden setting, then write this run's trajectory (rank 0) for tests/train/test_golden.py.

The setting: a tiny Llama on 2 ranks, packing, gradient accumulation 2, warmup, clipping that really clips, a dev
evaluation every 5 steps with early stopping. `python -m torch.distributed.run --standalone --nproc_per_node 2
tests/train/golden/worker.py RECIPE.json OUT_DIR`.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dstune import api

recipe_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
recipe = json.loads(recipe_path.read_text())
result = api.train(recipe)
rank = int(os.environ.get("RANK", "0"))
if rank == 0:
    adapter = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if "lora_" in n}
    digest = hashlib.sha256()
    for name in sorted(adapter):
        digest.update(name.encode())
        digest.update(adapter[name].to(torch.float32).numpy().tobytes())
    run_dir = Path(recipe["output_dir"]) / recipe["name"]
    steps = [{k: e[k] for k in ("step", "loss", "learning_rate", "grad_norm")}
             for e in result.summary["log_history"] if "loss" in e]
    evals = [{"step": e["step"], **{k: v for k, v in e.items() if k.startswith("eval_") and
                                    not k.endswith(("runtime", "per_second"))}}
             for e in result.summary["log_history"] if any(k.startswith("eval_") for k in e)]
    best = result.summary["best_checkpoint"]
    trajectory = {
        "steps": steps, "evals": evals,
        "optimizer_steps": result.summary["optimizer_steps"],
        "best_step": int(best.rsplit("-", 1)[1]) if best else None,
        "adapter_sha256": digest.hexdigest(),
        # Sample ids name their file: keep the file's name, not the temporary folder it was in.
        "sample_order": {f"rank{r}": [{**e, "ids": [Path(i).name for i in e["ids"]]} for e in map(
            json.loads, (run_dir / f"sample_order.rank{r}.jsonl").read_text().splitlines())] for r in (0, 1)},
    }
    (out_dir / "trajectory.json").write_text(json.dumps(trajectory, indent=1))
    save_file(adapter, str(out_dir / "adapter.safetensors"))
