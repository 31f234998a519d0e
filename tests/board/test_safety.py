"""A page of another site must not drive the board: foreign Host or Origin, or no token, gets 403 and starts nothing."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from boarding import TOKEN

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def board(shared_board):
    """These tests start no run: one board serves the module."""
    return shared_board


def call(board, method: str, path: str, headers: dict, body: dict | None = None) -> int:
    request = urllib.request.Request(f"{board.url}{path}", method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


LAUNCH = {"base": "recipes/tiny.yaml", "values": {}}
GOOD = {"X-Board-Token": TOKEN, "Content-Type": "application/json"}


REFUSED = {
    "no token": {"Content-Type": "application/json"},
    "wrong token": {"X-Board-Token": "wrong-token-0000000", "Content-Type": "application/json"},
    "cookie only": {"Cookie": f"dstune_board_token={TOKEN}", "Content-Type": "application/json"},  # rides on CSRF
    "foreign origin": {**GOOD, "Origin": "http://evil.example"},
    "other port": {**GOOD, "Origin": "http://127.0.0.1:1"},  # another port of this machine is another origin
    "foreign host": {**GOOD, "Host": "evil.example"},  # DNS rebinding: evil.example resolved to 127.0.0.1
    "rebinding": {**GOOD, "Host": "evil.example", "Origin": "http://evil.example"},
}


def test_refused_requests_get_403_and_start_nothing(board):
    for label, headers in REFUSED.items():
        for path in ("/api/runs/launch", "/api/runs/tiny/resume", "/api/runs/tiny/export", "/api/chat/tiny/start",
                     "/api/recipe/save"):
            assert call(board, "POST", path, headers, LAUNCH) == 403, (label, path)
    assert board.jobs() == []
    assert not (board.root / "runs" / "tiny").exists()


def test_pages_need_the_token_and_an_allowed_host(board):
    assert call(board, "GET", "/runs", {}) == 403
    assert call(board, "GET", "/runs", {"Cookie": f"dstune_board_token={TOKEN}"}) == 200
    assert call(board, "GET", "/runs", {"Cookie": f"dstune_board_token={TOKEN}", "Host": "evil.example"}) == 403
    assert call(board, "GET", "/api/runs/tiny/events", {"Cookie": "dstune_board_token=nope-nope-nope"}) == 403
    # The good request does what the refused ones could not.
    assert call(board, "POST", "/api/recipe/check", {**GOOD, "Origin": board.url}, LAUNCH) == 200


def test_bad_requests_are_4xx_never_5xx(board):
    for path, body in (("/api/runs/launch", {"base": "../../etc/passwd"}), ("/api/runs/launch", {"base": "nope.yaml"}),
                       ("/api/runs/launch", {"base": "recipes/tiny.yaml", "values": {"train.epochs": "many"}}),
                       ("/api/runs/launch", {"base": "recipes/tiny.yaml", "values": {"train.nope": "1"}}),
                       ("/api/recipe/save", {"base": "recipes/tiny.yaml", "path": "/etc/x.yaml"}),
                       ("/api/runs/nope/export", {"spec": "onnx:int8"}), ("/api/runs/tiny/stop", {}),
                       ("/api/chat/nope", {"prompt": "hi"}), ("/api/chat/tiny", {"prompt": "hi", "max_tokens": "x"}),
                       ("/api/runs/tiny/export", {"spec": "onnx"}), ("/api/runs/tiny/export", {"spec": "nope:int8"})):
        status = call(board, "POST", path, GOOD, body)
        assert 400 <= status < 500, (path, body, status)
    assert board.jobs() == []
