"""The data report: report.md and a self-contained report.html with PNG plots (also saved under plots/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..htmlreport import figure_png, markdown_html, pyplot

SPLIT_ORDER = ("train", "dev", "test", "replay", "unsplit")


def length_stats(out: Path, max_length: int, bins: int = 32) -> dict:
    """Token-length histogram and percentiles of every split file (from meta.tokens), streamed."""
    stats = {}
    for path in sorted(out.glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            lengths = np.fromiter((json.loads(line)["meta"].get("tokens", 0) for line in handle if line.strip()),
                                  dtype=np.int64)
        if not len(lengths):
            continue
        counts, edges = np.histogram(lengths, bins=bins, range=(0, max(max_length, int(lengths.max()))))
        stats[path.stem] = {"count": int(len(lengths)), "mean": round(float(lengths.mean()), 1),
                            "p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95)),
                            "max": int(lengths.max()), "histogram": {"counts": counts.tolist(),
                                                                     "edges": edges.round(1).tolist()}}
    return stats


def _listed(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "0"


def _rows(quality: dict) -> list[tuple[str, dict]]:
    splits = quality["splits"]
    return [(s, splits[s]) for s in sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))]


def report_markdown(name: str, manifest: dict) -> str:
    """The data report as markdown: the books per split, the stages, coverage, domain filter, augmentation."""
    quality = manifest["quality"]
    lines = [f"# Data report: {name}", "", f"Source: `{manifest['source']}`.", "",
             "| split | input | kept | dropped | changed | added |", "|---|---|---|---|---|---|"]
    for split, row in _rows(quality):
        lines.append(f"| {split} | {row['input']} | {row['kept']} | {_listed(row['dropped'])} | "
                     f"{_listed(row['changed'])} | {_listed(row.get('added', {}))} |")
    if manifest.get("stages"):
        lines += ["", "Records after each stage: " + "; ".join(
            f"{s['stage']} " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "stage")
            for s in manifest["stages"]) + "."]
    choice = manifest.get("metric_choice")
    if choice and choice.get("applied"):
        chosen = ", ".join(f"{key} = {choice[key]}" for key in choice["applied"])
        lines += ["", f"Chosen from the answers, as the recipe sets none: {chosen}. Why: {choice['why']}."]
    for split, stats in manifest.get("lengths", {}).items():
        lines.append(f"- {split}: {stats['count']} samples, tokens mean {stats['mean']}, median {stats['p50']}, "
                     f"p95 {stats['p95']}, max {stats['max']}")
    if manifest.get("adversarial"):
        adv = manifest["adversarial"]
        threshold = "none (scores only)" if adv["threshold"] is None else f"{adv['threshold']}"
        if adv.get("quantile") is not None:
            threshold += f" (quantile {adv['quantile']})"
        lines += ["", "## Adversarial validation", "",
                  f"Reference {adv['reference']} records vs {adv['candidates']} training candidates, {adv['features']} "
                  f"features, {adv['folds']}-fold CV: AUC {adv['auc']} (folds {', '.join(map(str, adv['auc_folds']))}). "
                  f"Threshold {threshold}: kept {adv['kept']}, dropped {adv['dropped']}.", ""]
        for title, key in (("Lowest-scoring kept", "lowest_kept"), ("Highest-scoring dropped", "highest_dropped")):
            if adv[key]:
                lines += [f"{title}:", ""] + [f"- {e['score']:.3f} `{e['where']}`: {e['text'][:120]!r}"
                                              for e in adv[key]] + [""]
    if manifest.get("coverage"):
        cov = manifest["coverage"]
        train = cov["train"]
        lines += ["", f"Coverage by `{cov['by']}`: {train['covered']}/{train['strata']} strata in train "
                      f"({100 * train['coverage']:.1f}%), at least {train['min_count']} examples each."]
        if train["uncovered"]:
            lines.append(f"Uncovered: {', '.join(train['uncovered'][:50])}.")
        for split in ("dev", "test"):
            if f"{split}_strata_in_train" in cov:
                part = cov[f"{split}_strata_in_train"]
                lines.append(f"{split.capitalize()} strata seen in train: {part['covered']}/{part['strata']} "
                             f"({100 * part['coverage']:.1f}%).")
    if manifest.get("augmentation"):
        aug = manifest["augmentation"]
        lines += ["", f"Augmentation rules {', '.join(aug['rules'])}, {aug['copies']} "
                      f"cop{'y' if aug['copies'] == 1 else 'ies'} per record: {_listed(aug['outcomes'])}."]
    if manifest.get("replay"):
        rep = manifest["replay"]
        lines += ["", f"General replay: {rep['added']} records from `{rep['file']}` (ratio {rep['ratio']}, "
                      f"{rep['wanted']} wanted, {rep['available']} available after the checks)."]
    if quality.get("closest_pairs"):
        threshold = manifest.get("near_threshold")
        lines += ["", "## Closest kept pairs", "",
                  f"Kept as distinct, below data.quality.near_threshold"
                  f"{f' = {threshold}' if threshold is not None else ''}: the estimated Jaccard similarity of their "
                  "word 3-grams (character 3-grams in Chinese). Lower the threshold to drop such pairs.", "",
                  "| split | similarity | record | closest to |", "|---|---|---|---|"]
        for split, pairs in quality["closest_pairs"].items():
            lines += [f"| {split} | {p['similarity']:.3f} | `{p['record']}` | `{p['closest_to']}` |" for p in pairs]
    for reason, examples in sorted(quality["examples"].items()):
        lines += ["", f"## {reason}", ""] + [f"- `{e}`" for e in examples]
    return "\n".join(lines) + "\n"


def plot_pngs(manifest: dict) -> dict[str, bytes]:
    """PNG plots: token lengths per split, domain scores with the threshold, drops by reason."""
    plt = pyplot()
    pngs = {}
    lengths = manifest.get("lengths", {})
    if lengths:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for split, stats in lengths.items():
            edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
            ax.stairs(np.asarray(counts) / max(1, sum(counts)), edges, label=f"{split} ({stats['count']})")
        ax.axvline(manifest["max_length"], color="k", linestyle="--", linewidth=1, label="max_length")
        ax.set(xlabel="tokens (with the chat template)", ylabel="fraction of samples", title="Sample lengths")
        ax.legend()
        pngs["lengths"] = figure_png(fig)
    adv = manifest.get("adversarial")
    if adv:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.stairs(adv["histogram"]["counts"], adv["histogram"]["edges"], fill=True, alpha=0.6)
        if adv["threshold"] is not None:
            ax.axvline(adv["threshold"], color="r", linestyle="--", label=f"threshold {adv['threshold']}")
            ax.legend()
        ax.set(xlabel="domain score (out-of-fold P(reference))", ylabel="training records",
               title=f"Adversarial validation, AUC {adv['auc']}")
        pngs["domain_scores"] = figure_png(fig)
    drops = {}
    for split, row in manifest["quality"]["splits"].items():
        for reason, count in row["dropped"].items():
            drops[f"{split}: {reason}"] = count
    if drops:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(drops) + 1.2))
        names = sorted(drops, key=drops.get)
        ax.barh(names, [drops[n] for n in names])
        ax.set(xlabel="records dropped", title="Drops by reason")
        pngs["drops"] = figure_png(fig)
    return pngs


def write_reports(out: Path, name: str, manifest: dict) -> None:
    """report.md, report.html and plots/*.png in the dataset folder (the manifest gains the length stats)."""
    manifest["lengths"] = length_stats(out, manifest["max_length"])
    (out / "report.md").write_text(report_markdown(name, manifest), encoding="utf-8")
    pngs = plot_pngs(manifest)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for plot, png in pngs.items():
        (plots / f"{plot}.png").write_bytes(png)
    (out / "report.html").write_text(markdown_html(f"Data report: {name}", report_markdown(name, manifest), pngs),
                                     encoding="utf-8")
