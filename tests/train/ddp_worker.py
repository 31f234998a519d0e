"""Run under torchrun: train a tiny recipe for 2 steps, then save this rank's LoRA weights."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from dstune import api

recipe_path, out_dir = sys.argv[1], sys.argv[2]
result = api.train(json.loads(open(recipe_path).read()))
rank = int(os.environ["RANK"])
state = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if "lora_" in n}
save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
    json.dump({"world_size": world, "steps": result.summary["optimizer_steps"]}, handle)
