"""The `kd` objective: the KD term equals its closed form (with the T² factor) and its gradient, it is 0 when
the student is the teacher, training runs with it, and a teacher with another vocabulary fails in one line."""

import json

import pytest
import torch

from dstune import api
from dstune.config import load_recipe
from dstune.train.events import read_events
from dstune.train.objectives.distill import linear_kd
from tiny import make_tiny_model_dir


def closed_form(student_logits, teacher_logits, t):
    p = torch.softmax(teacher_logits / t, -1)
    return t * t * (p * (torch.log_softmax(teacher_logits / t, -1) - torch.log_softmax(student_logits / t, -1))).sum()


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kd_term_is_the_closed_form_and_its_gradient(t):
    torch.manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(10, 12, dtype=torch.float64) * 3
    eye = torch.eye(12, dtype=torch.float64)  # the teacher's "hidden states" are its logits
    got = linear_kd(hidden, weight, teacher, eye, t, chunk=3)  # chunks of 3 rows: 4 chunks, the last partial
    want = closed_form(hidden @ weight.T, teacher, t)
    assert torch.allclose(got, want, rtol=1e-10)
    # The T² factor, written out: at T = 2 the term is 4 x the KL of the T = 2 distributions.
    p, q = torch.softmax(teacher / t, -1), torch.softmax(hidden.detach() @ weight.detach().T / t, -1)
    assert torch.allclose(got.detach(), t ** 2 * (p * (p.log() - q.log())).sum(), rtol=1e-10)
    grads = torch.autograd.grad(got * 0.7, (hidden, weight))
    expected = torch.autograd.grad(want * 0.7, (hidden, weight))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(grads, expected))
    same = linear_kd(hidden, weight, hidden.detach() @ weight.detach().T, eye, t)
    assert abs(float(same)) < 1e-12  # 0 when the student's distribution is the teacher's


def test_training_with_a_teacher_logs_both_terms_and_starts_at_zero_kd(tiny_recipe, tiny_model_dirs):
    """The teacher is the student's own base: with LoRA's B at zero the student starts as the teacher, so the first
    step's KD term is 0 and the loss is (1 - alpha) times the cross-entropy."""
    raw = tiny_recipe(train={"max_steps": 3, "logging_steps": 1, "objective": "kd",
                             "kd": {"teacher": str(tiny_model_dirs["llama"]), "alpha": 0.5}})
    recipe = load_recipe(raw)
    result = api.train(recipe)
    steps = [e for e in read_events(recipe.run_dir / "events.jsonl") if e["event"] == "step"]
    assert len(steps) == 3 and all("kd" in e and "ce" in e for e in steps)
    assert steps[0]["kd"] < 1e-6 and abs(steps[0]["loss"] - 0.5 * steps[0]["ce"]) < 1e-4
    assert steps[-1]["kd"] > 1e-6  # the student moved away from the teacher
    manifest = json.loads((result.adapter_dir / "dstune_train.json").read_text())
    assert manifest["objective_summary"]["temperature"] == 2.0


def test_a_teacher_with_another_vocabulary_fails_in_one_line(tiny_recipe, tokenizer_dir, tmp_path):
    from cli_runner import run_cli

    other = make_tiny_model_dir(tmp_path / "other", "llama", tokenizer_dir, vocab_size=1000)
    raw = tiny_recipe(train={"objective": "kd", "kd": {"teacher": str(other)}})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    done, = run_cli([["train", str(path)]])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train.kd.teacher:" in done.stderr and "another vocabulary than the student" in done.stderr
    assert "(1000 against 49152 logits" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
