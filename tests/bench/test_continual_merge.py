"""bench/continual.py --merge: runs made apart join into one table only with the same settings and base scores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import continual  # noqa: E402


def part(tmp_path: Path, name: str, controls: list[str], base: float = 0.2, **settings) -> str:
    result = {"benchmark": "continual", "mode": "quick", "machine": {"cpu": name},
              "settings": {"steps_per_stage": 20, **settings}, "base": {"general": {"accuracy": base}},
              "runs": [{"control": c} for c in controls]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return str(path)


def test_merge_joins_the_runs_and_says_where_each_came_from(tmp_path):
    out = tmp_path / "merged.json"
    merged = continual.merge([part(tmp_path, "a", ["naive", "kl"]), part(tmp_path, "b", ["rehearsal"],
                                                                           rehearsal_ratio=0.5)], out)
    assert [r["control"] for r in merged["runs"]] == ["naive", "kl", "rehearsal"]
    assert merged["merged_from"] == [{"file": "a.json", "controls": ["naive", "kl"], "machine": {"cpu": "a"}},
                                     {"file": "b.json", "controls": ["rehearsal"], "machine": {"cpu": "b"}}]
    assert merged["settings"] == {"steps_per_stage": 20, "rehearsal_ratio": 0.5}
    assert json.loads(out.read_text()) == merged


@pytest.mark.parametrize("other, why", [
    ({"controls": ["rehearsal"], "base": 0.3}, "scored the base model differently"),
    ({"controls": ["rehearsal"], "steps_per_stage": 60}, "other settings"),
    ({"controls": ["kl"]}, "control 'kl' is in more than one file"),
])
def test_merge_refuses_runs_that_do_not_belong_together(tmp_path, other, why):
    first = part(tmp_path, "a", ["naive", "kl"])
    with pytest.raises(SystemExit, match=why):
        continual.merge([first, part(tmp_path, "b", **other)], tmp_path / "merged.json")
