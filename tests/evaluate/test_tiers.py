"""The three tiers end to end on a tiny model whose answers are scripted, against hand-computed values."""

import pytest
import torch

from dstune.config import load_recipe
from dstune.evaluate.tiers import compare, evaluate_tiers

# (question, reference, the scripted answer)
FIXTURE = [
    ("Capital of France?", "Paris", "Paris"),
    ("Capital of the UK?", "London", "Berlin"),
    ("总结：患者有高血压", "患者有高血压", "患者高血压"),
    ("Code for acute bronchitis?", "J20", "J20"),
]


def scripted(model, tokenizer, answers):
    """Make model.generate answer each prompt with its scripted text, then the end-of-turn token."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for row in input_ids:
            prompt = tokenizer.decode(row, skip_special_tokens=False)
            answer = next(a for q, a in answers.items() if q in prompt)
            rows.append(tokenizer(answer, add_special_tokens=False)["input_ids"] + [eot])
        width = max(map(len, rows))
        new = torch.tensor([r + [eot] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    model.generate = generate
    return model


@pytest.fixture
def records():
    return [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ref}],
             "meta": {"chapter": "10"}} for i, (q, ref, _) in enumerate(FIXTURE)]


def test_every_metric_matches_hand_computed_values_with_cis(tiny_recipe, tiny_model_dirs, tokenizer, records):
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(tiny_recipe(eval={
        "metrics": ["exact_match", "contains_answer", "accuracy", "macro_f1", "rouge1", "rouge2", "rougeL"],
        "bootstrap_samples": 300, "checks": [{"kind": "regex", "name": "short", "pattern": r"\S{1,6}"}]}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    tuned = evaluate_tiers(recipe, scripted(model, tokenizer, {q: a for q, _, a in FIXTURE}), tokenizer, records)
    assert [p["got"] for p in tuned["predictions"]] == [a for _, _, a in FIXTURE]
    # Samples 1 and 4 are right, 2 and 3 wrong: 2/4 for exact match, contains and accuracy.
    # macro-F1 over the 4 reference classes: paris 1, london 0, 患者有高血压 0, j20 1 -> 0.5.
    # ROUGE-1: 1, 0, Chinese by character (5 of 6 reference characters, all 5 predicted: P 1, R 5/6,
    # F 10/11), 1 -> (2 + 10/11) / 4. ROUGE-2: 患者 者高 高血 血压 of 患者 者有 有高 高血 血压 -> P 3/4, R 3/5,
    # F 2/3; single-token samples 1 and 4 have no bigram on either side, which rouge-score scores 0 -> (2/3) / 4.
    # ROUGE-L: the LCS is 5 characters, as for ROUGE-1.
    expected = {"exact_match": 0.5, "contains_answer": 0.5, "accuracy": 0.5, "macro_f1": 0.5,
                "rouge1": (2 + 10 / 11) / 4, "rouge2": (2 / 3) / 4, "rougeL": (2 + 10 / 11) / 4}
    for name, value in expected.items():
        assert tuned["metrics"][name] == pytest.approx(value), name
        ci = tuned["ci"][name]
        assert ci["value"] == pytest.approx(value) and ci["low"] <= ci["value"] <= ci["high"], name
    # "患者高血压" has 5 non-space characters; the others are short: 4 of 4 pass.
    assert tuned["checks"]["completion_rate"] == 1.0

    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    base = evaluate_tiers(recipe, scripted(base_model, tokenizer, {q: "no idea" for q, _, _ in FIXTURE}),
                          tokenizer, records)
    assert base["metrics"]["exact_match"] == 0.0
    paired = compare(base, tuned, recipe)["paired"]["exact_match"]
    assert paired["diff"] == 0.5 and paired["low"] <= 0.5 <= paired["high"]
