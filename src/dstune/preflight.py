"""Every error the recipe alone can reveal, raised before any stage runs: no dataset folder written, no model loaded.

The pydantic configs check each key's type and range, and the plugins' registries check names (config.py). What
needs the disk or a registry beyond the recipe's own keys is checked here: the model source, the data files, the
augmentation rules, the business checks and the export formats.
"""

from __future__ import annotations

from pathlib import Path

from .config import Recipe
from .errors import InputError


def check_model(recipe: Recipe, model: str | Path | None = None) -> None:
    """The base model (or the --model given) exists, has safetensors and needs no code the recipe does not trust."""
    from .data.templates import TEMPLATES
    from .models.loading import bitsandbytes_problem, check_model_source

    check_model_source(str(model or recipe.model.name_or_path), recipe.model.trust_remote_code)
    if recipe.model.template != "auto" and recipe.model.template not in TEMPLATES:
        raise InputError(f"model.template: {recipe.model.template!r} is not a chat template; choose auto or one of "
                         f"{', '.join(sorted(TEMPLATES))}")
    if recipe.model.load_in_4bit and (problem := bitsandbytes_problem()):
        raise InputError(f"model.load_in_4bit: {problem}")


def check_data(recipe: Recipe) -> None:
    """The data source's files, the adversarial reference, the replay file and the augmentation rules."""
    from .data.augment import check_rules
    from .data.readers import data_files
    from .data.sources import source_options

    data = recipe.data
    source, options = source_options(data)
    source.check(options, data)
    reference = data.adversarial.reference
    if reference and reference not in ("dev", "test"):
        data_files(reference)
    if data.replay.ratio and data.replay.file:
        data_files(data.replay.file)
    check_rules(data.augment.rules)


def check_eval(recipe: Recipe) -> None:
    """The business checks build from their options; the general-ability files exist."""
    from .data.readers import data_files
    from .evaluate.checks import build_checks

    build_checks(recipe.eval.checks)
    general = recipe.eval.general
    if general.enabled and general.file:
        data_files(general.file)
    if general.enabled and general.text_file and not Path(general.text_file).is_file():
        raise InputError(f"eval.general.text_file: {general.text_file}: file not found")


def check_export(recipe: Recipe) -> None:
    """Each of export.formats is a registered format that writes its quantization."""
    from .export.formats import get_format

    for spec in recipe.export.formats:
        try:
            get_format(*spec.split(":"))
        except InputError as exc:
            raise InputError(f"export.formats: {exc}") from None


def check_train(recipe: Recipe) -> None:
    """The adapter a run continues (train.init_adapter) is an adapter folder with safetensors weights, and the
    objective's own checks pass."""
    from .plugins import OBJECTIVES
    from .tuners.methods import check_adapter_dir

    if recipe.train.init_adapter:
        try:
            check_adapter_dir(Path(recipe.train.init_adapter))
        except InputError as exc:
            raise InputError(f"train.init_adapter: {exc}") from None
    OBJECTIVES[recipe.train.objective].check(recipe.train.options(recipe.train.objective), recipe)


def check_recipe(recipe: Recipe, data: bool = True, model: str | Path | None = None) -> None:
    """All of the above (`data=False`: the stage reads no dataset, e.g. eval on a file)."""
    check_model(recipe, model)
    check_train(recipe)
    if data:
        check_data(recipe)
    check_eval(recipe)
    check_export(recipe)
