"""The recipe form against the CLI: every key `dstune run` accepts is in the form, and a value entered in the form
resolves to the same recipe as the same `key=value` on the command line."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from boarding import screenshot
from playwright.sync_api import expect

from dstune.config import load_recipe, recipe_model
from dstune.provenance import load_recipe_or_manifest

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def board(shared_board):
    """These tests start no run: one board serves the module."""
    return shared_board


def schema_keys(schema: dict, node: dict | None = None, prefix: str = "") -> set[str]:
    """Leaf key paths of the recipe's JSON schema (sections recursed into, through $ref and `X | None`)."""
    node = node if node is not None else schema
    keys = set()
    for name, prop in node.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        section = None
        for option in options:
            ref = option.get("$ref")
            if ref:
                section = schema["$defs"][ref.split("/")[-1]]
        if section is not None and section.get("properties"):
            keys |= schema_keys(schema, section, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_cli_key_is_in_the_form_plugins_included(board, page):
    board.login(page, "/recipe")
    shown = set(page.locator("tr[data-key]").evaluate_all("rows => rows.map(r => r.dataset.key)"))
    expected = schema_keys(recipe_model().model_json_schema())
    assert shown == expected
    # Sections that plugin packages registered (tests/plugins), with no change to the board.
    assert {"train.two_loss.weight_lr", "train.curriculum.warm_steps", "train.distill.temperature"} <= shown
    help_text = page.locator("tr[data-key='train.lora.r'] td.help").text_content()
    assert page.locator("tr[data-key='model.load_in_4bit'] td.help").text_content().startswith("QLoRA")
    assert help_text is not None


def test_form_values_resolve_as_the_cli_overrides_do(board, page):
    board_root = board.root
    board.login(page, "/recipe")
    page.click("#expand-all")
    page.fill("[name='train.learning_rate']", "0.003")  # number
    page.fill("[name='train.epochs']", "2")
    page.select_option("[name='train.group_by_length']", "true")  # bool
    page.select_option("[name='train.lr_scheduler']", "linear")  # choice
    page.fill("[name='eval.metrics']", "[exact_match, contains_answer]")  # list
    page.fill("[name='train.lora.r']", "8")  # a method's section
    page.fill("[name='train.two_loss.weight_lr']", "0.1")  # a plugin's section
    page.fill("[name='eval.few_shot.k']", "3")  # an optional section, unset in the base
    page.select_option("[name='data.quality.dedup']", "exact")
    page.fill("[name='data.system_prompt']", "Answer: one word.")  # a string YAML would read as a mapping
    expect(page.locator("#cli")).to_contain_text("data.system_prompt=")
    expect(page.locator("#check")).to_have_class(re.compile(r"\bok\b"))
    command = page.locator("#cli").text_content()
    page.locator("tr[data-key='train.epochs']").scroll_into_view_if_needed()
    screenshot(page, "recipe", full_page=False)  # the sticky command bar over the changed train keys
    argv = shlex.split(command)
    assert argv[:3] == ["dstune", "run", "recipes/tiny.yaml"]
    cli = load_recipe_or_manifest(board_root / "recipes" / "tiny.yaml", argv[3:])
    assert cli.train.learning_rate == 0.003 and cli.train.group_by_length and cli.train.lora.r == 8
    assert cli.eval.few_shot.k == 3 and cli.data.system_prompt == "Answer: one word."

    page.fill("#save-path", "recipes/from_form.yaml")
    page.click("#save")
    expect(page.locator("#save-result")).to_have_text("saved recipes/from_form.yaml")
    saved = load_recipe(board_root / "recipes" / "from_form.yaml")
    assert saved.model_dump() == cli.model_dump()
    assert yaml.safe_load((board_root / "recipes" / "from_form.yaml").read_text())["name"] == "tiny"

    # A bad value gets the CLI's own one-line error, naming the key.
    page.fill("[name='train.epochs']", "many")
    expect(page.locator("#check")).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#check")).to_contain_text("train.epochs")
