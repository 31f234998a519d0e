"""Helpers every benchmark shares: the machine, the fp32 GEMM ceiling, peak RSS, and the tiny model of --smoke."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def gemm_peak_flops(size: int = 2048) -> float:
    """fp32 FLOP/s of a large matmul on this machine, now (the ceiling of BENCHMARKS.md rule 3; --smoke: smaller)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def machine() -> dict:
    import torch
    import transformers
    import peft

    from dstune.evaluate.report import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


# --- the --smoke mode of every benchmark (BENCHMARKS.md rule 9) ---

# A tiny random Llama, shaped as tests/tiny.py's: it builds and trains in about a second.
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                   initializer_range=0.2)
# (description, ICD-10-CM category) pairs of --smoke's data set.
SMOKE_PAIRS = [("Type 2 diabetes mellitus without complications", "E11"), ("Essential (primary) hypertension", "I10"),
               ("Acute bronchitis, unspecified", "J20"), ("Hypothyroidism, unspecified", "E03"),
               ("Atrial fibrillation, unspecified", "I48"), ("Pneumonia, unspecified organism", "J18")]


def smoke_model(folder: Path, given: str | None = None) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer as an HF folder (`given`: one built already, e.g. by a test)."""
    if given:
        return Path(given)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dstune.models.loading import load_tokenizer, resolve_model_path

    # The embedded model's tokenizer, from dstune's converted copy of the GGUF (converted once per machine).
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), **SMOKE_MODEL))
    out = folder / "tiny-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smoke_data(folder: Path) -> list[str]:
    """Write --smoke's small chat data set (24 train, 8 dev, 8 test records) and return the recipe overrides that
    read it with the demo recipe: the data stage's files source, without stratification, augmentation, replay or
    adversarial scoring (a second, where the demo's icd10 source takes several)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    records = [{"messages": [{"role": "user", "content": f"{text}, case {i}"}, {"role": "assistant", "content": code}]}
               for i in range(40) for text, code in [SMOKE_PAIRS[i % len(SMOKE_PAIRS)]]]
    for split, part in (("train", records[:24]), ("dev", records[24:32]), ("test", records[32:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    files = [f"data.{split}_file={folder / f'{split}.jsonl'}" for split in ("train", "dev", "test")]
    return ["data.source=files", *files, "data.stratify.key=null", "data.replay.ratio=0",
            "data.adversarial.reference=null", "data.augment.rules={}"]


def smoke_dir(name: str) -> Path:
    """A fresh temporary folder for a smoke run: a smoke never writes to bench/results/."""
    return Path(tempfile.mkdtemp(prefix=f"dstune-smoke-{name}-"))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB so far.

    VmHWM, not ru_maxrss: Linux folds the parent's peak into a child's ru_maxrss through fork and exec."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
