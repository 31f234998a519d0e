"""Rule-based augmentation (Chinese and English): doses, dates and synonyms, seeded and consistent.

A rule proposes substitutions (old text -> new text) in the prompt turns. Each one is applied to the answer as
well wherever the old text occurs there. If the answer holds the value in a form the rule cannot rewrite
consistently (a dose's bare number, a year), the record is not augmented, and that is counted.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import InputError


@dataclass
class Substitution:
    """Replace `old` by `new`; `guards` are texts whose presence in the answer makes the change inconsistent."""

    old: str
    new: str
    guards: tuple[str, ...] = ()


RuleFn = Callable[[str, random.Random, dict], list[Substitution]]

_UNITS = r"mg|mcg|μg|µg|g|ml|mL|IU|units?|毫克|微克|克|毫升|单位"
_DOSE = re.compile(rf"(?<![\d.])(\d+(?:\.\d+)?)\s*({_UNITS})(?![A-Za-z])")


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def dose_rule(text: str, rng: random.Random, options: dict) -> list[Substitution]:
    """`25mg -> 50mg`: scale each dose by a factor, keeping it inside the unit's range when one is given."""
    factors = options.get("factors", [0.5, 2.0])
    ranges = options.get("ranges", {})
    subs = []
    for match in _DOSE.finditer(text):
        number, unit = match.group(1), match.group(2)
        low, high = ranges.get(unit, [0, float("inf")])
        choices = [f for f in factors if low <= float(number) * f <= high]
        if not choices:
            continue
        new = _format_number(float(number) * rng.choice(choices))
        spacing = match.group(0)[len(number):-len(unit)]
        # The bare number in the answer (without its unit) cannot be matched to this dose for sure.
        subs.append(Substitution(match.group(0), f"{new}{spacing}{unit}", guards=(number,)))
    return subs


_YEAR_ZH = re.compile(r"(?:19|20)\d{2}年")
_YEAR_EN = re.compile(r"\bin (?:19|20)\d{2}\b")


def date_rule(text: str, rng: random.Random, options: dict) -> list[Substitution]:
    """`2023年 -> 最近三年`, `in 2023 -> in the past three years`: generalise a year to a period."""
    periods_zh = options.get("periods_zh", ["最近三年", "近几年", "过去一年"])
    periods_en = options.get("periods_en", ["in the past three years", "in recent years", "in the past year"])
    subs = []
    for match in _YEAR_ZH.finditer(text):
        subs.append(Substitution(match.group(0), rng.choice(periods_zh), guards=(match.group(0)[:4],)))
    for match in _YEAR_EN.finditer(text):
        subs.append(Substitution(match.group(0), rng.choice(periods_en), guards=(match.group(0)[3:],)))
    return subs


def synonym_rule(text: str, rng: random.Random, options: dict) -> list[Substitution]:
    """Swap a term for one of its synonyms (whole words in English, plain substrings in Chinese)."""
    subs = []
    for term, synonyms in (options.get("terms") or {}).items():
        if not synonyms:
            continue
        pattern = re.escape(term) if re.search(r"[^\x00-\x7f]", term) else rf"\b{re.escape(term)}\b"
        if re.search(pattern, text):
            subs.append(Substitution(term, rng.choice(list(synonyms))))
    return subs


AUGMENT_RULES: dict[str, RuleFn] = {"dose": dose_rule, "date": date_rule, "synonym": synonym_rule}


def register_rule(name: str, rule: RuleFn) -> None:
    """Add an augmentation rule (recipes name it under `data.augment.rules`)."""
    AUGMENT_RULES[name] = rule


def _replace(text: str, sub: Substitution) -> str:
    if re.search(r"[^\x00-\x7f]", sub.old) or not re.match(r"\w", sub.old):
        return text.replace(sub.old, sub.new)
    return re.sub(rf"(?<!\w){re.escape(sub.old)}(?!\w)", sub.new, text)


def augment_record(record: dict, rules: dict[str, dict], rng: random.Random) -> tuple[dict | None, str]:
    """A changed copy of a record and "augmented", or None and why not ("no_match", "inconsistent")."""
    # A raw text (continued pre-training) has no answer to keep consistent: the whole text is the prompt.
    messages = record.get("messages") or [{"role": "user", "content": record["text"]}]
    prompt = "\n".join(t["content"] for t in messages if t["role"] != "assistant")
    answer = "\n".join(t["content"] for t in messages if t["role"] == "assistant")
    subs: list[Substitution] = []
    for name, options in rules.items():
        if name not in AUGMENT_RULES:
            raise InputError(f"data.augment.rules: unknown rule {name!r}; choose from {sorted(AUGMENT_RULES)}")
        subs += AUGMENT_RULES[name](prompt, rng, options or {})
    if not subs:
        return None, "no_match"
    for sub in subs:
        rest = answer.replace(sub.old, "")
        if any(guard in rest for guard in sub.guards):
            return None, "inconsistent"
    changed = []
    for turn in messages:
        content = turn["content"]
        for sub in subs:
            content = _replace(content, sub)
        changed.append({**turn, "content": content})
    meta = {**record.get("meta", {}), "augmented_from": record["id"]}
    body = {"messages": changed} if "messages" in record else {"text": changed[0]["content"]}
    return {**record, "id": f"{record['id']}#aug", **body, "meta": meta}, "augmented"
