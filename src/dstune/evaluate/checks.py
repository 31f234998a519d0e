"""Tier 3, business end-to-end checks: does each answer do its job? Declared in the recipe (`eval.checks`).

Each check kind comes from a registry and turns its options into a function (answer, record) -> problem or None.
A sample completes when every check passes; the completion rate is the tier's headline number. The `verifier` kind
runs a Python function from the verifier registry (dstune.plugins.VERIFIERS), which domains fill (the ICD-10 demo's
`icd10_in_chapter`: dstune.domains.icd10) and packages extend through the `dstune.verifiers` entry point group.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from ..errors import InputError
from ..plugins import VERIFIERS
from .metrics import final_answer

CheckFn = Callable[[str, dict], str | None]
VerifierFn = Callable[[str, dict], bool]


def _parsed(answer: str) -> tuple[object, str | None]:
    """The answer as JSON (a fenced ```json block is unwrapped), or the reason it isn't."""
    text = answer.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    try:
        return json.loads(fenced.group(1) if fenced else text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"


def json_schema_check(options: dict) -> CheckFn:
    """The answer is JSON that matches `schema` (a JSON Schema, checked with `jsonschema`)."""
    import jsonschema

    schema = options.get("schema")
    if not isinstance(schema, dict):
        raise InputError("eval.checks: a json_schema check needs `schema`, a JSON Schema mapping")
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InputError(f"eval.checks: invalid JSON Schema ({exc.message})") from None

    def check(answer: str, record: dict) -> str | None:
        value, problem = _parsed(answer)
        if problem:
            return problem
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        return None if error is None else f"schema: {error.message}"

    return check


def required_fields_check(options: dict) -> CheckFn:
    """The answer is a JSON object with every field of `fields`, none empty."""
    fields = options.get("fields") or []
    if not fields:
        raise InputError("eval.checks: a required_fields check needs `fields`, a list of names")

    def check(answer: str, record: dict) -> str | None:
        value, problem = _parsed(answer)
        if problem:
            return problem
        if not isinstance(value, dict):
            return "not a JSON object"
        missing = [f for f in fields if value.get(f) in (None, "", [], {})]
        return f"missing {', '.join(missing)}" if missing else None

    return check


def regex_check(options: dict) -> CheckFn:
    """The final answer matches `pattern` in full (or anywhere, with `search: true`)."""
    try:
        pattern = re.compile(options["pattern"])
    except KeyError:
        raise InputError("eval.checks: a regex check needs `pattern`") from None
    except re.error as exc:
        raise InputError(f"eval.checks: bad regex {options['pattern']!r} ({exc})") from None
    find = pattern.search if options.get("search") else pattern.fullmatch

    def check(answer: str, record: dict) -> str | None:
        return None if find(final_answer(answer)) else f"does not match {pattern.pattern!r}"

    return check


def register_verifier(name: str, verifier: VerifierFn) -> None:
    """Add a Python verifier (recipes name it in a `verifier` check); same as `VERIFIERS.register(name, verifier)`."""
    len(VERIFIERS)  # load the registered verifiers first, so that a verifier of the same name replaces them
    VERIFIERS.register(name, verifier)


def verifier_check(options: dict) -> CheckFn:
    """A registered Python verifier passes."""
    name = options.get("verifier")
    if name not in VERIFIERS:  # a recipe's checks were validated on load (dstune.config); this is the API's
        raise InputError(f"eval.checks: unknown verifier {name!r}; choose from {sorted(VERIFIERS)}")
    verify = VERIFIERS[name]

    def check(answer: str, record: dict) -> str | None:
        return None if verify(answer, record) else f"{name} failed"

    return check


CHECKS: dict[str, Callable[[dict], CheckFn]] = {
    "json_schema": json_schema_check, "required_fields": required_fields_check, "regex": regex_check,
    "verifier": verifier_check,
}


def build_checks(declared: list[dict]) -> list[tuple[str, CheckFn]]:
    """(name, function) for each check the recipe declares; an unknown kind is an error naming it."""
    built = []
    for i, options in enumerate(declared):
        kind = options.get("kind")
        if kind not in CHECKS:
            raise InputError(f"eval.checks[{i}].kind: {kind!r} is not a check; choose from {sorted(CHECKS)}")
        built.append((options.get("name") or f"{kind}_{i}", CHECKS[kind](options)))
    return built


def run_checks(checks: list[tuple[str, CheckFn]], answers: list[str], records: list[dict]) -> dict:
    """Pass rate of each check, the completion rate (all pass), and the problems of each failing sample."""
    passed = {name: 0 for name, _ in checks}
    completed, failures = [], []
    for answer, record in zip(answers, records):
        problems = {}
        for name, check in checks:
            problem = check(answer, record)
            if problem is None:
                passed[name] += 1
            else:
                problems[name] = problem
        completed.append(not problems)
        if problems:
            failures.append({"id": record["id"], "got": answer, "problems": problems})
    n = max(1, len(answers))
    return {"completion_rate": sum(completed) / n, "pass_rates": {k: v / n for k, v in passed.items()},
            "samples": len(answers), "completed": completed, "failures": failures[:50]}
