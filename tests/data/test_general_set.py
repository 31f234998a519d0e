"""The shipped general data: a replay / anchor part and a held-out tier-1 part that share nothing, rebuilt byte for byte."""

import hashlib
import subprocess
import sys
import unicodedata
from pathlib import Path

from dstune.data.build import GENERAL_DIR, GENERAL_SET, GENERAL_TEST, GENERAL_TEST_TEXT, GENERAL_TEXT
from dstune.data.formats import read_samples

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_general_set.py"


def key(text: str) -> str:
    """NFKC, casefold and collapsed whitespace, hashed: two texts equal under it are the same text."""
    return hashlib.sha256(" ".join(unicodedata.normalize("NFKC", text).casefold().split()).encode()).hexdigest()


def paragraphs(path: Path) -> list[str]:
    return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def test_replay_and_heldout_parts_share_no_id_question_or_paragraph():
    replay, heldout = list(read_samples(GENERAL_SET)), list(read_samples(GENERAL_TEST))
    assert len(replay) >= 400 and len(heldout) >= 600
    assert not {r["id"] for r in replay} & {r["id"] for r in heldout}
    questions = {key(r["messages"][0]["content"]) for r in replay}
    assert not [r["id"] for r in heldout if key(r["messages"][0]["content"]) in questions]
    assert len({key(r["messages"][0]["content"]) for r in heldout}) == len(heldout)
    anchor, test = paragraphs(GENERAL_TEXT), paragraphs(GENERAL_TEST_TEXT)
    assert len(test) >= 3 * len(anchor) and len(GENERAL_TEST_TEXT.read_text()) >= 3 * len(GENERAL_TEXT.read_text())
    assert not {key(p) for p in anchor} & {key(p) for p in test}
    # Every category and both languages in the held-out part; short answers that exact match can score.
    assert {r["meta"]["lang"] for r in heldout} == {"en", "zh"}
    assert {r["meta"]["category"] for r in heldout} == {r["meta"]["category"] for r in replay}
    assert all(len(r["messages"][1]["content"]) <= 20 and not r["messages"][1]["content"].endswith(".")
               for r in heldout)


def test_the_script_rewrites_the_shipped_files_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["general.jsonl", "general_test.jsonl", "general_test_text.txt", "general_text.txt"]
    for name in written:
        assert (tmp_path / name).read_bytes() == (GENERAL_DIR / name).read_bytes(), name
