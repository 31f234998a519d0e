"""Throughput and peak memory of the data stage's checks on many short JSONL records.

Two parts, each in its own process so peak RSS is its own:

1. The checks at scale: N short records (1% exact and 1% near duplicates, 0.5% leaking into dev/test) go
   through `dstune.data.build.check_splits`: read, parse, validate, token length with the chat template, exact
   and near duplicates, leakage. Reports records/s and peak RSS.
2. Near-duplicate detection against the baseline a user would otherwise write: datasketch `MinHash` per record
   and `MinHashLSH` (threshold 0.8, 128 permutations), on the same M texts, alternated A B A B, median of 3.

    .venv/bin/python bench/data_checks.py            # N = 1,000,000, M = 50,000 (datasketch needed for part 2)
    .venv/bin/python bench/data_checks.py --quick    # N = 100,000, M = 10,000 (< 3 min)
    .venv/bin/python bench/data_checks.py --smoke    # N = 2,000, M = 300, one repetition (seconds)

Without datasketch, part 2 times dstune's index alone (no ratio). Writes bench/results/data_checks.json (or
data_checks-quick.json; `--out` elsewhere) and prints the markdown table of docs/data.md. `--smoke` runs the same
code on few records and writes to a temporary folder, never to bench/results/; it calls each worker in its own
process (the same function, with the same arguments: a process costs seconds of imports here), so its peak RSS
figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, smoke_dir

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("patient reports fever cough chest pain shortness of breath left right upper lower lobe chronic acute "
         "kidney liver heart failure blood pressure insulin tablet daily twice weekly dose mg after meals "
         "history of diabetes hypertension smoking allergy penicillin rash swelling ankle knee").split()


def make_text(rng: random.Random, i: int) -> str:
    return f"case {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))


def generate(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """train.jsonl with n Alpaca records (1% exact, 1% near duplicates, 0.5% copies of eval records), dev, test."""
    rng = random.Random(seed)
    evals = {s: [make_text(rng, -1 - i - 1000 * k) for i in range(1000)] for k, s in enumerate(("dev", "test"))}
    paths = {}
    for split, texts in evals.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"instruction": t, "output": "A"}) + "\n" for t in texts))
    paths["train"] = folder / "train.jsonl"
    recent: list[str] = []
    with paths["train"].open("w") as handle:
        for i in range(n):
            roll = rng.random()
            if roll < 0.01 and recent:
                text = rng.choice(recent)                                   # exact duplicate
            elif roll < 0.02 and recent:
                text = rng.choice(recent) + " again"                        # near duplicate
            elif roll < 0.025:
                text = rng.choice(evals[rng.choice(("dev", "test"))])       # leaks an eval record
            else:
                text = make_text(rng, i)
                recent = (recent + [text])[-1000:]
            handle.write(json.dumps({"instruction": text, "output": f"code {i % 97}"}) + "\n")
    return paths


def run_checks(folder: Path) -> dict:
    """Part 1, in a worker process: the real check pass of `dstune data`."""
    from dstune.config import load_recipe
    from dstune.data.build import check_splits, token_lengths
    from dstune.data.quality import DropLog

    recipe = load_recipe(ROOT / "recipes" / "icd10_lora.yaml", [
        "data.source=files", f"data.train_file={folder / 'train.jsonl'}", f"data.dev_file={folder / 'dev.jsonl'}",
        f"data.test_file={folder / 'test.jsonl'}", "data.quality.dedup=near", "data.quality.leakage=near",
        "data.max_length=128", "data.system_prompt=null"])
    lengths = token_lengths(recipe)
    log = DropLog()
    out = folder / "out"
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    counts, _, _ = check_splits(recipe, log, out, lengths)
    seconds = time.perf_counter() - start
    records = sum(log.inputs.values())
    return {"records": records, "seconds": round(seconds, 2), "records_per_s": round(records / seconds),
            "peak_rss_mb": round(peak_rss_mb()), "kept": counts,
            "dropped": {s: dict(c) for s, c in log.dropped.items()}}


def texts_of(folder: Path, m: int) -> list[str]:
    with (folder / "train.jsonl").open() as handle:
        return [json.loads(next(handle))["instruction"] for _ in range(m)]


def run_dedup(folder: Path, m: int, side: str) -> dict:
    """Part 2, in a worker process: near duplicates of the first m texts, dstune's index or datasketch's."""
    texts = texts_of(folder, m)
    base_rss = peak_rss_mb()
    start = time.perf_counter()
    if side == "dstune":
        from dstune.data.quality import TextIndex, chunked

        index = TextIndex("near", 0.8)
        found = 0
        for part in chunked(list(enumerate(texts))):
            hits = index.match([t for _, t in part], [str(i) for i, _ in part], add=True)
            found += sum(h is not None for h in hits)
    else:
        from datasketch import MinHash, MinHashLSH

        from dstune.data.quality import normalise, shingles

        lsh = MinHashLSH(threshold=0.8, num_perm=128)
        exact, found = set(), 0
        for i, text in enumerate(texts):
            key = normalise(text)
            if key in exact:
                found += 1
                continue
            minhash = MinHash(num_perm=128)
            minhash.update_batch([s.encode("utf-8") for s in shingles(text)])
            if lsh.query(minhash):
                found += 1
                continue
            exact.add(key)
            lsh.insert(str(i), minhash)
    seconds = time.perf_counter() - start
    return {"side": side, "texts": m, "seconds": round(seconds, 2), "records_per_s": round(m / seconds),
            "duplicates_found": found, "peak_rss_mb": round(peak_rss_mb()), "rss_growth_mb": round(peak_rss_mb() - base_rss)}


def run_worker(kind: str, folder: str, *rest: str) -> dict:
    """One measurement: the child process's work (and --smoke's, in its own process)."""
    return run_checks(Path(folder)) if kind == "checks" else run_dedup(Path(folder), int(rest[0]), rest[1])


def in_process(*args: str, smoke: bool = False) -> dict:
    """A measurement in a fresh process, so its peak RSS is its own (--smoke: in this one)."""
    if smoke:
        return json.loads(json.dumps(run_worker(*args)))  # the child's JSON round trip
    result = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="2,000 records, 300 texts, 1 repetition; to a temp folder")
    parser.add_argument("--records", type=int)
    parser.add_argument("--out", help="the results file (default bench/results/data_checks[-quick].json)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(*args.worker)))
        return
    n = args.records or (2_000 if args.smoke else 100_000 if args.quick else 1_000_000)
    m = min(n, 300 if args.smoke else 10_000 if args.quick else 50_000)  # part 2 reads the first m of n
    repetitions = 1 if args.smoke else 3
    try:
        import datasketch  # noqa: F401

        sides = ("datasketch", "dstune")
    except ImportError:
        sides = ("dstune",)
        print("datasketch is not installed: part 2 times dstune alone (pip install datasketch)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate(folder, n)
        checks = in_process("checks", str(folder), smoke=args.smoke)
        print(f"checks: {checks}", file=sys.stderr)
        reps = [{side: in_process("dedup", str(folder), str(m), side, smoke=args.smoke) for side in sides}
                for _ in range(repetitions)]
    import torch
    import transformers

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    result = {"benchmark": "data_checks", "mode": mode,
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "settings": {"records": n, "dedup_texts": m, "threshold": 0.8, "num_perm": 128, "max_length": 128,
                           "tokenizer": "SmolLM2-135M-Instruct (embedded)", "dedup_sides": list(sides)},
              "checks": checks, "dedup_repetitions": reps}
    lines = ["| what | records | records/s | peak RSS (MB) |", "|---|---|---|---|",
             f"| all checks (`check_splits`) | {checks['records']:,} | {checks['records_per_s']:,} | "
             f"{checks['peak_rss_mb']:,} |"]
    med = {side: {k: statistics.median(r[side][k] for r in reps) for k in ("records_per_s", "rss_growth_mb")}
           for side in sides}
    result["dedup_medians"] = med
    for side in sides:
        lines.append(f"| near duplicates, {side} | {m:,} | {med[side]['records_per_s']:,.0f} | "
                     f"+{med[side]['rss_growth_mb']:,.0f} |")
    if "datasketch" in med:
        result["dedup_speedup"] = round(med["dstune"]["records_per_s"] / med["datasketch"]["records_per_s"], 2)
        result["dedup_memory_ratio"] = round(med["dstune"]["rss_growth_mb"] / max(1, med["datasketch"]["rss_growth_mb"]), 3)
        lines.append(f"\ndstune / datasketch: {result['dedup_speedup']}x records/s, "
                     f"{result['dedup_memory_ratio']}x memory growth (median of {len(reps)}, alternated).")
    name = "data_checks.json" if mode == "full" else f"data_checks-{mode}.json"
    folder = smoke_dir("data_checks") if args.smoke else ROOT / "bench" / "results"
    out = Path(args.out) if args.out else folder / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    print(f"bench/data_checks: wrote {out}")


if __name__ == "__main__":
    main()
