"""Out of memory at start-up, for real: an address-space limit below what the model needs to load."""

import errno
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cli_runner import run_cli
from dstune.cli.resources import disk_full_message, out_of_memory_message
from dstune.errors import phase
from tiny import tiny_config

VOCAB = 800_000  # embeddings + LM head of a 64-wide model: ~410 MB of safetensors
MARGIN_MB = 160  # address space the command gets beyond what the imports took: enough for recipe and tokenizer


def big_model_dir(path, tokenizer_dir):
    """A tiny-architecture Llama with a huge vocabulary, written without ever building it in memory."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=VOCAB)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    path.mkdir()
    config.save_pretrained(path)
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, path / item.name)
    return path


def test_out_of_memory_loading_the_model_is_one_line_exit_1(tmp_path, tokenizer_dir):
    model = big_model_dir(tmp_path / "big", tokenizer_dir)
    try:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "oom", "output_dir": str(tmp_path / "runs"),
                                          "model": {"name_or_path": str(model)}}))
        argv = ["chat", str(recipe), "--prompt", "hi", "--max-new-tokens", "2"]
        # One malloc arena per thread would reserve 64 MB of address space each: keep that out of the margin.
        result, = run_cli([{"argv": argv, "address_space_margin_mb": MARGIN_MB}], env={"MALLOC_ARENA_MAX": "2"},
                          fresh=True)
    finally:
        shutil.rmtree(model)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dstune: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("dstune: error: out of memory while loading the model: "), errors[0]
    assert "Cannot allocate memory" in errors[0] or "cannot allocate memory" in errors[0], errors[0]
    assert errors[0].endswith("; try a smaller train.batch_size / eval.batch_size / data.max_length, "
                              "train.gradient_checkpointing: true or model.load_in_4bit: true")


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    MemoryError(),
])
def test_allocation_failures_are_recognised(exc):
    message = out_of_memory_message(exc, "train")
    assert message.startswith("out of memory while running `dstune train`: ") and message.count("\n") == 0


def test_other_errors_and_causes():
    assert out_of_memory_message(RuntimeError("shape mismatch"), "eval") is None
    assert out_of_memory_message(ValueError("out of memory"), "eval") is None  # only allocation error types
    try:
        try:
            raise MemoryError("Cannot allocate memory (os error 12)")
        except MemoryError as inner:
            raise OSError("could not load model.safetensors") from inner
    except OSError as outer:
        assert "Cannot allocate memory (os error 12)" in out_of_memory_message(outer, "eval")


def test_the_phase_is_the_innermost_marked_function_the_error_left():
    @phase("loading the model")
    def load(path):
        raise OSError(errno.ENOSPC, "No space left on device", path) if path else MemoryError()

    @phase("training")
    def train(path=None):
        load(path)

    with pytest.raises(MemoryError) as raised:
        train()
    assert out_of_memory_message(raised.value, "run").startswith("out of memory while loading the model: MemoryError;")
    with pytest.raises(OSError) as raised:
        train("runs/x/model.safetensors")
    assert disk_full_message(raised.value, "run").startswith(
        "disk full while loading the model (runs/x/model.safetensors): No space left on device; ")
