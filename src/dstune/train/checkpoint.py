"""Crash-safe checkpoints: staged on the same filesystem, fsynced, renamed into place, then marked complete.

A checkpoint folder `checkpoint-<step>` counts only once it holds the marker `dstune_complete.json`; resume never
looks at anything else. A kill at any point of a save leaves either a staging folder (`.checkpoint-<step>.partial`) or
an unmarked folder, both removed on the next resume, and the previous complete checkpoints untouched: old ones are
rotated out only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

from ..errors import InputError
from ..models.safety import PICKLE_SUFFIXES
from . import faults

MARKER = "dstune_complete.json"
STATE = "dstune_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint folder was written at."""
    return int(_NAME.match(path.name).group(1))


def staging_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place."""
    return root / f".checkpoint-{step}.partial"


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder was fully written (its completion marker exists)."""
    return bool(_NAME.match(path.name)) and (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest step first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_incomplete(root: Path) -> list[Path]:
    """Delete staging folders and unmarked checkpoint folders that a killed save left behind."""
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.is_dir() and (p.name.endswith(".partial") or
                                                             (_NAME.match(p.name) and not is_complete(p)))]
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then the folders themselves, to the disk."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def publish(staging: Path, final: Path, manifest: dict) -> None:
    """Make a fully written staging folder the checkpoint `final`: fsync, rename, fsync the parent, then mark it."""
    fsync_tree(staging)
    faults.checkpoint_write("fsync")
    if final.exists():  # a save of the same step that a kill left unmarked
        shutil.rmtree(final)
    staging.rename(final)
    _fsync(final.parent)
    faults.checkpoint_write("rename")
    marker = final / (MARKER + ".tmp")
    marker.write_text(json.dumps(manifest, indent=2))
    _fsync(marker)
    marker.rename(final / MARKER)
    _fsync(final)
    faults.checkpoint_write("marker")


def rotate(root: Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep`, never the protected (best) one."""
    found = complete_checkpoints(root)
    if not keep or len(found) <= keep:
        return []
    kept = set(found[-keep:])
    if protect is not None:
        kept.add(Path(protect))
    removed = [p for p in found if p not in kept]
    for path in removed:
        # The marker goes first: a kill halfway through leaves an unmarked folder, which resume ignores.
        (path / MARKER).unlink()
        shutil.rmtree(path)
    return removed


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (to tell whether a resumed run trains on the same data)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse a checkpoint holding pickle files (dstune writes none), unless --allow-pickle; then test-load them.

    With --allow-pickle (a checkpoint of HF's Trainer, say) every such file is first loaded with weights_only=True:
    one that needs arbitrary unpickling, which can run code, is refused with a one-line error naming it, and nothing
    in it is executed. Weights are always safetensors.
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    from ..models.safety import pickle_allowed

    for path in sorted(checkpoint.rglob("*")):
        # training_args.bin (HF's pickled arguments) is never loaded, by dstune or by the Trainer.
        if path.suffix not in PICKLE_SUFFIXES or path.name == "training_args.bin":
            continue
        if path.name.startswith("adapter_model") and not path.with_suffix(".safetensors").is_file():
            raise InputError(f"{path}: checkpoint weights must be safetensors; convert them with "
                             "safetensors.torch.save_file(torch.load(path, weights_only=True), "
                             "'adapter_model.safetensors')")
        if not pickle_allowed():
            raise InputError(f"{path}: a pickle file (which can run code when loaded); dstune's checkpoints hold "
                             "none. Pass --allow-pickle to load it with torch.load(weights_only=True)")
        try:
            with safe_globals():  # numpy's RNG state is a plain array; allow only that
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path}: refused to load: it is not a plain tensor file ({first[:160]}). "
                             "Delete this checkpoint to resume from an earlier one") from None


def _split_tensors(value, prefix: str, tensors: dict):
    """JSON-able structure of `value`, with every tensor moved into `tensors` under a dotted key."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{prefix}: cannot store a {type(value).__name__} without pickle")


def _join_tensors(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_join_tensors(v, tensors) for v in value["__tuple__"])
        return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def save_without_pickle(obj, folder: Path, name: str) -> None:
    """Save a state dict (nested dicts, lists, tuples, numbers, tensors) as `name`.json plus `name`.safetensors."""
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = _split_tensors(obj, name, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_without_pickle(folder: Path, name: str):
    """The state dict written by `save_without_pickle` (no unpickling anywhere)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _join_tensors(json.loads((folder / f"{name}.json").read_text()), tensors)


def gathered_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """Under FSDP2: the trainable weights and the optimizer state, gathered whole on rank 0's CPU (a collective)."""
    # Every rank must call it; the others get empty dicts. peft's own save would write rank 0's shard of each weight
    # (accelerate issue #4206).
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                   ignore_frozen_params=True))
    if optimizer is None:
        return weights, None
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return weights, get_optimizer_state_dict(model, optimizer, options=full)


def adapter_keys(model) -> dict[str, str]:
    """The model's parameter name of each key of its saved adapter file, as peft names them when saving."""
    from peft import get_peft_model_state_dict

    own = model.state_dict()  # under FSDP2 the local shards: no communication
    name_of = {id(tensor): name for name, tensor in own.items()}
    saved = get_peft_model_state_dict(model, state_dict=own, adapter_name=model.active_adapter)
    return {key: name_of[id(tensor)] for key, tensor in saved.items() if id(tensor) in name_of}


def load_sharded(model, folder: Path, optimizer=None) -> None:
    """Under FSDP2: load a checkpoint's adapter (and optimizer state) into the sharded model (a collective)."""
    # peft's loader would copy whole tensors into DTensor shards; torch's state-dict API splits them across the
    # ranks. Every rank reads the files and keeps exactly its shard of the saved values: a bit-exact resume.
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = load_file(str(folder / "adapter_model.safetensors"))
    names = adapter_keys(model)
    missing = sorted(set(saved) - set(names))
    if missing:
        raise InputError(f"{folder}: adapter weight {missing[0]} has no parameter in the model")
    set_model_state_dict(model, {names[key]: value for key, value in saved.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, load_without_pickle(folder, "optimizer"),
                                 options=StateDictOptions(full_state_dict=True))


def rng_states() -> dict:
    """Every random generator this process draws from: Python's, numpy's, torch's CPU and CUDA ones."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
              "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_state(checkpoint: Path) -> dict:
    """dstune's own state saved with a checkpoint (token counters, skipped steps, what it was trained on)."""
    path = checkpoint / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def truncate_log(path: Path, resume_step: int | None) -> None:
    """Rewrite a JSON-lines log keeping the lines up to `resume_step` (all of them for lines without a step), or
    empty it for a fresh run; a last line cut short by a kill goes too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resume_step is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("step") is None or entry["step"] <= resume_step:
                kept.append(line + "\n")
    path.write_text("".join(kept))


class SampleOrderLog:
    """One JSON line per optimizer step with the ids of the samples it trained on (this process's share).

    On resume the lines after the checkpoint's step are dropped first, so a resumed run's log reads exactly like an
    uninterrupted run's.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        truncate_log(path, resume_step)
        self._handle = path.open("a")

    def write(self, step: int, epoch: int, ids: list[str]) -> None:
        """Record the samples of optimizer step `step` (1-based)."""
        self._handle.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")
        self._handle.flush()  # in the kernel's hands: a SIGKILL of this process does not lose it

    def close(self) -> None:
        self._handle.close()
