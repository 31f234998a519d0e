"""The board's pieces without a browser: values as the command line writes them, and jobs as real processes."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml
from boarding import free_port

from dstune.board.jobs import Jobs
from dstune.board.schema import form_fields, overrides_from_form, value_text
from dstune.config import load_recipe


@pytest.mark.parametrize("value", [0, 1e-3, 2.5, True, False, "plain", "Answer: one word.", "1e-3", "true", "null",
                                   "", " padded ", ["a", "b"], {"k": {"n": 1}}, [], {}, "multi\nline"])
def test_a_value_reads_back_as_itself_after_key_equals(value):
    text = value_text(value)
    assert "\n" not in text
    assert yaml.safe_load(text) == value
    assert value_text(None) == ""  # unset: the form's empty field


def test_overrides_name_only_what_changed(tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    fields = form_fields(load_recipe(path).model_dump(mode="json"))
    unchanged = {f.key: f.text for f in fields}
    assert overrides_from_form(fields, unchanged) == []
    changed = {**unchanged, "train.max_steps": "8", "data.system_prompt": "Answer: one word.",
               "train.learning_rate": "", "train.lora.r": "8"}
    overrides = overrides_from_form(fields, changed)
    assert overrides == ['data.system_prompt="Answer: one word."', "train.learning_rate=null", "train.max_steps=8",
                         "train.lora.r=8"]
    recipe = load_recipe(path, overrides)
    assert recipe.data.system_prompt == "Answer: one word." and recipe.train.learning_rate is None
    assert overrides_from_form(fields, {"train.max_steps": "4.0"}) == []  # the same value, written otherwise


def wait_state(jobs: Jobs, job_id: str, states: tuple[str, ...], seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {job['state']}, not {states}")


def test_a_failing_job_shows_its_one_line_error(tmp_path):
    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("run", "x", tmp_path, ["convert-weights", str(tmp_path / "missing")], tmp_path)
    job = wait_state(jobs, job["id"], ("failed",))
    assert job["rc"] == 2 and str(tmp_path / "missing") in job["error"] and "\n" not in job["error"]


def test_stop_sends_sigterm_to_the_command_and_a_killed_keeper_is_lost(tmp_path):
    jobs = Jobs(tmp_path / "jobs")
    # A long-lived dstune command with no model to load: a board.
    job = jobs.start("serve", "x", tmp_path, ["board", "--port", str(free_port())], tmp_path)
    job = wait_state(jobs, job["id"], ("running",))
    while not jobs.get(job["id"]).get("pid"):
        time.sleep(0.05)
    assert jobs.stop(job["id"])
    stopped = wait_state(jobs, job["id"], ("done", "failed"))
    assert stopped["rc"] in (0, -signal.SIGTERM)  # the command got the SIGTERM, not a SIGKILL

    again = jobs.start("serve", "y", tmp_path, ["board", "--port", str(free_port())], tmp_path)
    while not jobs.get(again["id"]).get("keeper_pid"):
        time.sleep(0.05)
    keeper = jobs.get(again["id"])
    os.killpg(keeper["keeper_pid"], signal.SIGKILL)
    assert wait_state(Jobs(tmp_path / "jobs"), again["id"], ("lost",))["state"] == "lost"  # a new board sees it
