"""Run under torchrun with DSTUNE_TENSOR_PARALLEL set: load each model sharded through dstune's loader, then (rank 0)
compare its logits and greedy tokens with a one-process load of the same folder. Writes OUT as JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist

from dstune.models.loading import load_model

out, folders = sys.argv[1], sys.argv[2:]
torch.manual_seed(0)
ids = torch.randint(3, 1000, (2, 12))
mask = torch.ones_like(ids)
mask[1, :3] = 0  # a left-padded row
settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
results = {}
for folder in folders:
    sharded = load_model(folder).eval()
    with torch.no_grad():
        logits = sharded(input_ids=ids, attention_mask=mask).logits
        tokens = sharded.generate(input_ids=ids, attention_mask=mask, **settings)
    if dist.get_rank() == 0:
        tp_env = os.environ.pop("DSTUNE_TENSOR_PARALLEL")
        single = load_model(folder).eval()
        os.environ["DSTUNE_TENSOR_PARALLEL"] = tp_env
        with torch.no_grad():
            reference = single(input_ids=ids, attention_mask=mask).logits
            reference_tokens = single.generate(input_ids=ids, attention_mask=mask, **settings)
        sharded_weight = next(p for n, p in sharded.named_parameters() if n.endswith("q_proj.weight"))
        results[os.path.basename(folder)] = {
            "max_abs_diff": (logits - reference)[mask.bool()].abs().max().item(),
            "tokens_equal": torch.equal(tokens, reference_tokens),
            "sharded": type(sharded_weight).__name__ == "DTensor",
            "gap": (reference.topk(2).values[..., 0] - reference.topk(2).values[..., 1]).min().item(),
        }
    dist.barrier()
if dist.get_rank() == 0:
    with open(out, "w") as handle:
        json.dump(results, handle)
dist.destroy_process_group()
