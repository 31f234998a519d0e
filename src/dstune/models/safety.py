"""Safe loading: safetensors by default; pickle weight files only when allowed, and then through weights_only.

Unpickling an arbitrary file can run any code, so `.bin`/`.pt` weights are refused unless `--allow-pickle` (or
DSTUNE_ALLOW_PICKLE=1) is set. Even then dstune unpickles them first with torch's weights_only unpickler (tensors
and plain containers only), so a payload fails with a one-line error before a library ever reads the file.
peft 0.21 (`load_peft_weights`) and transformers 5.x (`load_state_dict`) also load `.bin` with weights_only=True.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

from ..errors import InputError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth"}
_allowed = False


def allow_pickle(enabled: bool = True) -> None:
    """Allow (or refuse again) pickle weight files in this process; the CLI's --allow-pickle sets it."""
    global _allowed
    _allowed = enabled


def pickle_allowed() -> bool:
    """Whether pickle weight files may load: allow_pickle(True), or DSTUNE_ALLOW_PICKLE=1 in the environment."""
    return _allowed or os.environ.get("DSTUNE_ALLOW_PICKLE", "") == "1"


def refuse_pickle(path: Path) -> InputError:
    """The one-line error for a pickle weight file loaded without permission: how to convert it, or allow it."""
    return InputError(
        f"{path}: pickle weight file refused (unpickling can run code); convert it once with "
        f"`dstune convert-weights {path}` (loads with weights_only=True, writes safetensors), "
        "or pass --allow-pickle (DSTUNE_ALLOW_PICKLE=1 for the Python API)"
    )


def _torch_load(path: Path, map_location):
    import torch

    # mmap keeps a big zip-format checkpoint out of memory; the legacy (non-zip) format cannot be mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to a one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice; the "Unsupported ..." clause says what the file tried to do.
        found = re.search(r"Unsupported .*?(?= was not an allowed|\.?$)", str(exc), re.M)
        detail = found.group(0) if found else str(exc).splitlines()[0]
        raise InputError(f"{path}: refused to unpickle: the file holds more than tensors "
                         f"(torch weights_only: {detail})") from None


def check_pickle_file(path: Path) -> None:
    """Unpickle a weight file with weights_only=True onto the meta device (no tensor data read), or refuse it."""
    if not pickle_allowed():
        raise refuse_pickle(path)
    _torch_load(path, "meta")


def load_tensor_file(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a safetensors file, or of a pickle file when allowed (unpickled with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device=device)
    if not pickle_allowed():
        raise refuse_pickle(path)
    return _torch_load(path, device)


def safetensors_name(name: str) -> str:
    """The safetensors file name peft/transformers look for in place of a pickle one."""
    if name.startswith("pytorch_model"):  # pytorch_model.bin -> model.safetensors, shards alike
        name = name[len("pytorch_"):]
    return name.rsplit(".", 1)[0] + ".safetensors"


def _untied(state: dict) -> dict:
    import torch

    # safetensors refuses tensors that share memory (tied embeddings); copy the later ones.
    seen, out = set(), {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{key}: not a tensor ({type(value).__name__}); a weight file must be a flat state dict")
        pointer = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone().contiguous() if pointer in seen else value.contiguous()
        seen.add(pointer)
    return out


def convert_to_safetensors(path: str | Path) -> list[Path]:
    """Rewrite a pickle weight file, or those of an adapter/model folder, as safetensors next to it; return them."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name == "adapter_model.bin" or
                       (p.name.startswith("pytorch_model") and p.suffix == ".bin"))
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path}: not found")
    if not files:
        raise InputError(f"{path}: no adapter_model.bin or pytorch_model*.bin to convert")
    written = []
    for file in files:
        state = _torch_load(file, "cpu")
        if not isinstance(state, dict):
            raise InputError(f"{file}: holds a {type(state).__name__}, not a state dict")
        out = file.with_name(safetensors_name(file.name))
        save_file(_untied(state), out, metadata={"format": "pt"})
        written.append(out)
    index = path / "pytorch_model.bin.index.json" if path.is_dir() else None
    if index and index.is_file():  # a sharded model: the index names the shards
        data = json.loads(index.read_text())
        data["weight_map"] = {k: safetensors_name(v) for k, v in data["weight_map"].items()}
        out = path / "model.safetensors.index.json"
        out.write_text(json.dumps(data, indent=2))
        written.append(out)
    return written
