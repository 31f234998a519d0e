"""Plugins from another package: `dstune train` runs a recipe that names a method or an objective registered only
through entry points (tests/plugins, installed by `make test`), and each resumes bit-exactly after a SIGKILL.

The plugins (tests/plugins/dstune_test_plugins) use every hook the loop offers: a toy method; a two-loss objective
that calls torch.autograd.grad on named shared parameters before the backward and trains its task weights in their
own optimizer group; a sampler whose order depends on the step; per-sample clipping with an optimizer wrapper that
adds seeded noise; and a loss that runs a frozen second model.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dstune.train.checkpoint import latest_checkpoint
from dstune.train.events import read_events

pytestmark = pytest.mark.slow

CASES = {
    "two_loss": {"method": "last_layers_lora", "objective": "two_loss", "packing": False, "last_layers_lora": {"r": 4},
                 "two_loss": {"shared": "lora_B", "weight_lr": 0.2}},
    "curriculum": {"objective": "curriculum", "curriculum": {"warm_steps": 2}},
    "dp_noise": {"objective": "dp_noise", "packing": False, "dp_noise": {"clip": 0.05, "sigma": 0.5, "seed": 3}},
    "distill": {"objective": "distill", "distill": {"alpha": 1.0}},
}


def outcome(run_dir: Path) -> dict:
    events = [{k: v for k, v in e.items() if k not in ("time", "path", "resumed_from")}
              for e in read_events(run_dir / "events.jsonl") if e["event"] in ("step", "checkpoint")]
    return {"adapter": load_file(run_dir / "adapter" / "adapter_model.safetensors"), "events": events,
            "last": load_file(latest_checkpoint(run_dir / "checkpoints") / "adapter_model.safetensors"),
            "samples": (run_dir / "sample_order.jsonl").read_text().splitlines(),
            "summary": json.loads((run_dir / "adapter" / "dstune_train.json").read_text())}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plugin_trains_from_a_recipe_and_resumes_bit_exactly_after_sigkill(workspace, case):
    run, recipe, runs = workspace["run"], workspace["recipe"], workspace["root"] / "runs"
    proc = run(["train", str(recipe(f"{case}_ref", **CASES[case]))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = outcome(runs / f"{case}_ref")
    path = recipe(f"{case}_kill", **CASES[case])
    proc = run(["train", str(path)], env={"DSTUNE_FAULT": "kill_at_step=4"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = run(["train", str(path), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-2 (step 2)" in proc.stdout
    got = outcome(runs / f"{case}_kill")
    assert got["samples"] == want["samples"]
    # events.jsonl reads as if nothing happened: every step and checkpoint once, with the same values
    assert got["events"] == want["events"] and [e["step"] for e in want["events"] if e["event"] == "step"] == \
        list(range(1, 7))
    for which in ("adapter", "last"):
        assert got[which].keys() == want[which].keys() and want[which]
        for name, tensor in want[which].items():
            assert got[which][name].equal(tensor), f"{case}: {which} differs at {name}"
    assert any(t.abs().max() > 0 for n, t in want["adapter"].items() if "lora_B" in n)  # it trained
    check_behaviour(case, want, runs / f"{case}_ref")


def check_behaviour(case: str, run: dict, run_dir: Path) -> None:
    """What each plugin is for, visible in what the run wrote."""
    logs = [e for e in run["summary"]["log_history"] if "loss" in e]
    if case == "two_loss":
        config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert config["layers_to_transform"] == [1]  # the toy method: only the last of the 2 layers
        assert all(".layers.1." in n for n in run["adapter"])
        # autograd.grad on the shared parameters before the backward (a step's last micro-batch may hold one task)
        assert all(e["shared_grad_norm_a"] > 0 for e in logs) and any(e["shared_grad_norm_b"] > 0 for e in logs)
        assert logs[-1]["weight_a"] != 1.0 and logs[-1]["weight_a"] + logs[-1]["weight_b"] == pytest.approx(2.0)
        assert all("loss_a" in e and "loss_b" in e for e in logs)
        assert (latest_checkpoint(run_dir / "checkpoints") / "objective.safetensors").is_file()
    if case == "curriculum":
        lengths = {f"train.jsonl:{i + 1}": 1 + i % 4 for i in range(16)}
        steps = [json.loads(line) for line in run["samples"]]
        first = [lengths[i.rsplit("/", 1)[-1]] for s in steps[:2] for i in s["ids"]]
        assert first == sorted(first)  # steps 0-1: shortest first
        later = [lengths[i.rsplit("/", 1)[-1]] for s in steps[4:6] for i in s["ids"]]
        assert later != sorted(later)  # from step 4 (the second epoch): shuffled by the step
    if case == "dp_noise":
        assert logs[-1]["clipped_samples"] > 0  # clip 0.05 clips per-sample gradients
    if case == "distill":
        assert all(e["kd"] >= 0 and e["ce"] > 0 for e in logs)
        assert logs[0]["kd"] < 1e-3  # the student starts as the teacher (LoRA B = 0), then moves away
        assert logs[-1]["kd"] > logs[0]["kd"]
