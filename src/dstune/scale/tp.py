"""Tensor-parallel inference (`dstune chat|eval --tp N`): transformers' `tp_plan="auto"` under torchrun.

`--tp N` starts N processes with torchrun, each running the same command; the model loads sharded across them
(`DistributedConfig(tp_plan="auto")`: each linear's weight split by rows or columns, the LM head gathered), so every
rank computes the same logits and the same greedy answers from identical inputs. Rank 0 prints and writes; the
other ranks write into a temporary folder and print nothing. A peft adapter loads over the sharded model unmerged
(peft shards its LoRA weights too); merging under TP is not possible, so merge on one process first.

On CPUs the processes talk through gloo, which is how the tests check it (logits against one process within 1e-4,
greedy answers identical); on GPUs, NCCL. vLLM's own tensor parallelism (`dstune serve --engine vllm --tp N`) is the
serving path on GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import InputError

ENV = "DSTUNE_TENSOR_PARALLEL"  # set by the launcher for its ranks: the --tp they run under


def active() -> int:
    """The tensor-parallel degree this process runs under (0 when not under `--tp`)."""
    size = int(os.environ.get(ENV, "0") or 0)
    return size if size > 1 and int(os.environ.get("WORLD_SIZE", "1")) == size else 0


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def distributed_config():
    """transformers' DistributedConfig for a sharded load, or None when not under `--tp`."""
    if not active():
        return None
    from transformers.distributed import DistributedConfig

    return DistributedConfig(tp_plan="auto")


def check(tp: int, command: str, load_in_4bit: bool, prompt: str | None, config=None) -> None:
    """One line for what `--tp` cannot do here, before any process starts (`config`: the model's, to split)."""
    if tp < 1:
        raise InputError("--tp: must be at least 1")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads and (heads % tp or kv_heads % tp):
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise InputError(f"--tp {tp}: the model's {heads} attention heads ({kv_heads} key/value heads) do not split "
                         f"over {tp} processes; " + (f"use --tp {' or '.join(map(str, fits[:3]))}" if fits
                                                      else "this model cannot be sharded by heads"))
    if tp > 1 and load_in_4bit:
        raise InputError("--tp: a 4-bit (QLoRA) base cannot be sharded by transformers' tensor parallelism; "
                         "set model.load_in_4bit=false or drop --tp")
    if tp > 1 and command == "chat" and prompt is None:
        raise InputError("--tp: chat under tensor parallelism answers one --prompt (every rank needs the same "
                         "input; stdin reaches only one of them)")


def relaunch(tp: int, argv: list[str]) -> int:
    """Run `dstune ARGV` as `tp` torchrun processes on this machine; their exit code."""
    env = {**os.environ, ENV: str(tp)}
    # One machine's cores, shared by the ranks (torchrun would otherwise leave each rank every core).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp),
               "-m", "dstune", *argv]
    return subprocess.run(command, env=env).returncode


def quiet_other_ranks(recipe):
    """The recipe each rank runs: no generation cache (a fingerprint would read every rank's shard), and on ranks
    > 0 no output and the run folder in a temporary place (rank 0 writes the real one)."""
    if not active():
        return recipe
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"cache": False})})
    if rank() == 0:
        return recipe
    sys.stdout = open(os.devnull, "w")
    scratch = Path(tempfile.mkdtemp(prefix=f"dstune-tp-rank{rank()}-"))
    moved = recipe.model_copy(update={"output_dir": str(scratch)})
    if (recipe.run_dir / "data").is_dir():  # the dataset is read, never written, by chat and eval
        moved.run_dir.mkdir(parents=True)
        (moved.run_dir / "data").symlink_to((recipe.run_dir / "data").resolve())
    return moved
