"""Stages of `continual` from the CLI: the first writes its Fisher, the next reads it (EWC) or grows the adapter
orthogonally (O-LoRA), each with the KL anchor; a SIGKILL and `--resume` give bit-identical weights and logs."""

from __future__ import annotations

import json
import signal

import pytest
from safetensors.torch import load_file
from train.test_plugins import outcome

from dstune.train.objectives.continual import FISHER_FILE

pytestmark = pytest.mark.slow

KL = {"weight": 1.0, "batch_size": 2, "top_k": 8, "every": 3}  # every 3rd micro-batch: some steps, not all


@pytest.fixture(scope="module")
def first_stage(workspace):
    path = workspace["recipe"]("stage1", objective="continual", continual={"kl": KL, "ewc": {"weight": 1.0,
                                                                                            "samples": 4}})
    proc = workspace["run"](["train", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workspace["root"] / "runs" / "stage1" / "adapter"


@pytest.mark.parametrize("case", ["ewc", "orthogonal"])
def test_a_second_stage_resumes_bit_exactly_after_sigkill(workspace, first_stage, case):
    run, recipe, runs = workspace["run"], workspace["recipe"], workspace["root"] / "runs"
    assert (first_stage / FISHER_FILE).is_file()
    controls = ({"init_adapter": str(first_stage), "continual": {"kl": KL, "ewc": {"weight": 10.0, "samples": 4}}}
                if case == "ewc" else {"continual": {"kl": {**KL, "text_file": ""},
                                                     "orthogonal": {"previous": str(first_stage)}}})
    proc = run(["train", str(recipe(f"{case}_ref", objective="continual", **controls))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = outcome(runs / f"{case}_ref")
    path = recipe(f"{case}_kill", objective="continual", **controls)
    proc = run(["train", str(path)], env={"DSTUNE_FAULT": "kill_at_step=4"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = run(["train", str(path), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outcome(runs / f"{case}_kill")
    assert got["events"] == want["events"] and got["samples"] == want["samples"]
    for which in ("adapter", "last"):
        assert got[which].keys() == want[which].keys()
        for name, tensor in want[which].items():
            assert got[which][name].equal(tensor), f"{case}: {which} differs at {name}"
    logs = [e for e in want["summary"]["log_history"] if "loss" in e]
    anchored = [e for e in logs if "kl_anchor" in e]
    assert anchored[0]["step"] == 1 and 1 < len(anchored) < len(logs) and anchored[-1]["kl_anchor"] > 0
    earlier = load_file(first_stage / "adapter_model.safetensors")
    r = json.loads((first_stage / "adapter_config.json").read_text())["r"]
    if case == "ewc":
        assert logs[0]["ewc"] == 0.0 and logs[-1]["ewc"] > 0  # it starts at the parent, then moves away
        assert want["summary"]["objective_summary"]["ewc"]["from_parent"] is True
        fisher = load_file(runs / f"{case}_ref" / "adapter" / FISHER_FILE)
        parent = load_file(first_stage / FISHER_FILE)
        # online: this stage's Fisher adds to the parent's
        assert all((fisher[k] >= parent[k]).all() for k in parent if k.startswith("fisher."))
    else:
        assert all(0 <= e["orthogonality"] <= 1 for e in logs)
        config = json.loads((runs / f"{case}_ref" / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 2 * r and want["summary"]["objective_summary"]["orthogonal"]["rank"] == r
        for name, tensor in earlier.items():  # the earlier block is kept exactly (the scaling is the same)
            block = want["adapter"][name][:r] if "lora_A" in name else want["adapter"][name][:, :r]
            assert block.equal(tensor), name
        assert any(want["adapter"][n][:, r:].abs().max() > 0 for n in earlier if "lora_B" in n)  # the new one trained
