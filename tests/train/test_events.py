"""events.jsonl: one line per logged step, evaluation, checkpoint and stage, written as the run goes; TensorBoard
gets the same scalars under the tags HF's Trainer used."""

import json

from dstune import api
from dstune.config import load_recipe
from dstune.train.events import read_events


def test_event_log_has_every_step_evaluation_checkpoint_and_stage(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 4, "eval_steps": 2, "logging_steps": 1}))
    result = api.train(recipe)
    events = read_events(recipe.run_dir / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "stage" and events[0]["status"] == "start" and events[-1]["status"] == "done"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    logged = [e for e in result.summary["log_history"] if "loss" in e]
    assert [e["loss"] for e in steps] == [e["loss"] for e in logged]  # the same numbers as the summary
    assert all(e["learning_rate"] >= 0 and e["grad_norm"] > 0 for e in steps)
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    assert all("eval_exact_match" in e and "eval_loss" in e for e in events if e["event"] == "eval")
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    assert all(json.loads(line) for line in (recipe.run_dir / "events.jsonl").read_text().splitlines())
    # TensorBoard: the event file holds the train and eval tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(recipe.run_dir / "tb")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/exact_match"} <= set(tags)
