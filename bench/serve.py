"""dstune serve under load: throughput, latency and time to first token against one request at a time with generate.

One process, one model, one thread count. In each repetition, alternating:
  - the baseline: the same prompts answered one at a time by transformers' `model.generate` (fp32, eager, greedy,
    batch 1): what a user without a server would run;
  - dstune serve (torch backend), the base model, at concurrency 1, 8 and 32 (clients of the real openai package
    in a process of their own, on 127.0.0.1, streamed, each sending its share of the prompts in turn);
  - the same with every request for a rank-16 LoRA adapter (random weights: the cost does not depend on them);
  - dstune serve's ONNX backend on an fp32 export of the same model, at each concurrency;
  - `transformers serve` on the same model folder, with and without its --continuous-batching, at each concurrency.
Quality goes with speed: the served base model's greedy answers are compared with the baseline's, token for token.

    .venv/bin/python bench/serve.py             # SmolLM2-135M (the demo's base), 3 repetitions (about 25 min)
    .venv/bin/python bench/serve.py --quick     # 1 repetition, fewer and shorter answers (under 3 min)
    .venv/bin/python bench/serve.py --smoke     # a tiny random Llama (seconds)

Writes bench/results/serve.json (--smoke: a temporary folder) and prints the table of docs/serve.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import machine, smoke_dir, smoke_model

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "icd10_lora.yaml"


def prompts(n: int) -> list[str]:
    """Clinical-note openings from ICD-10-CM descriptions (simple-icd-10-cm ships them), the same every run."""
    import simple_icd_10_cm as icd

    codes = [c for c in icd.get_all_codes(with_dots=True) if icd.is_leaf(c)][::997][:n]
    return [f"Clinical note. Assessment: {icd.get_description(c)}. Plan:" for c in codes]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def baseline(model, tokenizer, texts: list[str], max_tokens: int, stops: list[int]) -> dict:
    """Each prompt answered alone with model.generate; latency per request, tokens/s over the whole set."""
    import torch

    answers, latencies, tokens = [], [], 0
    start = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
        latencies.append(time.perf_counter() - t0)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        tokens += len(new)
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
            "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p95_s": round(percentile(latencies, 0.95), 3),
            "ttft_p50_s": None, "answers": answers}


class TransformersServe:
    """`transformers serve MODEL` (optionally --continuous-batching) in a process of its own, on a free port."""

    def __init__(self, model_dir: Path, threads: int, continuous: bool):
        import os
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.model = str(model_dir)
        command = [str(Path(sys.executable).parent / "transformers"), "serve", self.model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--continuous-batching" if continuous else "--no-continuous-batching"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        self.log = tempfile.NamedTemporaryFile(prefix="transformers-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("transformers serve did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def load(url: str, model: str, texts: list[str], max_tokens: int, concurrency: int, key: str,
         metrics_port: int | None = None) -> dict:
    """`concurrency` openai clients share `texts`, each streaming its answers in turn."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
    answers: list[str | None] = [None] * len(texts)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = [0]
    failures = [0]
    lock = threading.Lock()

    def worker(first: int) -> None:
        for i in range(first, len(texts), concurrency):
            t0 = time.perf_counter()
            first_token = None
            parts = []
            try:
                stream = client.completions.create(model=model, prompt=texts[i], max_tokens=max_tokens, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
                usage = 0
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        first_token = first_token or time.perf_counter()
                        parts.append(chunk.choices[0].text)
                    if chunk.usage:
                        usage = chunk.usage.completion_tokens
            except openai.APIError:
                with lock:
                    failures[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                ttfts.append((first_token or time.perf_counter()) - t0)
                tokens[0] += usage
                answers[i] = "".join(parts)

    before = batch_sizes(metrics_port, key) if metrics_port else None
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    after = batch_sizes(metrics_port, key) if metrics_port else None
    steps = after[0] - before[0] if after else 0
    return {"tokens": tokens[0], "seconds": round(seconds, 3), "tokens_per_s": round(tokens[0] / seconds, 2),
            "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p95_s": round(percentile(latencies, 0.95), 3),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
            "failed": failures[0], "mean_decode_batch": round((after[1] - before[1]) / steps, 2) if steps else None,
            "answers": answers}


def batch_sizes(port: int, key: str) -> tuple[float, float]:
    """(decode steps, rows decoded) so far, from dstune serve's /metrics."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Authorization": f"Bearer {key}"})
    text = urllib.request.urlopen(request).read().decode()
    value = lambda name: float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))  # noqa: E731
    return value("dstune_decode_batch_size_count"), value("dstune_decode_batch_size_sum")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, seconds")
    parser.add_argument("--quick", action="store_true", help="1 repetition, 16 prompts, 32 tokens (under 3 min)")
    parser.add_argument("--model", help="--smoke: a tiny model folder built already")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts (default 1,8,32)")
    parser.add_argument("--repetitions", type=int, help="default 3 (--quick, --smoke: 1)")
    parser.add_argument("--out", help="results file (default bench/results/serve.json)")
    parser.add_argument("--no-transformers-serve", dest="transformers_serve", action="store_false",
                        help="leave out `transformers serve` (with and without its continuous batching)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from peft import LoraConfig, get_peft_model

    from dstune.api import load as load_model
    from dstune.config import load_recipe
    from dstune.data.templates import get_template
    from dstune.evaluate.generate import stop_token_ids
    from dstune.models.loading import resolve_model_path
    from dstune.serve import BackgroundServer, ServeOptions, build_server

    torch.set_num_threads(1 if args.smoke else 2)
    work = smoke_dir("serve") if args.smoke else Path(tempfile.mkdtemp(prefix="dstune-bench-serve-"))
    overrides = [f"output_dir={work}", "train.objective=sft"]
    if args.smoke:
        overrides.append(f"model.name_or_path={smoke_model(work, args.model)}")
    recipe = load_recipe(RECIPE, overrides)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    reps = args.repetitions or (1 if args.quick or args.smoke else 3)
    n, max_tokens = (8, 8) if args.smoke else (16, 32) if args.quick else (32, 64)
    n = max(n, max(concurrency))
    texts = prompts(n)

    threads = torch.get_num_threads()
    model_dir = resolve_model_path(str(recipe.model.name_or_path))
    # transformers serve runs only while it is measured: an idle one still takes CPU from the others (its
    # continuous-batching loop polls). --smoke keeps the plain one only, to stay within seconds.
    others = {"transformers serve": False, "transformers serve --continuous-batching": True} \
        if args.transformers_serve else {}
    if args.smoke:
        others.pop("transformers serve --continuous-batching", None)
    model, tokenizer = load_model(recipe)
    stops = stop_token_ids(tokenizer, get_template(recipe.model.template, tokenizer))
    torch.manual_seed(0)
    adapter = work / "lora-r16"
    get_peft_model(load_model(recipe)[0], LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).save_pretrained(adapter)
    key = "sk-bench"
    running = BackgroundServer(build_server(recipe, ServeOptions(adapters={"r16": str(adapter)}, api_key=key,
                                                                 max_batch=max(concurrency), max_queue=4 * n)))
    base_name = running.server.settings.base_name
    # The ONNX backend on an fp32 export of the same model (the same weights as the torch rows).
    from dstune.export.onnx import export_onnx

    export = export_onnx(model_dir, work / "onnx-fp32", "fp32")
    onnx = BackgroundServer(build_server(recipe, ServeOptions(adapters={}, engine="onnx", model=str(export),
                                                              api_key=key, max_batch=max(concurrency),
                                                              max_queue=4 * n)))
    onnx_name = onnx.server.settings.base_name
    runs: dict[str, list[dict]] = {}

    # The clients run in a process of their own, as real clients do: in the server's process their Python work
    # would hold the GIL that the engine thread needs between kernels.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    clients = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def measure(rep: int, name: str, server, served: str | None, c: int) -> None:
        result = (baseline(model, tokenizer, texts, max_tokens, stops) if server is None
                  else clients.submit(load, server.url, served, texts, max_tokens, c, key,
                                      server.port if server in (running, onnx) else None).result())
        runs.setdefault(name, []).append(result)
        print(f"rep {rep + 1}/{reps} {name}: {result['tokens_per_s']} tok/s, p50 {result['latency_p50_s']} s",
              flush=True)

    def in_process(rep: int) -> None:
        for c in concurrency:
            for name, served in (("serve base", base_name), ("serve LoRA r16", "r16")):
                measure(rep, f"{name} @{c}", running, served, c)
        for c in concurrency:
            measure(rep, f"serve onnx @{c}", onnx, onnx_name, c)

    def transformers_serve(rep: int, name: str, continuous: bool) -> None:
        other = TransformersServe(model_dir, threads, continuous)
        try:
            other.wait()
            load(other.url, other.model, texts[:1], 2, 1, key)  # warm-up
            for c in concurrency:
                measure(rep, f"{name} @{c}", other, other.model, c)
        finally:
            other.stop()

    try:
        # One warm-up request each, so that no system's first-request costs land in a measurement.
        for server, served in ((running, base_name), (running, "r16"), (onnx, onnx_name)):
            load(server.url, served, texts[:1], 2, 1, key)
        for rep in range(reps):
            groups = [lambda rep: measure(rep, "generate, one at a time", None, None, 1), in_process] + [
                lambda rep, name=name, continuous=continuous: transformers_serve(rep, name, continuous)
                for name, continuous in others.items()]
            # Alternate the order each repetition (BENCHMARKS.md rule 1).
            for group in (groups if rep % 2 == 0 else groups[::-1]):
                group(rep)
    finally:
        clients.shutdown()
        running.stop()
        onnx.stop()

    medians = {name: {k: statistics.median(r[k] for r in rs) if rs[0].get(k) is not None else None
                      for k in ("tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "mean_decode_batch")
                      if k in rs[0]} for name, rs in runs.items()}
    reference = runs["generate, one at a time"][0]["answers"]
    same = {system: f"{sum(a == b for a, b in zip(reference, runs[f'{system} @{concurrency[-1]}'][0]['answers']))}"
                    f"/{len(reference)}" for system in ("serve base", "serve onnx")}
    top = concurrency[-1]
    base_rate = medians["generate, one at a time"]["tokens_per_s"]
    ratios = {f"{system} @{c} / generate": round(medians[f"{system} @{c}"]["tokens_per_s"] / base_rate, 3)
              for c in concurrency for system in ("serve base", "serve onnx")}
    ratios.update({f"serve base / {name} @{c}": round(medians[f"serve base @{c}"]["tokens_per_s"]
                                                       / medians[f"{name} @{c}"]["tokens_per_s"], 3)
                   for c in concurrency for name in others})
    ratios.update({f"LoRA r16 / base @{c}": round(medians[f"serve LoRA r16 @{c}"]["tokens_per_s"]
                                                   / medians[f"serve base @{c}"]["tokens_per_s"], 3) for c in concurrency})
    result = {
        "benchmark": "serve", "mode": "smoke" if args.smoke else "quick" if args.quick else "full", "machine": machine(),
        "settings": {"model": str(recipe.model.name_or_path), "dtype": recipe.model.dtype,
                     "threads": torch.get_num_threads(), "prompts": n,
                     "max_tokens": max_tokens, "concurrency": concurrency, "repetitions": reps,
                     "baseline": "transformers model.generate, fp32, eager, greedy, batch 1, one request at a time",
                     "others": "transformers serve MODEL, with and without --continuous-batching, its defaults, in "
                               "a process of its own with the same thread count" if others else None,
                     "adapter": "peft LoRA r=16 on q,k,v,o,gate,up,down (random weights)"},
        "quality": {"served_answers_identical_to_generate": same, "onnx_export": "fp32 (onnxruntime-genai builder)"},
        "medians": medians, "ratios": ratios,
        "goals": {f"throughput @{top} >= 3x one at a time": {
                      "met": min(ratios[f"serve base @{top} / generate"], ratios[f"serve onnx @{top} / generate"]) >= 3,
                      "torch": ratios[f"serve base @{top} / generate"], "onnx": ratios[f"serve onnx @{top} / generate"]},
                  "rank-16 adapter costs <= 15% throughput": {"met": all(ratios[f"LoRA r16 / base @{c}"] >= 0.85
                                                                         for c in concurrency),
                                                             **{f"@{c}": ratios[f"LoRA r16 / base @{c}"]
                                                                for c in concurrency}}},
        "runs": {name: [{k: v for k, v in r.items() if k != "answers"} for r in rs] for name, rs in runs.items()},
    }
    out = Path(args.out) if args.out else (work if args.smoke else ROOT / "bench" / "results") / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n| system | tokens/s | p50 latency (s) | p95 latency (s) | p50 TTFT (s) | mean decode batch |")
    print("|---|---|---|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m['tokens_per_s']} | {m['latency_p50_s']} | {m['latency_p95_s']} | {m['ttft_p50_s']} | "
              f"{m.get('mean_decode_batch')} |")
    print(json.dumps({"quality": result["quality"], "ratios": ratios, "goals": result["goals"]}, indent=2))
    print(f"bench/serve: wrote {out}")


if __name__ == "__main__":
    main()
