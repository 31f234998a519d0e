"""Export the merged model to a deployable format, score the artifact against the fp32 model, apply the gate.

Every artifact is scored on the same test records with the same greedy decoding as the fp32 model (the general tier
is left out: it needs full-sequence logits, which not every runtime gives). Its retention is its domain score
(`eval.metrics[0]`) divided by the fp32 model's; below `export.min_retention` the export is marked failed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import Recipe, load_recipe
from ..data.build import load_split
from ..evaluate.harness import write_eval
from ..evaluate.tiers import evaluate_tiers
from ..provenance import provenance
from .formats import get_format

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".gguf", ".onnx_data")


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files of an artifact (a file, or a folder's model files; tokenizer files left out)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))


def test_records(recipe: Recipe) -> list[dict]:
    """The test records every model of a run is scored on."""
    records = load_split(recipe.run_dir / "data", "test")
    return records[: recipe.eval.max_samples] if recipe.eval.max_samples is not None else records


def scoring_recipe(recipe: Recipe) -> Recipe:
    """The recipe as exports are scored: domain metrics and business checks, no general tier."""
    return load_recipe(recipe.model_dump(), ["eval.general.enabled=false"])


def export_and_score(recipe: Recipe, spec: str, merged_dir: Path, reference: dict) -> dict:
    """Write the `format:quant` export of a merged HF directory, score it, and return its record for the report."""
    name, quant = spec.split(":")
    fmt = get_format(name, quant)
    out_dir = recipe.run_dir / "exports" / f"{name}-{quant}"
    start = time.perf_counter()
    calibration = None
    if quant in fmt.calibrated:  # only these exports see data, and only the train split's
        from ..models.loading import load_tokenizer
        from .calibrate import calibration_samples

        calibration = calibration_samples(recipe, load_tokenizer(Path(merged_dir)), recipe.export.calibration_samples)
    artifact = fmt.export(merged_dir, out_dir, quant, **({"calibration": calibration} if calibration else {}))
    export_seconds = time.perf_counter() - start
    model, tokenizer = fmt.load(artifact, merged_dir)
    result = evaluate_tiers(scoring_recipe(recipe), model, tokenizer, test_records(recipe), progress=f"eval {spec}")
    write_eval(result, recipe.run_dir / "eval" / f"export-{name}-{quant}.json")
    primary = recipe.eval.metrics[0]
    score, fp32 = result["metrics"][primary], reference["metrics"][primary]
    retention = score / fp32 if fp32 else (1.0 if score >= fp32 else 0.0)
    same = [p["got"] for p in result["predictions"]] == [p["got"] for p in reference["predictions"]]
    agreement = (sum(a["got"] == b["got"] for a, b in zip(result["predictions"], reference["predictions"]))
                 / max(len(result["predictions"]), 1)) if len(result["predictions"]) == len(reference["predictions"]) \
        else None
    fp32_bytes = weight_bytes(merged_dir)
    record = {
        "format": name, "quant": quant, "artifact": str(artifact),
        "bytes": weight_bytes(artifact), "fp32_bytes": fp32_bytes,
        "size_ratio": round(weight_bytes(artifact) / fp32_bytes, 4) if fp32_bytes else None,
        "metric": primary, "score": score, "fp32_score": fp32, "retention": round(retention, 4),
        "metrics": result["metrics"], "ci": result.get("ci", {}).get(primary),
        "completion_rate": (result.get("checks") or {}).get("completion_rate"),
        "fp32_completion_rate": (reference.get("checks") or {}).get("completion_rate"),
        "answer_agreement": None if agreement is None else round(agreement, 4), "identical_answers": same,
        # Answers the generation cache already had (same weights, e.g. an f32 GGUF) are not timed.
        "eval_tokens_per_second": result.get("tokens_per_second") if result["generated_tokens"] else None,
        "cached_answers": result.get("cached", 0), "export_seconds": round(export_seconds, 2),
        "min_retention": recipe.export.min_retention, "passed": retention >= recipe.export.min_retention,
        "calibration": calibration.manifest() if calibration else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # The report lists the records under its own provenance; the folder's file carries it for the folder alone.
    (out_dir / "dstune_export.json").write_text(json.dumps({**record, "provenance": provenance(recipe)}, indent=2))
    return record


def gate_failures(records: list[dict]) -> str | None:
    """One line naming the exports below the accuracy gate, or None when all passed."""
    failed = [r for r in records if not r["passed"]]
    if not failed:
        return None
    parts = [f"{r['format']}:{r['quant']} keeps {r['retention']:.3f} of the fp32 {r['metric']} "
             f"({r['fp32_score']:.4f} -> {r['score']:.4f})" for r in failed]
    return (f"export below export.min_retention={failed[0]['min_retention']}: {'; '.join(parts)}. Try a milder "
            "quantization (int8 instead of int4, q8_0 instead of q4_0)")
