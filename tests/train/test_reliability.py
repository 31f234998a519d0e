"""Training under faults: SIGKILL and exact resume, crash-safe checkpoints, SIGTERM, NaN steps, planted pickles, a
full disk. Fault injection in real processes, not mocks.

Each run is `dstune train` in its own process. DSTUNE_FAULT (src/dstune/train/faults.py) makes the process SIGKILL
itself in the middle of a chosen step or right after a chosen write of a checkpoint save, SIGTERM itself, get a NaN
loss, or a "No space left on device". A resumed run's last checkpoint and final adapter must equal the uninterrupted
run's bit for bit, and so must its log of sample ids.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runner import CliRunner, Result, shared_runner
from safetensors.torch import load_file

from dstune.train.checkpoint import MARKER, complete_checkpoints, is_complete, latest_checkpoint

pytestmark = pytest.mark.slow

# 16 samples, 2 per micro-batch, 2 micro-batches per step: 4 steps per epoch, 3 epochs. LoRA dropout is on, so the
# resumed run also needs the RNG states back; dev evaluation picks the best checkpoint, so early-stopping state too.
TRAIN = {"max_steps": -1, "epochs": 3, "batch_size": 2, "grad_accum": 2, "eval_steps": 2, "save_steps": 2,
         "save_total_limit": 2, "early_stopping_patience": 0, "learning_rate": 5e-3,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
STEPS = 12


SAVE_WRITES = ["adapter", "optimizer", "scheduler", "rng", "trainer_state", "dstune_state", "fsync", "rename",
               "marker", "rotate"]  # the checkpoint_write points of one save, in order
SEED = int(os.environ.get("DSTUNE_TEST_SEED", random.randrange(1 << 30)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dirs):
    """The toy task's files, the uninterrupted reference run (last checkpoint, adapter, sample log), a runner."""
    root = tmp_path_factory.mktemp("resume")
    pairs = [(f"colour of item {i}", ["red", "green", "blue"][i % 3]) for i in range(24)]
    data = {}
    for split, chunk in (("train", pairs[:16]), ("dev", pairs[16:20]), ("test", pairs[20:])):
        data[split] = root / f"{split}.jsonl"
        data[split].write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in chunk))

    def recipe(name: str, **train) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "output_dir": str(root / "runs"), "model": {"name_or_path": str(tiny_model_dirs["llama"])},
            "data": {"source": "files", "train_file": str(data["train"]), "dev_file": str(data["dev"]),
                     "test_file": str(data["test"]), "max_length": 64},
            "train": {**TRAIN, **train}, "eval": {"batch_size": 4, "max_new_tokens": 4, "cache": False},
        }))
        return path

    # The reference run is a plain `python -m dstune` process; the interrupted ones are forks of a warm process.
    proc = subprocess.run([sys.executable, "-m", "dstune", "train", str(recipe("reference"))], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "recipe": recipe, "reference": outcome(root / "runs" / "reference"),
            "dstune": dstune_train(shared_runner())}


def dstune_train(runner: CliRunner):
    """`dstune train RECIPE ...` in a fresh forked process, with an optional injected fault."""

    def run(recipe: Path, *extra: str, fault: str | None = None) -> Result:
        return runner(["train", str(recipe), *extra], env={"DSTUNE_FAULT": fault or ""})

    return run


def outcome(run_dir: Path) -> dict:
    """What must not depend on interruptions: the last checkpoint's and the final adapter's weights, the sample log."""
    last = latest_checkpoint(run_dir / "checkpoints")
    return {"last_step": int(last.name.split("-")[1]),
            "last": load_file(last / "adapter_model.safetensors"),
            "final": load_file(run_dir / "adapter" / "adapter_model.safetensors"),
            "samples": (run_dir / "sample_order.jsonl").read_text().splitlines()}


def assert_same(got: dict, want: dict, context: str) -> None:
    assert got["last_step"] == want["last_step"] == STEPS, context
    for which in ("last", "final"):
        assert got[which].keys() == want[which].keys(), context
        for name, tensor in want[which].items():
            # atol=0: the very same bits
            assert got[which][name].equal(tensor), f"{context}: {which} adapter differs at {name}"
    assert got["samples"] == want["samples"], f"{context}: the sample-id order differs"


def test_reference_run_logs_every_step_and_trains(workspace):
    want = workspace["reference"]
    steps = [json.loads(line) for line in want["samples"]]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [s["epoch"] for s in steps] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(len(s["ids"]) == 4 for s in steps)  # 2 samples x 2 micro-batches
    epochs = [sorted(i for s in steps[e * 4:(e + 1) * 4] for i in s["ids"]) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] and len(set(epochs[0])) == 16  # every sample once per epoch
    assert [s["ids"] for s in steps[:4]] != [s["ids"] for s in steps[4:8]]  # reshuffled per epoch
    assert any(t.abs().max() > 0 for n, t in want["last"].items() if "lora_B" in n)


def test_sigkill_at_random_steps_then_resume_is_bit_identical(workspace):
    rng = random.Random(SEED)
    # One kill in each epoch (steps 3-4: after the first checkpoint; 5-8; 9-12), in the middle of a step's gradient
    # accumulation.
    for kill in (rng.randint(3, 4), rng.randint(5, 8), rng.randint(9, 12)):
        context = f"SIGKILL in step {kill} (DSTUNE_TEST_SEED={SEED})"
        name = f"kill{kill}"
        recipe = workspace["recipe"](name)
        proc = workspace["dstune"](recipe, fault=f"kill_at_step={kill}")
        assert proc.returncode == -signal.SIGKILL, f"{context}: {proc.returncode} {proc.stderr[-2000:]}"
        checkpoints = workspace["root"] / "runs" / name / "checkpoints"
        expected = checkpoints / f"checkpoint-{(kill - 1) // 2 * 2}"
        assert latest_checkpoint(checkpoints) == expected, context
        proc = workspace["dstune"](recipe, "--resume")
        assert proc.returncode == 0, f"{context}: {proc.stderr[-3000:]}"
        assert f"resuming from {expected} " in proc.stdout, context
        assert_same(outcome(workspace["root"] / "runs" / name), workspace["reference"], context)


def test_kill_after_each_checkpoint_write_resumes_from_newest_complete(workspace):
    """A chain of processes: each resumes, then is killed right after the k-th write of its first save."""
    name = "writes"
    recipe = workspace["recipe"](name)
    checkpoints = workspace["root"] / "runs" / name / "checkpoints"
    proc = workspace["dstune"](recipe, fault="kill_at_step=4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    for k, write in enumerate(SAVE_WRITES, start=1):
        context = f"killed after write {k} ({write})"
        expected = latest_checkpoint(checkpoints)
        proc = workspace["dstune"](recipe, "--resume", fault=f"kill_after_checkpoint_write={k}")
        assert proc.returncode == -signal.SIGKILL, f"{context}: {proc.returncode} {proc.stderr[-2000:]}"
        assert f"resuming from {expected} " in proc.stdout, context
        saved = checkpoints / f"checkpoint-{int(expected.name.split('-')[1]) + 2}"
        complete = write in ("marker", "rotate")
        assert (saved / MARKER).is_file() == complete, context
        if not complete:
            assert latest_checkpoint(checkpoints) == expected, context
        for path in complete_checkpoints(checkpoints):  # a complete checkpoint holds everything
            assert {"adapter_model.safetensors", "optimizer.safetensors", "scheduler.safetensors",
                    "rng_state.safetensors", "trainer_state.json", "dstune_state.json"} <= \
                {p.name for p in path.iterdir()}, context
    proc = workspace["dstune"](recipe, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(checkpoints.glob(".*.partial"))
    assert_same(outcome(workspace["root"] / "runs" / name), workspace["reference"], "after the chain of kills")


def error_line(proc) -> str:
    """The one error line of a failed run (progress bars and warnings may come before it), checked to be alone."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("dstune: error:") == 1, proc.stderr[-3000:]
    # A progress bar may leave its line open (no newline after "\r"); the error line is what follows it.
    return "dstune: error:" + proc.stderr.split("dstune: error:")[1].split("\n")[0]


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(workspace):
    recipe = workspace["recipe"]("sigterm")
    run_dir = workspace["root"] / "runs" / "sigterm"
    proc = workspace["dstune"](recipe, fault="sigterm_at_step=5")  # step 5: not one of the regular saves
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = run_dir / "checkpoints" / "checkpoint-5"
    assert f"stopped by SIGTERM after step 5; checkpoint: {saved}; continue with: dstune train {recipe} --resume" \
        in proc.stdout
    assert is_complete(saved) and not (run_dir / "adapter").exists()
    proc = workspace["dstune"](recipe, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(outcome(run_dir), workspace["reference"], "resumed after SIGTERM")


def test_sigterm_past_the_grace_period_exits_1_keeping_the_last_checkpoint(workspace):
    recipe = workspace["recipe"]("grace", preemption_grace_seconds=0.001)
    proc = workspace["dstune"](recipe, fault="sigterm_at_step=3")
    assert proc.returncode == 1
    checkpoints = workspace["root"] / "runs" / "grace" / "checkpoints"
    assert "grace period of 0.001 s" in error_line(proc) and str(checkpoints / "checkpoint-2") in error_line(proc)
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"


def test_nonfinite_step_stops_the_run_naming_step_samples_and_checkpoint(workspace):
    recipe = workspace["recipe"]("nan")
    run_dir = workspace["root"] / "runs" / "nan"
    proc = workspace["dstune"](recipe, fault="nan_loss_at_steps=3")
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith("dstune: error: non-finite training step 3 (loss nan, grad norm nan)"), line
    step3 = json.loads((run_dir / "sample_order.jsonl").read_text().splitlines()[2])
    assert step3["step"] == 3 and all(i in line for i in step3["ids"]), line
    assert f"last good checkpoint is {run_dir / 'checkpoints' / 'checkpoint-2'}" in line
    assert not (run_dir / "adapter").exists()


def test_skip_nonfinite_skips_and_counts_bad_steps_without_moving_weights(workspace):
    recipe = workspace["recipe"]("skip", skip_nonfinite=2, save_steps=1, eval_steps=1, save_total_limit=20,
                                 logging_steps=1)
    run_dir = workspace["root"] / "runs" / "skip"
    proc = workspace["dstune"](recipe, fault="nan_loss_at_steps=3,5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "adapter" / "dstune_train.json").read_text())
    assert summary["nonfinite_skipped"] == 2
    assert [s["step"] for s in summary["nonfinite_steps"]] == [3, 5]
    order = [json.loads(line) for line in (run_dir / "sample_order.jsonl").read_text().splitlines()]
    assert summary["nonfinite_steps"][0]["sample_ids"] == order[2]["ids"]
    losses = {e["step"]: e["loss"] for e in summary["log_history"] if "loss" in e}
    assert losses[3] is None and losses[4] is not None  # NaN stays in the log (as null in JSON), never smoothed over
    weights = {s: load_file(run_dir / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors")
               for s in (2, 3, 4)}
    assert all(weights[3][n].equal(weights[2][n]) for n in weights[2])  # the skipped update was not applied
    assert not all(weights[4][n].equal(weights[3][n]) for n in weights[3])  # the next one was
    assert all(t.isfinite().all() for t in weights[4].values())


def test_nonfinite_patience_stops_a_run_of_bad_steps(workspace):
    recipe = workspace["recipe"]("patience", skip_nonfinite=5, nonfinite_patience=2)
    proc = workspace["dstune"](recipe, fault="nan_loss_at_steps=3,4")
    assert proc.returncode == 1
    assert "non-finite training step 4" in error_line(proc) and "2 in a row" in error_line(proc)


class Payload:
    """Unpickling this creates a marker file: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng_state.pth", "adapter_model.bin"])
def test_planted_pickle_in_a_checkpoint_never_runs(workspace, planted):
    import torch

    name = "pickle_" + planted.split(".")[0]
    recipe = workspace["recipe"](name)
    proc = workspace["dstune"](recipe, fault="kill_at_step=3")
    assert proc.returncode == -signal.SIGKILL
    checkpoint = workspace["root"] / "runs" / name / "checkpoints" / "checkpoint-2"
    stem = planted.split(".")[0]
    for own in checkpoint.glob(stem + ".*"):  # the checkpoint's own pickle-free file goes
        own.unlink()
    marker = workspace["root"] / f"{name}.marker"
    torch.save({"state": Payload(marker)}, checkpoint / planted)
    for extra in ([], ["--allow-pickle"]):
        proc = workspace["dstune"](recipe, "--resume", *extra)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc)
        assert str(checkpoint / planted) in line, line
        assert not marker.exists(), f"{planted} ran code with {extra}"


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(workspace):
    recipe = workspace["recipe"]("diskfull")
    checkpoints = workspace["root"] / "runs" / "diskfull" / "checkpoints"
    # Save 1 (step 2) takes writes 1-10; write 12 is the optimizer state of save 2 (step 4).
    proc = workspace["dstune"](recipe, fault=f"enospc_at_checkpoint_write={len(SAVE_WRITES) + 2}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "disk full while writing the checkpoint of step 4" in line and str(checkpoints / "checkpoint-2") in line
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    assert not list(checkpoints.glob(".*.partial"))  # the half-written one was removed to give the space back


def test_resume_refuses_a_missing_checkpoint_or_other_settings(workspace):
    recipe = workspace["recipe"]("refuse")
    proc = workspace["dstune"](recipe, "--resume")
    assert proc.returncode == 2 and "no complete checkpoint to resume from" in error_line(proc)
    proc = workspace["dstune"](recipe, fault="kill_at_step=3")
    assert proc.returncode == -signal.SIGKILL
    proc = workspace["dstune"](recipe, "train.batch_size=4", "--resume")
    assert proc.returncode == 2
    assert "train.batch_size = 2" in error_line(proc) and "4" in error_line(proc)
