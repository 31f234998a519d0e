"""Adversarial validation: how well can a classifier tell the training records from a target-domain sample?

A logistic regression (scikit-learn) learns reference-vs-candidate from TF-IDF character n-grams, or from a local
model's embeddings. Its cross-validated AUC says how far the candidates are from the target domain (0.5: the
classifier can't tell them apart). Each candidate's out-of-fold P(reference) is its domain score; candidates
below a threshold (a value or a quantile) are dropped.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .quality import DropLog, record_text, where


def tfidf_features(texts: list[str]):
    """TF-IDF of character 2-4-grams within words: works for English and Chinese alike."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True,
                                 max_features=1 << 18)
    return vectorizer.fit_transform(texts)


def embedding_features(texts: list[str], model_dir: str, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled last hidden states of a local model (no download: local files only)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        # Never the model's own code: an embedding model is data to this stage, not a program.
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                          trust_remote_code=False).eval()
    except (OSError, ValueError) as exc:
        raise InputError(f"data.adversarial.embedding_model: cannot load {model_dir!r} ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
    return np.concatenate(out)


def domain_scores(candidates: list[str], reference: list[str], features: str = "tfidf",
                  embedding_model: str | None = None, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Out-of-fold P(reference) of each candidate, and the cross-validated AUC (pooled and per fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    texts = reference + candidates
    labels = np.r_[np.ones(len(reference), dtype=int), np.zeros(len(candidates), dtype=int)]
    folds = min(folds, len(reference), len(candidates))
    if folds < 2:
        raise InputError("data.adversarial.reference: needs at least 2 reference and 2 candidate records")
    x = embedding_features(texts, embedding_model) if features == "embeddings" else tfidf_features(texts)
    # Balanced weights: the reference is usually much smaller than the pool, and scores then centre on 0.5.
    classifier = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(classifier, x, labels, cv=splitter, method="predict_proba")[:, 1]
    per_fold = [roc_auc_score(labels[test], proba[test]) for _, test in splitter.split(texts, labels)]
    stats = {"auc": round(float(roc_auc_score(labels, proba)), 4),
             "auc_folds": [round(float(a), 4) for a in per_fold], "folds": folds,
             "reference": len(reference), "candidates": len(candidates), "features": features}
    return proba[len(reference):], stats


def adversarial_filter(records: list[dict], reference: list[str], options, log: DropLog, seed: int = 0,
                       split: str = "train") -> tuple[list[dict], dict]:
    """Keep the records at or above the domain-score threshold; the report has the AUC and boundary examples."""
    scores, stats = domain_scores([record_text(r) for r in records], reference, options.features,
                                  options.embedding_model, options.folds, seed)
    if options.quantile is not None:
        threshold = float(np.quantile(scores, options.quantile))
    else:
        threshold = options.threshold
    order = np.argsort(scores, kind="stable")
    keep = np.ones(len(records), dtype=bool) if threshold is None else scores >= threshold
    kept = []
    for record, score, ok in zip(records, scores, keep):
        record["meta"]["domain_score"] = round(float(score), 4)
        if ok:
            kept.append(record)
        else:
            log.drop(split, "off_domain", where(record), f"domain score {score:.3f} < {threshold:.3f}", problem=False)

    def example(i: int) -> dict:
        return {"score": round(float(scores[i]), 4), "where": where(records[i]),
                "text": record_text(records[i])[:200]}

    lowest_kept = [example(i) for i in order if keep[i]][: options.examples]
    highest_dropped = [example(i) for i in order[::-1] if not keep[i]][: options.examples]
    counts, edges = np.histogram(scores, bins=20, range=(0.0, 1.0))
    report = {**stats, "threshold": None if threshold is None else round(threshold, 4),
              "quantile": options.quantile, "dropped": int((~keep).sum()), "kept": int(keep.sum()),
              "lowest_kept": lowest_kept, "highest_dropped": highest_dropped,
              "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 3) for e in edges]}}
    return kept, report
