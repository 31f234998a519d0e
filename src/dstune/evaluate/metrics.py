"""Domain metrics, from a registry (dstune.plugins.METRICS): each maps predictions and references to a score in [0, 1].

The generic metrics live here; a domain registers its own (the ICD-10 demo's `valid_icd10`: dstune.domains.icd10),
and packages add theirs through the `dstune.metrics` entry point group.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Callable

from ..plugins import METRICS

MetricFn = Callable[[list[str], list[str]], float]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# Lookarounds, not \b: in "答案是B" the Han character is a word character, so \b would not split it.
_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-E])(?![A-Za-z0-9])")
_ENTITY = re.compile(r"\[\s*([^\[\]:]+?)\s*:\s*([^\[\]]+?)\s*\]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_BINARY = {"1": 1, "yes": 1, "true": 1, "0": 0, "no": 0, "false": 0}
# Han, kana and the compatibility ideographs: scripts written without spaces between words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAS_CJK = re.compile(f"[{_CJK}]")
_CHAR_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_WORD = re.compile(r"[^\W_]")


def final_answer(text: str) -> str:
    """The answer without a reasoning block, surrounding whitespace or a closing period."""
    text = _THINK.sub("", text)
    if "</think>" in text:  # a template that opens <think> in the prompt
        text = text.split("</think>", 1)[1]
    return text.strip().rstrip(".").strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of answers equal to the reference, ignoring case, whitespace and <think> blocks."""
    if not references:
        return 0.0
    hits = sum(final_answer(p).casefold() == final_answer(r).casefold() for p, r in zip(predictions, references))
    return hits / len(references)


def _is_correct(prediction: str, reference: str) -> bool:
    """Whether the answer matches; against a letter A-E, the prediction's first standalone capital letter counts."""
    answer, ref = final_answer(prediction), final_answer(reference)
    found = _LETTER.search(answer) if re.fullmatch("[A-E]", ref) else None
    if found:
        return found.group(1) == ref
    return answer.casefold() == ref.casefold()


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Share of correct answers; for a multiple-choice reference (A-E) the answer letter is compared."""
    if not references:
        return 0.0
    return sum(_is_correct(p, r) for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: list[str], references: list[str]) -> float:
    """Macro F1 over the reference classes; a label outside them is a miss for the reference's class."""
    from sklearn.metrics import f1_score

    if not references:
        return 0.0
    truth = [final_answer(r).casefold() for r in references]
    guess = [final_answer(p).casefold() for p in predictions]
    return float(f1_score(truth, guess, labels=sorted(set(truth)), average="macro", zero_division=0))


class _Tokenizer:
    """Adapts a function to the `.tokenize(text)` object rouge-score expects."""

    def __init__(self, split: Callable[[str], list[str]]):
        self.tokenize = split


def _char_tokens(text: str) -> list[str]:
    """One token per CJK character, one per run of other letters and digits."""
    return _CHAR_TOKEN.findall(text.casefold())


def _jieba_tokens(text: str) -> list[str]:
    """Words as jieba segments them, without whitespace and punctuation."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary load prints to stderr otherwise
    return [t for t in jieba.lcut(text.casefold()) if _WORD.search(t)]


CJK_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"char": _char_tokens, "jieba": _jieba_tokens}
ROUGE_VARIANTS = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=None)
def _scorer(variant: str, chinese: str | None):
    """A rouge-score scorer: its default tokenizer, or the named CJK one."""
    from rouge_score.rouge_scorer import RougeScorer

    if chinese is None:
        return RougeScorer([variant])
    return RougeScorer([variant], tokenizer=_Tokenizer(CJK_TOKENIZERS[chinese]))


def rouge_metric(variant: str, chinese: str = "char") -> MetricFn:
    """A ROUGE F-measure metric averaged over samples; CJK samples are split by `chinese` ("char" or "jieba")."""
    if variant not in ROUGE_VARIANTS or chinese not in CJK_TOKENIZERS:
        raise ValueError(f"rouge_metric({variant!r}, {chinese!r}): variant in {ROUGE_VARIANTS}, "
                         f"chinese in {sorted(CJK_TOKENIZERS)}")

    def rouge(predictions: list[str], references: list[str]) -> float:
        if not references:
            return 0.0
        total = 0.0
        for p, r in zip(predictions, references):
            p, r = final_answer(p), final_answer(r)
            # rouge-score's default tokenizer keeps only [a-z0-9], so CJK text would score 0.
            scorer = _scorer(variant, chinese if _HAS_CJK.search(p + r) else None)
            total += scorer.score(r, p)[variant].fmeasure  # target first
        return total / len(references)

    rouge.__name__ = variant if chinese == "char" else f"{variant}_{chinese}"
    rouge.__doc__ = f"{variant} F-measure averaged over samples, CJK text tokenised by {chinese}."
    return rouge


def _normalise(text: str) -> str:
    """Casefolded, with runs of whitespace collapsed to one space."""
    return " ".join(text.casefold().split())


def _entities(text: str) -> Counter:
    """The multiset of (type, text) spans written as `[type: text]`, casefolded with whitespace collapsed."""
    return Counter((_normalise(kind), _normalise(span)) for kind, span in _ENTITY.findall(final_answer(text)))


def entity_f1(predictions: list[str], references: list[str]) -> float:
    """Micro F1 of inline entity spans `[type: text]` (e.g. "[drug: metformin]"), matched per sample on (type, text).

    Samples without entities on either side add nothing; with no entities anywhere the score is 1.0.
    """
    if not references:
        return 0.0
    hits = guessed = wanted = 0
    for p, r in zip(predictions, references):
        pred, ref = _entities(p), _entities(r)
        hits += sum((pred & ref).values())
        guessed += sum(pred.values())
        wanted += sum(ref.values())
    return 1.0 if guessed + wanted == 0 else 2 * hits / (guessed + wanted)


def _score(text: str) -> float:
    """The first number in the final answer; 0.0 when there is none."""
    found = _NUMBER.search(final_answer(text))
    return float(found.group()) if found else 0.0


def auc(predictions: list[str], references: list[str]) -> float:
    """ROC AUC of numeric predictions against 0/1 (yes/no, true/false) references; 0.5 with one class."""
    from sklearn.metrics import roc_auc_score

    if not references:
        return 0.0
    labels = []
    for r in references:
        key = final_answer(r).casefold()
        if key not in _BINARY:
            raise ValueError(f"auc: reference {r!r} is not one of {sorted(_BINARY)}")
        labels.append(_BINARY[key])
    if len(set(labels)) < 2:  # AUC is undefined; chance is the honest value
        return 0.5
    return float(roc_auc_score(labels, [_score(p) for p in predictions]))


def contains_answer(predictions: list[str], references: list[str]) -> float:
    """Share of answers that contain the reference (whole words; any substring for Chinese), ignoring case.

    For open questions to chatty models: "The capital of France is Paris." answers "Paris".
    """
    if not references:
        return 0.0
    hits = 0
    for prediction, reference in zip(predictions, references):
        got, want = final_answer(prediction).casefold(), final_answer(reference).casefold()
        if _HAS_CJK.search(want) or not re.match(r"\w", want):
            hits += want in got
        else:
            hits += re.search(rf"(?<!\w){re.escape(want)}(?!\w)", got) is not None
    return hits / len(references)


BUILTIN_METRICS: dict[str, MetricFn] = {
    "contains_answer": contains_answer,
    "exact_match": exact_match,
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "entity_f1": entity_f1,
    "auc": auc,
    **{v: rouge_metric(v, "char") for v in ROUGE_VARIANTS},
    **{f"{v}_jieba": rouge_metric(v, "jieba") for v in ROUGE_VARIANTS},
}
for _name, _metric in BUILTIN_METRICS.items():
    METRICS.register(_name, _metric)


def register_metric(name: str, metric: MetricFn) -> None:
    """Add a metric to the registry (recipes name it in `eval.metrics`); same as `METRICS.register(name, metric)`."""
    len(METRICS)  # load the registered metrics first, so that a metric of the same name replaces them
    METRICS.register(name, metric)
