"""The run report: report.json (machine-readable) and report.md (for people)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_report(recipe_name: str, base: dict | None, tuned: dict | None, train_summary: dict | None,
                 artifacts: dict) -> dict:
    """Base vs tuned metrics, training cost and artifact paths in one dictionary."""
    metrics = sorted(set((base or {}).get("metrics", {})) | set((tuned or {}).get("metrics", {})))
    comparison = {}
    for name in metrics:
        before = (base or {}).get("metrics", {}).get(name)
        after = (tuned or {}).get("metrics", {}).get(name)
        delta = after - before if before is not None and after is not None else None
        comparison[name] = {"base": before, "tuned": after, "delta": delta}
    training = None
    if train_summary:
        keys = ("method", "trainable_parameters", "total_parameters", "trainable_percent", "learning_rate", "optimizer_steps",
                "epochs", "train_seconds", "dev_eval_seconds", "tokens", "supervised_tokens", "tokens_per_second",
                "supervised_tokens_per_second", "best_metric", "train_loss")
        training = {k: train_summary.get(k) for k in keys}
    return {
        "schema": "dstune.report/1",
        "recipe": recipe_name,
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "metrics": comparison,
        "test_samples": (tuned or base or {}).get("samples"),
        "training": training,
        "eval_tokens_per_second": {
            "base": (base or {}).get("tokens_per_second"), "tuned": (tuned or {}).get("tokens_per_second"),
        },
        "artifacts": artifacts,
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(report: dict) -> str:
    """A markdown table of base vs tuned metrics."""
    lines = ["| metric | base | tuned | delta |", "|---|---|---|---|"]
    for name, row in report["metrics"].items():
        lines.append(f"| {name} | {_fmt(row['base'])} | {_fmt(row['tuned'])} | {_fmt(row['delta'])} |")
    return "\n".join(lines)


def write_report(report: dict, run_dir: Path) -> Path:
    """Write report.json and report.md into the run folder; returns the markdown path."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    parts = [f"# dstune report: {report['recipe']}", "", f"Test samples: {report['test_samples']}", "",
             metrics_table(report), ""]
    if report["training"]:
        t = report["training"]
        parts += [
            "## Training", "",
            f"- trainable parameters: {t['trainable_parameters']:,} of {t['total_parameters']:,} "
            f"({t['trainable_percent']:.3f}%)",
            f"- optimizer steps: {t['optimizer_steps']} ({t['epochs']} epochs), learning rate {t['learning_rate']:g}",
            f"- training time: {t['train_seconds']:.1f} s, of which {t['dev_eval_seconds']:.1f} s dev evaluation",
            f"- throughput (dev evaluation excluded): {t['tokens_per_second']:.1f} tokens/s "
            f"({t['supervised_tokens_per_second']:.1f} supervised tokens/s)",
            f"- best dev metric: {t['best_metric']}",
            "",
        ]
    m = report["machine"]
    parts += ["## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in report["artifacts"].items() if v]
    parts += ["", f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
              f"transformers {m['transformers']}.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
