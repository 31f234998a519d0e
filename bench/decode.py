"""Decode speed of each export against HF `generate` in fp32 eager (../shared/BENCHMARKS.md).

What runs, in one process and in alternating rounds (A B C ... A B C ...), on the demo's merged model:
- the baseline: transformers `generate`, fp32, eager attention, greedy, batch 1;
- each export of `--formats` (default: torchao int8, ONNX fp32 / int8 / int4 through onnxruntime-genai, and GGUF
  Q8_0 / Q4_0 when llama-cpp-python is installed). GGUF is timed in llama.cpp itself (llama-cpp-python, greedy, the
  same token ids): dstune's own GGUF loader dequantizes to fp32 through transformers, which says nothing about
  llama.cpp's speed. Its retention is the export record's (scored through that loader, so llama.cpp's own int8
  arithmetic is not part of it); the bench also checks that llama.cpp's greedy tokens equal the baseline's on the
  timing prompt.
For each: prefill tokens/s (a `--prompt-tokens` prompt, time to the first new token), decode tokens/s (the next
`--new-tokens` tokens), weight bytes on disk and as a share of fp32, peak RSS (a separate process per format), the
domain-score retention from the export's record (written by `dstune export` / `dstune run`, or scored here), and
decode tokens/s as a fraction of (memory read bandwidth measured now / weight bytes read per token).

llama-cpp-python compiles llama.cpp for the CPU it is built on (GGML_NATIVE). This VM's /proc/cpuinfo lists AMX and
AVX512-BF16, which it does not provide, and such a build dies with an illegal instruction in the Q8_0 kernels. Build
it for the instructions that are really there, e.g.:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AMX_INT8=OFF" \
        pip install llama-cpp-python

    PYTHONPATH=src python bench/decode.py --recipe recipes/icd10_lora.yaml          # full: 5 rounds
    PYTHONPATH=src python bench/decode.py --recipe recipes/icd10_lora.yaml --quick  # 3 rounds, shorter
    PYTHONPATH=src python bench/decode.py --smoke   # a tiny random Llama, torchao int8 only (seconds)

`--smoke` needs no demo run: a tiny random Llama (the SmolLM2 tokenizer) stands in for the merged model, and a
small chat set (common.smoke_data) for the test split. It runs the same code (export and score, warm-up,
alternating timed rounds, bandwidth, the table) for one format, torchao int8, the cheapest real export: ONNX exports
alone take longer than the whole smoke should, and llama.cpp is optional. Each variant's peak RSS is measured in
this process (by the same function the `--rss-of` child runs: a process costs ~6 s of imports here), so the smoke's
RSS figures mean nothing. It writes to a temporary folder, never to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, smoke_data, smoke_dir, smoke_model  # noqa: E402

BASELINE = "hf:fp32"
DEFAULT_FORMATS = "torchao:int8,onnx:fp32,onnx:int8,onnx:int4"
OUT = "bench/results/decode.json"
# --smoke: one export, a short prompt and few tokens, and recipe overrides (besides the model and output folder).
SMOKE_FORMATS = "torchao:int8"
# Exact match alone: the demo's ICD-10 metric and check load the ICD-10-CM tables (3 s).
SMOKE = ["eval.metrics=[exact_match]", "eval.checks=[]", "eval.bootstrap_samples=100", "eval.cache=false"]


def read_bandwidth() -> float:
    """Bytes/s of a large `torch.sum` (the memory read ceiling of BENCHMARKS.md rule 3)."""
    data = torch.ones(256 * 1024 * 1024 // 4)  # 256 MB, far beyond the caches
    data.sum()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def record_file(spec: str, recipe) -> Path:
    """Where `dstune export` / `dstune run` left an export's record (artifact, size, retention)."""
    name, quant = spec.split(":")
    return recipe.run_dir / "exports" / f"{name}-{quant}" / "dstune_export.json"


class LlamaCppModel:
    """A GGUF file in llama.cpp (llama-cpp-python) behind the part of `generate` that timed_generate calls."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, min_new_tokens=0, do_sample=False,
                 eos_token_id=None, pad_token_id=None):
        # Greedy (top_k 1), no stop token: exactly max_new_tokens, as the other variants decode here.
        tokens = []
        for token in self.llm.generate(input_ids[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == max_new_tokens:
                break
        return torch.cat([input_ids, torch.tensor([tokens])], dim=1)


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def load_variant(spec: str, recipe, merged: Path):
    """(model, tokenizer, weight bytes, record) of the baseline, or of an export that has a record."""
    from dstune.export.artifacts import weight_bytes
    from dstune.export.formats import get_format
    from dstune.models.loading import load_tokenizer

    if spec == BASELINE:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
        return model.eval(), load_tokenizer(merged), weight_bytes(merged), None
    record = json.loads(record_file(spec, recipe).read_text())
    artifact = Path(record["artifact"])
    if spec.startswith("gguf:"):
        return LlamaCppModel(artifact, torch.get_num_threads()), load_tokenizer(merged), weight_bytes(artifact), record
    model, tokenizer = get_format(*spec.split(":")).load(artifact, merged)
    return model, tokenizer, weight_bytes(artifact), record


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """A clinical-sounding prompt cut to exactly `length` tokens."""
    text = " ".join(["Type 2 diabetes mellitus with diabetic chronic kidney disease, stage 3, and hypertension."] * 40)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :length]
    assert ids.shape[1] == length, "prompt text too short"
    return ids


def timed_generate(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    """Seconds to generate exactly `new_tokens` greedy tokens after the prompt (no stop token ends it early)."""
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=[], pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, f"generated {out.shape[1] - ids.shape[1]} of {new_tokens}"
    return seconds


def peak_rss(spec: str, args, recipe, merged: Path) -> float:
    """Peak RSS in MB of a fresh process that loads this variant and decodes once (--smoke: of this process)."""
    if args.smoke:
        return load_and_decode_once(spec, recipe, merged, args.prompt_tokens, 8)
    command = [sys.executable, __file__, "--recipe", args.recipe, "--rss-of", spec, "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", "8"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{spec}: {proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def load_and_decode_once(spec: str, recipe, merged: Path, prompt_tokens: int, new_tokens: int) -> float:
    """Load a variant, decode once, and return this process's peak RSS in MB (the --rss-of child's work)."""
    model, tokenizer, _, _ = load_variant(spec, recipe, merged)
    timed_generate(model, prompt_ids(tokenizer, prompt_tokens), new_tokens, tokenizer.pad_token_id)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def smoke_setup(args) -> list[str]:
    """--smoke: a tiny random Llama as the run's merged model, and a small test split; the recipe overrides."""
    import shutil

    from dstune import api
    from dstune.config import load_recipe

    work = smoke_dir("decode")
    model = smoke_model(work, args.model)
    overrides = [*smoke_data(work / "smoke-data"), *SMOKE, f"model.name_or_path={model}", f"output_dir={work}"]
    recipe = load_recipe(args.recipe, overrides)
    shutil.copytree(model, recipe.run_dir / "merged")  # a tiny random model is its own merged model
    api.data(recipe)
    args.formats, args.prompt_tokens, args.new_tokens, args.rounds = SMOKE_FORMATS, 16, 8, 2
    if args.out == OUT:
        args.out = str(work / "decode-smoke.json")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/icd10_lora.yaml")
    parser.add_argument("--formats", default=DEFAULT_FORMATS)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 32 new tokens")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random Llama, torchao int8 only, 2 rounds of 8 tokens; results to a temp folder")
    parser.add_argument("--model", help="--smoke: a tiny model folder built already (default: build one)")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 3, 32

    from dstune.config import load_recipe
    from dstune.export.artifacts import export_and_score, scoring_recipe, test_records

    recipe = load_recipe(args.recipe, smoke_setup(args) if args.smoke else [])
    merged = recipe.run_dir / "merged"
    if not (merged / "config.json").is_file():
        sys.exit(f"{merged}: no merged model; run `make demo` (or `dstune run {args.recipe}`) first")
    if args.rss_of:
        print(load_and_decode_once(args.rss_of, recipe, merged, args.prompt_tokens, args.new_tokens))
        return

    specs = [BASELINE] + [s for s in args.formats.split(",") if s]
    if args.formats == DEFAULT_FORMATS and llama_cpp_installed():
        specs += ["gguf:q8_0", "gguf:q4_0"]
    if any(s.startswith("gguf:") for s in specs) and not llama_cpp_installed():
        sys.exit("bench: timing GGUF needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp)")
    variants = {BASELINE: load_variant(BASELINE, recipe, merged)}
    reference = None
    for spec in specs[1:]:
        if not record_file(spec, recipe).is_file():  # not exported by a run yet: export and score it here, once
            if reference is None:
                from dstune.evaluate.tiers import evaluate_tiers

                base_model, tokenizer = variants[BASELINE][:2]
                reference = evaluate_tiers(scoring_recipe(recipe), base_model, tokenizer, test_records(recipe))
            export_and_score(recipe, spec, merged, reference)
        variants[spec] = load_variant(spec, recipe, merged)
    ids = prompt_ids(variants[BASELINE][1], args.prompt_tokens)
    pad = variants[BASELINE][1].pad_token_id
    agreement = {}  # warm-up (first-call allocations, kernel selection), and each variant's greedy tokens
    for spec, (model, *_) in variants.items():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[], pad_token_id=pad)
        agreement[spec] = out[0, ids.shape[1]:].tolist()
    reference_tokens = agreement[BASELINE]
    times = {spec: {"prefill": [], "total": []} for spec in specs}
    for _ in range(args.rounds):
        for spec, (model, *_) in variants.items():
            times[spec]["prefill"].append(timed_generate(model, ids, 1, pad))
            times[spec]["total"].append(timed_generate(model, ids, args.new_tokens, pad))
    bandwidth = read_bandwidth()
    fp32_bytes = variants[BASELINE][2]
    rows = {}
    for spec in specs:
        size, record = variants[spec][2:]
        prefill = statistics.median(times[spec]["prefill"])
        decode = statistics.median([t - p for t, p in zip(times[spec]["total"], times[spec]["prefill"])])
        decode_tps = (args.new_tokens - 1) / decode
        rows[spec] = {
            "prefill_tokens_per_second": round(args.prompt_tokens / prefill, 1),
            "decode_tokens_per_second": round(decode_tps, 2),
            "weight_bytes": size, "size_percent_of_fp32": round(100 * size / fp32_bytes, 1),
            "bandwidth_bound_fraction": round(decode_tps / (bandwidth / size), 3),
            "retention": record["retention"] if record else 1.0,
            "domain_score": record["score"] if record else None, "passed_gate": record["passed"] if record else None,
            "peak_rss_mb": round(peak_rss(spec, args, recipe, merged), 1),
            # New tokens, of the timing prompt's greedy continuation, before the first that differs from the baseline.
            "greedy_tokens_as_baseline": next((i for i, (a, b) in enumerate(zip(agreement[spec], reference_tokens))
                                               if a != b), len(reference_tokens)),
            "repetitions": times[spec],
        }
    base = rows[BASELINE]
    for row in rows.values():
        row["decode_speedup"] = round(row["decode_tokens_per_second"] / base["decode_tokens_per_second"], 2)
        row["prefill_speedup"] = round(row["prefill_tokens_per_second"] / base["prefill_tokens_per_second"], 2)
    result = {
        "benchmark": "decode", "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "machine": machine(), "memory_read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "settings": {"model": str(merged), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "rounds": args.rounds, "batch": 1, "greedy": True,
                     "baseline": "transformers generate, fp32, eager attention, greedy, batch 1",
                     "order": "alternating rounds over all variants; medians"},
        "variants": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, batch 1, median of {args.rounds} alternating rounds\n")
    print("| variant | decode tok/s | vs baseline | prefill tok/s | vs baseline | weights MB | % of fp32 | "
          f"% of bandwidth bound | peak RSS MB | retention | greedy tokens as baseline (of {args.new_tokens}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, r in rows.items():
        name = "HF generate fp32 eager (baseline)" if spec == BASELINE else spec
        print(f"| {name} | {r['decode_tokens_per_second']:.1f} | {r['decode_speedup']:.2f}x | "
              f"{r['prefill_tokens_per_second']:.0f} | {r['prefill_speedup']:.2f}x | {r['weight_bytes'] / 1e6:.0f} | "
              f"{r['size_percent_of_fp32']:.1f}% | {100 * r['bandwidth_bound_fraction']:.0f}% | "
              f"{r['peak_rss_mb']:.0f} | {r['retention']:.3f} | {r['greedy_tokens_as_baseline']} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
