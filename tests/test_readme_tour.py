"""The README's five-minute tour, run as written (English and Chinese), so that it cannot go stale; and quietly.

The commands are read from the README itself. Each runs in a folder holding a copy of recipes/, with overrides
appended that only make the work small: a tiny random model, fewer ICD-10 chapters and categories, two training
steps, a few evaluation samples.
"""

import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]


def tour_lines(readme: Path) -> list[str]:
    """The shell lines of the first bash block after the tour heading (comments stripped)."""
    text = readme.read_text(encoding="utf-8")
    start = re.search(r"^## (A five-minute tour|五分钟.*)$", text, re.M)
    assert start, f"{readme.name}: no tour heading"
    block = re.search(r"```bash\n(.*?)```", text[start.end():], re.S).group(1)
    lines = []
    for raw in block.splitlines():
        command = shlex.split(raw, comments=True)
        if command:
            lines.append(shlex.join(command))
    return lines


def error_example(readme: Path) -> tuple[list[str], str]:
    """The README's mistyped-key example: the command and the one line it prints."""
    text = readme.read_text(encoding="utf-8")
    found = re.search(r"^\$ (dstune .*)\n(dstune: error: .*)$", text, re.M)
    return shlex.split(found.group(1))[1:], found.group(2)


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path, tiny_model_dirs):
    english, chinese = tour_lines(ROOT / "README.md"), tour_lines(ROOT / "README_zh.md")
    assert english == chinese  # the two READMEs tour the same commands
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    small = [f"model.name_or_path={tiny_model_dirs['llama']}", "data.icd10.chapters=[\"10\"]",
             "data.icd10.max_train_per_category=2", "data.max_length=64", "train.max_steps=2",
             "train.max_dev_samples=4", "eval.max_samples=4", "eval.general.max_samples=4", "eval.batch_size=4"]
    commands, other, served, boards = [], [], [], []
    for line in english:
        argv = shlex.split(line)
        if argv[0] != "dstune":
            other.append(argv)
            continue
        if argv[1] == "serve":  # runs until stopped: started below, asked once, then stopped
            served.append(argv[1:] + small)
            continue
        if argv[1] == "board":  # the same: started below, its printed URL opened, then stopped
            boards.append(argv[1:])
            continue
        commands.append({"argv": argv[1:] + (small if len(argv) > 2 else []), "cwd": str(tmp_path)})
    results = run_cli(commands)
    for command, result in zip(commands, results):
        assert result.returncode == 0, (command["argv"][:3], result.stderr[-3000:])
    help_text = results[0].stdout
    assert all(name in help_text for name in ("run", "data", "train", "eval", "merge", "export", "chat"))
    run_dir = tmp_path / "runs" / "icd10_lora"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "merged").is_dir()
    assert "exact_match: " in results[3].stdout and results[-1].stdout.strip()
    # Library warnings go to the run's log, not the terminal: peft reads transformers' deprecated
    # is_gradient_checkpointing on every adapter load (eval and chat load one).
    assert not any("FutureWarning" in r.stderr or "is_gradient_checkpointing" in r.stderr for r in results)
    assert "is_gradient_checkpointing" in (run_dir / "dstune.log").read_text()
    [debug] = run_cli([{"argv": commands[-1]["argv"] + ["--debug"], "cwd": str(tmp_path)}])
    assert debug.returncode == 0 and "is_gradient_checkpointing" in debug.stderr  # --debug: on the terminal
    # tensorboard --logdir runs/icd10_lora/tb: the folder it is pointed at holds the training curves.
    # `. .venv/bin/activate`: the environment these commands already run in (make setup made it).
    assert other == [[".", ".venv/bin/activate"], ["tensorboard", "--logdir", "runs/icd10_lora/tb"]]
    assert (ROOT / ".venv" / "bin" / "dstune").is_file() or shutil.which("dstune")
    assert any((tmp_path / other[1][2]).glob("events.out.tfevents.*"))

    assert len(served) == 1
    serve_as_written(served[0], tmp_path)
    assert boards == [["board"]]
    board_as_written(boards[0], tmp_path)

    argv, printed = error_example(ROOT / "README.md")
    assert error_example(ROOT / "README_zh.md") == (argv, printed)
    [result] = run_cli([{"argv": argv, "cwd": str(tmp_path)}])
    assert (result.returncode, result.stderr.strip()) == (2, printed)


def board_as_written(argv: list[str], cwd: Path) -> None:
    """`dstune board`: it prints a URL with its token; that URL opens the runs page, which lists the tour's run."""
    import http.cookiejar
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dstune", *argv, "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        found = re.match(r"dstune: board on (http://127\.0\.0\.1:\d+/\?token=\S+)$", first.strip())
        assert found, first
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        for _ in range(100):
            try:
                page = opener.open(found.group(1), timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert "icd10_lora" in page and "<title>dstune board" in page
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -15)


def serve_as_written(argv: list[str], cwd: Path) -> None:
    """`dstune serve ...` in a process of its own on a free port: it answers the openai client, then stops on ^C."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DSTUNE_API_KEY": "sk-tour", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dstune", *argv, "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-tour", max_retries=0)
        assert [m.id for m in client.models.list()][1:] == ["icd10"]
        reply = client.chat.completions.create(model="icd10", messages=[{"role": "user", "content": "Acute bronchitis"}],
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert f"http://127.0.0.1:{port}/v1 serving" in out and "Traceback" not in err
