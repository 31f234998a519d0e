"""A toy arithmetic domain, from outside dstune: "2+3" -> "5".

Its three plugins reach dstune through entry points only (tests/plugins/pyproject.toml): the data source
`toy_arith` (options: the recipe section data.toy_arith), the metric `numeric_close` and the verifier `is_integer`.
"""

from __future__ import annotations

import itertools
import random
import re

from pydantic import Field

from dstune.config import StrictModel
from dstune.data.sources import Source
from dstune.evaluate.metrics import final_answer

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class ToyArithOptions(StrictModel):
    """The recipe section data.toy_arith."""

    # Records in all, each a different sum: at most (max_operand + 1) ** 2.
    n: int = Field(40, ge=3)
    seed: int = 0
    max_operand: int = Field(9, ge=1)
    # A tenth of the records each for dev and test (at least one).
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5)


class ToyArith(Source):
    """Sums of two operands, each asked once, shuffled by `seed` and split into train/dev/test."""

    options = ToyArithOptions

    def build(self, options: ToyArithOptions, data, log):
        pairs = list(itertools.product(range(options.max_operand + 1), repeat=2))
        if options.n > len(pairs):
            raise ValueError(f"data.toy_arith.n: at most {len(pairs)} different sums with max_operand "
                             f"{options.max_operand}")
        random.Random(options.seed).shuffle(pairs)
        records = [{"id": f"toy-{i}", "messages": [{"role": "user", "content": f"{a}+{b}"},
                                                   {"role": "assistant", "content": str(a + b)}],
                    "meta": {"operands": [a, b]}} for i, (a, b) in enumerate(pairs[:options.n])]
        k = max(1, round(options.eval_fraction * options.n))
        splits = {"dev": records[:k], "test": records[k:2 * k], "train": records[2 * k:]}
        for split, items in splits.items():
            log.seen(split, len(items))
        return splits, {"sums": options.n, "max_operand": options.max_operand}


def _number(text: str) -> float | None:
    found = _NUMBER.search(final_answer(text))
    return float(found.group()) if found else None


def numeric_close(predictions: list[str], references: list[str]) -> float:
    """Share of answers whose first number is within 1 of the reference's."""
    if not references:
        return 0.0
    hits = 0
    for prediction, reference in zip(predictions, references):
        got, want = _number(prediction), _number(reference)
        hits += got is not None and want is not None and abs(got - want) <= 1
    return hits / len(references)


def is_integer(answer: str, record: dict) -> bool:
    """The answer is a whole number and nothing else."""
    return re.fullmatch(r"[-+]?\d+", final_answer(answer)) is not None
