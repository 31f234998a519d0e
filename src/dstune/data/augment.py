"""Rule-based augmentation (Chinese and English): doses, dates and synonyms, seeded and consistent.

A rule proposes substitutions (old text -> new text) in the prompt turns. Each one is applied to the answer as
well wherever the old text occurs there. If the answer holds the value in a form the rule cannot rewrite
consistently (a dose's bare number, a year), the record is not augmented, and that is counted.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InputError


@dataclass
class Substitution:
    """Replace `old` by `new`; `guards` are texts whose presence in the answer makes the change inconsistent."""

    old: str
    new: str
    guards: tuple[str, ...] = ()

    def apply(self, text: str) -> str:
        """The text with the change made."""
        if re.search(r"[^\x00-\x7f]", self.old) or not re.match(r"\w", self.old):
            return text.replace(self.old, self.new)
        return re.sub(rf"(?<!\w){re.escape(self.old)}(?!\w)", self.new, text)

    def conflicts(self, answer: str) -> bool:
        """Whether the answer holds the value in a form this change cannot rewrite consistently."""
        rest = answer.replace(self.old, "")
        return any(guard in rest for guard in self.guards)


RuleFn = Callable[[str, random.Random, dict], list[Substitution]]

# Units as clinicians write them, in English and Chinese; full-width forms (ｍｇ, １００) are read through NFKC.
_UNIT_ALIASES = {"毫克": "mg", "微克": "mcg", "μg": "mcg", "ug": "mcg", "克": "g", "毫升": "ml", "单位": "units",
                 "unit": "units", "国际单位": "iu"}
_UNITS = r"mg|mcg|μg|µg|ug|g|ml|IU|units?|国际单位|毫克|微克|克|毫升|单位"
_NUMBER = r"\d+(?:\.\d+)?"
_RANGE = r"\s*(?:-|–|—|~|～|〜|至|到|to)\s*"
# No \w in the lookarounds: Python counts CJK characters as \w, and "阿司匹林100mg每日" is how Chinese text writes
# a dose. The text is matched in NFKC form, so full-width digits, units and spaces match too.
_DOSE = re.compile(rf"(?<![\d.])({_NUMBER})(?:({_RANGE})({_NUMBER}))?(\s*)({_UNITS})(?![A-Za-z])", re.IGNORECASE)
_FULL_WIDTH_DIGITS = str.maketrans("0123456789.", "０１２３４５６７８９．")


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _dose_key(match: re.Match) -> tuple:
    """(low, high or None, unit) of a dose match in NFKC text: the same dose however it is spaced or spelled."""
    unit = match.group(5).lower()
    unit = _UNIT_ALIASES.get(unit, unit)
    high = float(match.group(3)) if match.group(3) else None
    return float(match.group(1)), high, unit


def _doses(text: str) -> list[tuple[int, int, tuple, re.Match]]:
    """(start, end, key, match) of every dose in the text; NFKC keeps character positions for the forms used here."""
    return [(m.start(), m.end(), _dose_key(m), m) for m in _DOSE.finditer(_nfkc(text))]


def _nfkc(text: str) -> str:
    """The NFKC form (full-width to ASCII) when it keeps every character's position, else the text as it is."""
    normal = unicodedata.normalize("NFKC", text)
    return normal if len(normal) == len(text) else text


@dataclass
class DoseSubstitution(Substitution):
    """Every dose of the prompt scaled by its chosen factor, wherever it occurs, in any spelling of the same dose.

    The answer may restate a dose of the prompt (it is rewritten the same way). A dose in the answer that the
    prompt does not hold (a total or a scaled dose), or a dose's bare number, depends on the dose in a way the rule
    cannot follow: the record is left alone.
    """

    factors: dict = field(default_factory=dict)  # dose key -> factor (None: kept, outside its unit's range)

    def apply(self, text: str) -> str:
        out, last = [], 0
        for start, end, key, match in _doses(text):
            factor = self.factors.get(key) or 1.0
            if factor == 1.0:
                continue
            original = text[start:end]
            wide = any("０" <= ch <= "９" for ch in original)
            low, high = key[0] * factor, key[1] * factor if key[1] is not None else None
            separator = text[match.start(2):match.end(2)] if high is not None else ""
            number = _format_number(low) + (separator + _format_number(high) if high is not None else "")
            if wide:
                number = number.translate(_FULL_WIDTH_DIGITS)
            out += [text[last:start], number, original[len(original) - len(match.group(4) + match.group(5)):]]
            last = end
        return "".join(out) + text[last:]

    def conflicts(self, answer: str) -> bool:
        doses = _doses(answer)
        if any(key not in self.factors for _, _, key, _ in doses):
            return True
        rest = _nfkc(answer)
        for start, end, _, _ in doses:
            rest = rest[:start] + " " * (end - start) + rest[end:]
        numbers = {_format_number(v) for key, factor in self.factors.items() if factor not in (None, 1.0)
                   for v in key[:2] if v is not None}
        return any(re.search(rf"(?<![\d.]){re.escape(n)}(?!\d|\.\d)", rest) for n in numbers)


def dose_rule(text: str, rng: random.Random, options: dict) -> list[Substitution]:
    """`25mg -> 50mg`, `100-200毫克 -> 200-400毫克`: scale each dose by a factor, inside its unit's range if one is given."""
    factors = options.get("factors", [0.5, 2.0])
    ranges = {(_UNIT_ALIASES.get(u.lower(), u.lower())): bounds for u, bounds in options.get("ranges", {}).items()}
    chosen: dict = {}
    for _, _, key, _ in _doses(text):
        if key in chosen:  # the same dose twice in a prompt changes the same way
            continue
        low, high = ranges.get(key[2], [0, float("inf")])
        values = [v for v in key[:2] if v is not None]
        choices = [f for f in factors if all(low <= v * f <= high for v in values)]
        chosen[key] = rng.choice(choices) if choices else None
    if all(f is None for f in chosen.values()):
        return []
    return [DoseSubstitution("dose", "dose", factors=chosen)]


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


def check_rules(rules) -> None:
    """Every rule name is registered (the recipe check and each record use this one check)."""
    for name in rules:
        if name not in AUGMENT_RULES:
            raise InputError(f"data.augment.rules: unknown rule {name!r}; choose from {sorted(AUGMENT_RULES)}")


def augment_record(record: dict, rules: dict[str, dict], rng: random.Random) -> tuple[dict | None, str]:
    """A changed copy of a record and "augmented", or None and why not ("no_match", "inconsistent", "no_change")."""
    # A raw text (continued pre-training) has no answer to keep consistent: the whole text is the prompt.
    messages = record.get("messages") or [{"role": "user", "content": record["text"]}]
    prompt = "\n".join(t["content"] for t in messages if t["role"] != "assistant")
    answer = "\n".join(t["content"] for t in messages if t["role"] == "assistant")
    check_rules(rules)
    subs: list[Substitution] = []
    for name, options in rules.items():
        subs += AUGMENT_RULES[name](prompt, rng, options or {})
    if not subs:
        return None, "no_match"
    if any(sub.conflicts(answer) for sub in subs):
        return None, "inconsistent"
    changed = []
    for turn in messages:
        content = turn["content"]
        for sub in subs:
            content = sub.apply(content)
        changed.append({**turn, "content": content})
    if changed == messages:  # e.g. a synonym equal to its term, a factor of 1: a copy would only duplicate
        return None, "no_change"
    meta = {**record.get("meta", {}), "augmented_from": record["id"]}
    body = {"messages": changed} if "messages" in record else {"text": changed[0]["content"]}
    return {**record, "id": f"{record['id']}#aug", **body, "meta": meta}, "augmented"
