"""The run report: report.json (machine-readable, schema dstune.report/3), report.md and report.html (with plots)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers

from ..htmlreport import figure_png, markdown_html, pyplot
from ..provenance import provenance


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tiers(result: dict | None) -> dict | None:
    """The tier-1 and tier-3 figures of one evaluation, without the per-sample (and per-window) lists."""
    if not result:
        return None
    out = {}
    if "general" in result:
        out["general"] = {k: v for k, v in result["general"].items() if k not in ("predictions", "perplexity_windows")}
    if "checks" in result:
        out["checks"] = {k: v for k, v in result["checks"].items() if k not in ("completed", "failures")}
    return out


def build_report(recipe, base: dict | None, tuned: dict | None, train_summary: dict | None,
                 artifacts: dict, comparison: dict | None = None, exports: list[dict] | None = None,
                 few_shot: dict | None = None) -> dict:
    """Base vs tuned on the three tiers, training cost, exports, artifact paths and provenance (dstune.report/3).

    `few_shot`: the base model's k-shot result (evaluate.tiers.evaluate_few_shot), a row beside zero-shot base and
    tuned; `comparison["few_shot_paired"]` then holds tuned against it.
    """
    comparison = comparison or {}
    metrics = sorted(set((base or {}).get("metrics", {})) | set((tuned or {}).get("metrics", {})))
    rows = {}
    for name in metrics:
        before = (base or {}).get("metrics", {}).get(name)
        after = (tuned or {}).get("metrics", {}).get(name)
        delta = after - before if before is not None and after is not None else None
        rows[name] = {"base": before, "tuned": after, "delta": delta,
                      "base_ci": _ci((base or {}).get("ci", {}).get(name)),
                      "tuned_ci": _ci((tuned or {}).get("ci", {}).get(name)),
                      "paired": comparison.get("paired", {}).get(name)}
    training = None
    if train_summary:
        keys = ("method", "trainable_parameters", "total_parameters", "trainable_percent", "learning_rate", "optimizer_steps",
                "epochs", "train_seconds", "dev_eval_seconds", "tokens", "supervised_tokens", "tokens_per_second",
                "supervised_tokens_per_second", "best_metric", "train_loss")
        training = {k: train_summary.get(k) for k in keys}
        history = train_summary.get("log_history") or []
        training["loss_curve"] = [[e["step"], e["loss"]] for e in history if "loss" in e and "step" in e]
        training["dev_loss_curve"] = [[e["step"], e["eval_loss"]] for e in history if "eval_loss" in e]
    return {
        "schema": "dstune.report/3",
        "recipe": recipe.name,
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "metrics": rows,
        "general": {"base": (_tiers(base) or {}).get("general"), "tuned": (_tiers(tuned) or {}).get("general"),
                    "retention": comparison.get("retention")},
        "checks": {"base": (_tiers(base) or {}).get("checks"), "tuned": (_tiers(tuned) or {}).get("checks")},
        "errors": _errors(tuned or base),
        "test_samples": (tuned or base or {}).get("samples"),
        "training": training,
        "eval_tokens_per_second": {
            "base": (base or {}).get("tokens_per_second"), "tuned": (tuned or {}).get("tokens_per_second"),
        },
        "few_shot": few_shot_section(base, few_shot, tuned, comparison.get("few_shot_paired")),
        # One record per export (dstune.export.artifacts.export_and_score): size, retention, the gate's verdict.
        "exports": exports or [],
        "artifacts": artifacts,
        # The resolved recipe, versions and commit: `dstune run report.json` repeats this run.
        "provenance": provenance(recipe),
    }


def few_shot_section(base: dict | None, few_shot: dict | None, tuned: dict | None, paired: dict | None) -> dict | None:
    """The k-shot baseline beside zero-shot base and tuned: scores with CIs, tuned vs k-shot, and what a request costs."""
    if not few_shot:
        return None
    sides = {"base": base, "few_shot": few_shot, "tuned": tuned}
    return {
        **{k: v for k, v in few_shot["few_shot"].items() if k != "demonstrations"},
        "metrics": {name: {"value": value, "ci": _ci(few_shot.get("ci", {}).get(name))}
                    for name, value in few_shot["metrics"].items()},
        "paired": paired,  # b = tuned, a = the k-shot base
        "prompt_tokens_mean": {side: (r or {}).get("prompt_tokens_mean") for side, r in sides.items()},
        "seconds_per_answer": {side: (r or {}).get("seconds_per_answer") for side, r in sides.items()},
    }


def few_shot_table(report: dict) -> str:
    """Markdown: zero-shot base, k-shot base and tuned on each domain metric, and the cost of a request."""
    section = report["few_shot"]
    name = section["label"]
    lines = [f"| in-context baseline | base 0-shot | base {name} | tuned | tuned vs {name} |", "|---|---|---|---|---|"]
    for metric, row in report["metrics"].items():
        shot = section["metrics"].get(metric) or {}
        paired = (section.get("paired") or {}).get(metric)
        verdict = "-" if not paired else (f"{paired['diff']:+.4f}, {'significant' if paired['significant'] else 'not significant'} "
                                          f"(p={paired['p_value']:.3f})")
        lines.append(f"| {metric} | {_with_ci(row['base'], row.get('base_ci'))} | {_with_ci(shot.get('value'), shot.get('ci'))} | "
                     f"{_with_ci(row['tuned'], row.get('tuned_ci'))} | {verdict} |")
    tokens, seconds = section["prompt_tokens_mean"], section["seconds_per_answer"]
    lines.append(f"| prompt tokens (mean) | {_fmt(tokens['base'])} | {_fmt(tokens['few_shot'])} | {_fmt(tokens['tuned'])} | - |")
    lines.append(f"| seconds per answer | {_fmt(seconds['base'])} | {_fmt(seconds['few_shot'])} | {_fmt(seconds['tuned'])} | - |")
    pool = section["pool"]
    lines += ["", f"{name}: {section['k']} demonstrations per question from the {pool['kept']} source records of the "
                  f"training split (seed {section['seed']}; left out: {pool['dropped'] or 'none'}; augmented copies and "
                  f"replay, never demonstrations: {pool.get('not_source', 0)}). Seconds per answer "
                  "count freshly generated answers only (`-`: all came from the generation cache)."]
    return "\n".join(lines)


def _errors(result: dict | None, limit: int = 20) -> list[dict]:
    """The first answers that are not exact matches: input, expected and got."""
    from .metrics import exact_match

    wrong = [p for p in (result or {}).get("predictions", []) if not exact_match([p["got"]], [p["expected"]])]
    return [{k: p.get(k) for k in ("id", "input", "expected", "got")} for p in wrong[:limit]]


def _ci(ci: dict | None) -> list[float] | None:
    return None if ci is None else [ci["low"], ci["high"]]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _with_ci(value, ci) -> str:
    return _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def metrics_table(report: dict) -> str:
    """Markdown tables of the three tiers, base vs tuned (95% CIs; domain metrics with a paired test)."""
    lines = ["| tier 2: domain metric | base [95% CI] | tuned [95% CI] | delta | paired bootstrap |",
             "|---|---|---|---|---|"]
    for name, row in report["metrics"].items():
        paired = row.get("paired")
        verdict = "-" if not paired else (f"{'significant' if paired['significant'] else 'not significant'} "
                                          f"(p={paired['p_value']:.3f})")
        lines.append(f"| {name} | {_with_ci(row['base'], row.get('base_ci'))} | "
                     f"{_with_ci(row['tuned'], row.get('tuned_ci'))} | {_fmt(row['delta'])} | {verdict} |")
    if report.get("few_shot"):
        lines += ["", few_shot_table(report)]
    general = report.get("general") or {}
    if general.get("base") or general.get("tuned"):
        b, t, r = general.get("base") or {}, general.get("tuned") or {}, general.get("retention") or {}
        gate = r.get("passed")
        verdict = "no gate" if gate is None else ("passed" if gate else "FAILED")
        if gate is False and r.get("on_fail") == "warn":
            verdict += " (warning only: eval.general.on_fail=warn)"
        lines += ["", "| tier 1: general | base [95% CI] | tuned [95% CI] | retention [95% CI] |", "|---|---|---|---|"]
        for name, label in (("accuracy", f"{b.get('metric', 'exact_match')} ({b.get('samples', '-')} questions)"),
                            ("perplexity", f"perplexity ({b.get('perplexity_tokens', '-')} tokens)")):
            lines.append(f"| {label} | {_with_ci(b.get(name), b.get(f'{name}_ci'))} | "
                         f"{_with_ci(t.get(name), t.get(f'{name}_ci'))} | {_with_ci(r.get(name), r.get(f'{name}_ci'))} |")
        lines += ["", f"General retention gate (min {_fmt(r.get('min_retention'))}, on the point estimates): {verdict}, "
                      f"worst retention {_fmt(r.get('worst'))}."]
    checks = report.get("checks") or {}
    if checks.get("base") or checks.get("tuned"):
        b, t = checks.get("base") or {}, checks.get("tuned") or {}
        lines += ["", "| tier 3: business check | base | tuned |", "|---|---|---|"]
        for name in (t or b)["pass_rates"]:
            lines.append(f"| {name} | {_fmt(b.get('pass_rates', {}).get(name))} | "
                         f"{_fmt(t.get('pass_rates', {}).get(name))} |")
        lines.append(f"| completion rate (all pass) | {_fmt(b.get('completion_rate'))} | "
                     f"{_fmt(t.get('completion_rate'))} |")
    if report.get("exports"):
        lines += ["", exports_table(report["exports"])]
    return "\n".join(lines)


def exports_table(exports: list[dict]) -> str:
    """Markdown table of the exports: size against fp32, domain score and its retention, the gate."""
    lines = ["| export | weights MB | % of fp32 | domain score | retention | completion rate | eval tokens/s | gate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in exports:
        gate = f"{'passed' if r['passed'] else 'FAILED'} (min {r['min_retention']})"
        size = f"{100 * r['size_ratio']:.1f}%" if r.get("size_ratio") is not None else "-"
        speed = "cached" if r.get("eval_tokens_per_second") is None and r.get("cached_answers") else \
            _fmt(r.get("eval_tokens_per_second"))
        lines.append(f"| {r['format']}:{r['quant']} | {r['bytes'] / 1e6:.1f} | {size} | {r['metric']} "
                     f"{_with_ci(r['score'], _ci(r.get('ci')))} (fp32 {_fmt(r['fp32_score'])}) | {_fmt(r['retention'])} | "
                     f"{_fmt(r.get('completion_rate'))} | {speed} | {gate} |")
    return "\n".join(lines)


def write_report(report: dict, run_dir: Path) -> Path:
    """Write report.json and report.md into the run folder; returns the markdown path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    parts = [f"# dstune report: {report['recipe']}", "", f"Test samples: {report['test_samples']}", ""]
    if report.get("test_data"):  # `dstune eval --test-file`: the file's own checks
        books = report["test_data"]["quality"]["splits"]["test"]
        parts += [f"Test file: `{report['test_data']['test_file']}`: {books['input']} records, {books['kept']} kept, "
                  f"dropped by reason: {books['dropped'] or 'none'}.", ""]
    choice = report.get("metric_choice")
    if choice and choice.get("applied"):  # the recipe named no metrics: say what the data chose, and why
        chosen = ", ".join(f"{key} = {choice[key]}" for key in choice["applied"])
        parts += [f"Chosen from the data, as the recipe sets none: {chosen}. Why: {choice['why']}.", ""]
    parts += [metrics_table(report), ""]
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
    if report.get("errors"):
        parts += ["## Errors of the tuned model", "", "| id | input | expected | got |", "|---|---|---|---|"]
        parts += [f"| {e['id']} | {_cell(e['input'])} | {_cell(e['expected'])} | {_cell(e['got'])} |"
                  for e in report["errors"]] + [""]
    m = report["machine"]
    parts += ["## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in report["artifacts"].items() if v]
    parts += ["", f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
              f"transformers {m['transformers']}.", ""]
    if report.get("provenance"):
        parts += provenance_markdown(report["provenance"], run_dir / "report.json")
    path = run_dir / "report.md"
    markdown = "\n".join(parts)
    path.write_text(markdown)
    (run_dir / "report.html").write_text(markdown_html(f"dstune report: {report['recipe']}", markdown,
                                                       report_pngs(report)), encoding="utf-8")
    return path


def provenance_markdown(record: dict, report_file: Path) -> list[str]:
    """Lines for report.md: versions and commit, how to re-run, and the resolved recipe as key=value overrides."""
    git = record.get("git") or {}
    commit = (f"git {git['commit']}" + (" with uncommitted changes" if git.get("dirty") else "")
              if git.get("commit") else "not a git checkout")
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    lines = ["## Provenance", "", f"dstune {record.get('dstune')} ({commit}); {versions}.", "",
             f"Re-run: `dstune run {report_file}` (add `name=...` for a fresh run folder).", "",
             "## Recipe (resolved)", ""]
    return lines + [f"- {key}={json.dumps(value)}" for key, value in _flat(record.get("recipe") or {})] + [""]


def _flat(tree: dict, prefix: str = ""):
    """(key.path, value) for each leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _cell(text) -> str:
    return " ".join(str(text or "").split()).replace("|", "/")[:120]


def report_pngs(report: dict) -> dict[str, bytes]:
    """Plots: loss curves, base vs tuned metrics with 95% CIs, the general retention gate (with 95% CIs)."""
    plt = pyplot()
    pngs = {}
    training = report.get("training") or {}
    if training.get("loss_curve"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, losses = zip(*training["loss_curve"])
        ax.plot(steps, losses, label="training loss")
        if training.get("dev_loss_curve"):
            steps, losses = zip(*training["dev_loss_curve"])
            ax.plot(steps, losses, marker="o", label="dev loss")
        ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
        ax.legend()
        pngs["loss"] = figure_png(fig)
    rows = report.get("metrics") or {}
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(rows)
        sides = [("base", "tab:gray", [rows[n]["base"] for n in names], [rows[n].get("base_ci") for n in names])]
        shot = report.get("few_shot")
        if shot:
            sides.append((f"base {shot['label']}", "tab:orange", [shot["metrics"].get(n, {}).get("value") for n in names],
                          [shot["metrics"].get(n, {}).get("ci") for n in names]))
        sides.append(("tuned", "tab:blue", [rows[n]["tuned"] for n in names], [rows[n].get("tuned_ci") for n in names]))
        width = 0.8 / len(sides)
        for k, (side, colour, values, cis) in enumerate(sides):
            values = [v or 0.0 for v in values]
            cis = [c or [v, v] for c, v in zip(cis, values)]
            errors = [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]
            ax.bar([i + width * k for i in range(len(names))], values, width=width, yerr=errors, capsize=4,
                   color=colour, label=side)
        ax.set_xticks([i + width * (len(sides) - 1) / 2 for i in range(len(names))], names)
        ax.set(ylim=(0, 1.05), ylabel="score (95% CI)",
               title="Domain metrics, base vs tuned" + (" (and k-shot)" if shot else ""))
        ax.legend()
        pngs["metrics"] = figure_png(fig)
    retention = (report.get("general") or {}).get("retention")
    if retention:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        kinds = [k for k in ("accuracy", "perplexity") if retention.get(k) is not None]
        floor = retention.get("min_retention") or 0.0
        cis = [retention.get(f"{k}_ci") or [retention[k], retention[k]] for k in kinds]
        errors = [[retention[k] - c[0] for k, c in zip(kinds, cis)], [c[1] - retention[k] for k, c in zip(kinds, cis)]]
        ax.bar(kinds, [retention[k] for k in kinds], yerr=errors, capsize=4,
               color=["tab:green" if retention[k] >= floor else "tab:red" for k in kinds])
        if retention.get("min_retention"):
            ax.axhline(retention["min_retention"], color="k", linestyle="--", label=f"gate {retention['min_retention']}")
            ax.legend()
        ax.set(ylabel="tuned / base (perplexity: base / tuned), 95% CI", title="General ability retention")
        pngs["retention"] = figure_png(fig)
    exports = report.get("exports") or []
    if exports:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [f"{r['format']}:{r['quant']}" for r in exports]
        ax.bar(names, [r["retention"] for r in exports],
               color=["tab:green" if r["passed"] else "tab:red" for r in exports])
        ax.axhline(exports[0]["min_retention"], color="k", linestyle="--", label=f"gate {exports[0]['min_retention']}")
        for i, r in enumerate(exports):
            ax.annotate(f"{100 * (r.get('size_ratio') or 0):.0f}% size", (i, r["retention"]), ha="center", va="bottom")
        ax.set(ylabel="domain score / fp32", title="Exports: retention (and size vs fp32)")
        ax.legend()
        pngs["exports"] = figure_png(fig)
    return pngs
