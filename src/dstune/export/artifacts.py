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
from ..errors import InputError
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


def dev_records(recipe: Recipe) -> list[dict]:
    """The dev records a scheme is chosen on (never the test split, which then scores the choice)."""
    records = load_split(recipe.run_dir / "data", "dev")
    return records[: recipe.eval.max_samples] if recipe.eval.max_samples is not None else records


def _export(recipe: Recipe, fmt, quant: str, merged_dir: Path) -> tuple[Path, object, float]:
    """Write one export: (artifact, the calibration it saw or None, seconds)."""
    out_dir = recipe.run_dir / "exports" / f"{fmt.name}-{quant}"
    # A record describes the artifact beside it: an earlier export's must not outlive its files (a scheme that
    # --quant int4 writes but does not keep is scored on dev only and gets none).
    (out_dir / "dstune_export.json").unlink(missing_ok=True)
    start = time.perf_counter()
    calibration = None
    if quant in fmt.calibrated:  # only these exports see data, and only the train split's
        from ..models.loading import load_tokenizer
        from .calibrate import calibration_samples

        calibration = calibration_samples(recipe, load_tokenizer(Path(merged_dir)), recipe.export.calibration_samples)
    artifact = fmt.export(merged_dir, out_dir, quant, **({"calibration": calibration} if calibration else {}))
    return artifact, calibration, time.perf_counter() - start


def _retention(score: float, fp32: float) -> float:
    return score / fp32 if fp32 else (1.0 if score >= fp32 else 0.0)


def export_and_score(recipe: Recipe, spec: str, merged_dir: Path, reference: dict) -> dict:
    """Write the `format:quant` export of a merged HF directory, score it, and return its record for the report.

    A quant the format lists in `auto` (onnx:int4) is a choice among schemes: see select_scheme.
    """
    name, quant = spec.split(":")
    fmt = get_format(name, quant)
    if quant in fmt.auto:
        return select_scheme(recipe, fmt, quant, merged_dir, reference)
    return score_export(recipe, fmt, quant, merged_dir, reference, *_export(recipe, fmt, quant, merged_dir))


def score_export(recipe: Recipe, fmt, quant: str, merged_dir: Path, reference: dict, artifact: Path, calibration,
                 export_seconds: float, extra: dict | None = None) -> dict:
    """Score a written export on the test split against the fp32 model, write its record, and return it."""
    name, spec = fmt.name, f"{fmt.name}:{quant}"
    out_dir = recipe.run_dir / "exports" / f"{name}-{quant}"
    model, tokenizer = fmt.load(artifact, merged_dir)
    result = evaluate_tiers(scoring_recipe(recipe), model, tokenizer, test_records(recipe), progress=f"eval {spec}")
    write_eval(result, recipe.run_dir / "eval" / f"export-{name}-{quant}.json")
    primary = recipe.eval.metrics[0]
    score, fp32 = result["metrics"][primary], reference["metrics"][primary]
    retention = _retention(score, fp32)
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
        "calibration": calibration.manifest() if calibration else None, **(extra or {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # The report lists the records under its own provenance; the folder's file carries it for the folder alone.
    (out_dir / "dstune_export.json").write_text(json.dumps({**record, "provenance": provenance(recipe)}, indent=2))
    return record


def select_scheme(recipe: Recipe, fmt, alias: str, merged_dir: Path, reference: dict) -> dict:
    """Export every scheme `alias` stands for, keep the best one on the dev split, and score that one on test.

    Best: the highest dev retention among the schemes that pass export.min_retention on dev (the first listed wins
    a tie), else the highest dev retention. Choosing on the test split would make the test score of the choice an
    optimistic one. The record is the chosen scheme's, with `requested` and the dev `selection` table, and is also
    written to exports/<format>-<alias>/ for tools that look there.
    """
    from ..models.loading import load_model, load_tokenizer

    records = dev_records(recipe)
    if not records:
        raise InputError(f"{recipe.run_dir / 'data'}: no dev split to choose {fmt.name}:{alias}'s scheme on")
    primary, scoring = recipe.eval.metrics[0], scoring_recipe(recipe)
    fp32_model = load_model(str(merged_dir), recipe.model.dtype, recipe.model.trust_remote_code, False)
    tokenizer = load_tokenizer(Path(merged_dir), recipe.model.trust_remote_code)
    fp32 = evaluate_tiers(scoring, fp32_model, tokenizer, records, progress="eval fp32 (dev)")["metrics"][primary]
    del fp32_model
    candidates, written = [], {}
    fp32_bytes = weight_bytes(merged_dir)
    for quant in fmt.auto[alias]:
        artifact, calibration, seconds = _export(recipe, fmt, quant, merged_dir)
        model, tokenizer = fmt.load(artifact, merged_dir)
        score = evaluate_tiers(scoring, model, tokenizer, records,
                               progress=f"eval {fmt.name}:{quant} (dev)")["metrics"][primary]
        del model
        retention = _retention(score, fp32)
        candidates.append({"quant": quant, "dev_score": score, "dev_retention": round(retention, 4),
                           "passed": retention >= recipe.export.min_retention, "bytes": weight_bytes(artifact),
                           "size_ratio": round(weight_bytes(artifact) / fp32_bytes, 4) if fp32_bytes else None})
        written[quant] = artifact, calibration, seconds
    pool = [c for c in candidates if c["passed"]] or candidates
    chosen = max(pool, key=lambda c: c["dev_retention"])  # max keeps the first of equals
    selection = {"split": "dev", "records": len(records), "fp32_dev_score": fp32, "chosen": chosen["quant"],
                 "any_passed": any(c["passed"] for c in candidates), "candidates": candidates}
    record = score_export(recipe, fmt, chosen["quant"], merged_dir, reference, *written[chosen["quant"]],
                          extra={"requested": alias, "selection": selection})
    alias_dir = recipe.run_dir / "exports" / f"{fmt.name}-{alias}"
    alias_dir.mkdir(parents=True, exist_ok=True)
    (alias_dir / "dstune_export.json").write_text(json.dumps({**record, "provenance": provenance(recipe)}, indent=2))
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
