"""The recipe form: one field per recipe key, walked from the pydantic recipe model with its plugin sections.

The form never builds a recipe of its own. What a user changes becomes `key.path=value` overrides on a base recipe
file, the very strings `dstune run BASE key.path=value ...` takes, and they are resolved by the CLI's own
`load_recipe_or_manifest`: the same validation, the same one-line errors, the same result.
"""

from __future__ import annotations

import functools
import inspect
import json
import shlex
import types
import typing
from dataclasses import dataclass

import yaml
from pydantic import BaseModel

from ..config import recipe_model


@dataclass
class FormField:
    """One recipe key as the form shows it."""

    key: str  # the key path, e.g. train.lora.r
    kind: str  # bool | choice | number | text | yaml
    text: str  # the value as one would type it after `key=` on the command line ("" for unset)
    help: str
    choices: tuple[str, ...] = ()
    section: str = ""
    string: bool = False  # a str (or str | None) key: typed text is quoted where YAML would read it otherwise
    type: str = ""  # the accepted values and the default, e.g. "int >= 1 · default 16"


def _nested_model(annotation) -> type[BaseModel] | None:
    """The config class of a section field (`X` or `X | None`), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def value_text(value) -> str:
    """A value as it is written after `key=` on the command line (YAML, one line); None is ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        try:  # a string that YAML would read as something else (a number, true, null, a mapping) stays quoted
            plain = bool(value.strip()) and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        # JSON is YAML's flow style: one line, with newlines and quotes escaped.
        return value if plain else json.dumps(value, ensure_ascii=False)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _accepts(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(value_text(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_accepts(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and origin is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _type_text(field) -> str:
    """What a key accepts, with its bounds and its default, in a few words."""
    annotation = field.annotation
    accepts = _accepts(annotation)
    bounds = []
    for item in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, name, None) is not None:
                bounds.append(f"{sign} {getattr(item, name)}")
        if getattr(item, "pattern", None):
            bounds.append(f"matching {item.pattern}")
    default = "required" if field.is_required() else (
        "default " + (value_text(field.get_default(call_default_factory=True)) or "null")
        if field.default_factory is None or _nested_model(annotation) is None else "")
    return " · ".join(part for part in (" ".join([accepts, *bounds]), default) if part)


def _kind(annotation) -> tuple[str, tuple[str, ...]]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", tuple(value_text(a) for a in typing.get_args(annotation))
    if annotation is bool:
        return "bool", ()
    if annotation in (int, float):
        return "number", ()
    if annotation is str:
        return "text", ()
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and all(a in (int, float, str) for a in args):
        return "text", ()  # int | None, str | None: typed like a number or text, '' for unset
    return "yaml", ()  # lists, dicts, unions of literals and bools (`auto` | true | false)


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines just above its declaration in the class body (dstune's way of helping)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    block: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        name = stripped.split(":", 1)[0].strip()
        if ":" in stripped and name.isidentifier() and not stripped.startswith(("def ", "class ", "@")):
            found.setdefault(name, " ".join(block))
        block = []
    return found


def field_help(model: type[BaseModel], name: str) -> str:
    """A field's help: its pydantic description, or the comment above it in the class that declares it."""
    field = model.model_fields[name]
    if field.description:
        return field.description
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, BaseModel) and name in _comments(cls):
            return _comments(cls)[name]
    nested = _nested_model(field.annotation)
    return (inspect.getdoc(nested) or "").split("\n")[0] if nested else ""


def form_fields(resolved: dict, model: type[BaseModel] | None = None, prefix: str = "") -> list[FormField]:
    """Every leaf key of the recipe model (plugin sections included), with the value `resolved` gives it."""
    model = model or recipe_model()
    fields: list[FormField] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = (resolved or {}).get(name)
        nested = _nested_model(field.annotation)
        if nested is not None:
            fields += form_fields(value if isinstance(value, dict) else {}, nested, key + ".")
            continue
        kind, choices = _kind(field.annotation)
        string = field.annotation is str or set(typing.get_args(field.annotation)) == {str, type(None)}
        fields.append(FormField(key=key, kind=kind, text=value_text(value), help=field_help(model, name),
                                choices=choices, section=prefix.rstrip(".") or "recipe", string=string,
                                type=_type_text(field)))
    return fields


def overrides_from_form(fields: list[FormField], submitted: dict[str, str]) -> list[str]:
    """`key=value` for each submitted value that differs from the base recipe's, in the form's order.

    A value cleared to '' is `key=null`. Text typed for a string key is quoted where YAML would read it as
    something else (`Answer: one word.` is a mapping to YAML), as a CLI user quotes it. Unknown keys are kept (and
    then named by the recipe's validation).
    """
    known = {f.key: f for f in fields}
    overrides = []
    for key, text in submitted.items():
        text = str(text).strip()
        field = known.get(key)
        if field is not None and _same(text, field.text):
            continue
        if field is not None and field.string and text and text != "null":
            text = value_text(text)
        overrides.append(f"{key}={text if text else 'null'}")
    order = {f.key: i for i, f in enumerate(fields)}
    return sorted(overrides, key=lambda o: order.get(o.split("=", 1)[0], len(order)))


def _same(text: str, base: str) -> bool:
    if text == base:
        return True
    try:
        return yaml.safe_load(text or "null") == yaml.safe_load(base or "null")
    except yaml.YAMLError:
        return False


def cli_command(command: str, base: str, overrides: list[str], extra: tuple[str, ...] = ()) -> str:
    """The exact shell command: `dstune COMMAND BASE key=value ...`."""
    return " ".join(shlex.quote(part) for part in ["dstune", command, base, *overrides, *extra])
