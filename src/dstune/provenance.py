"""Provenance: what every manifest records so that its artifact can be traced and re-run.

Each manifest dstune writes (the dataset folder, the adapter, the merged model, each export, the report) carries
`"provenance": provenance(recipe)`: the fully resolved recipe (every default filled in), dstune's version and git
commit, and the versions of the libraries whose internals decide the numbers. `dstune run runs/x/report.json` reads
the recipe back (`recipe_source`), so a report is enough to repeat its run.

Only the standard library is imported here: the CLI reads a manifest's recipe before the slow imports.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# The libraries whose versions change results: kernels, model code, the PEFT layers, the device placement.
LIBRARIES = ("torch", "transformers", "peft", "accelerate")
GIT_TIMEOUT_SECONDS = 5


def provenance(recipe) -> dict:
    """The resolved recipe, dstune's version and git commit, and the library versions, for a manifest."""
    from . import __version__

    return {"recipe": recipe.model_dump(mode="json"), "dstune": __version__, "git": git_state(),
            "versions": library_versions()}


def library_versions() -> dict[str, str | None]:
    """Installed versions of Python and the LIBRARIES (None for one that is not installed)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def git_state() -> dict[str, str | bool | None]:
    """{"commit", "dirty"} of the git checkout dstune runs from; both None when it is not one (or git is absent).

    Cached: one run's manifests record the tree as it was when the first was written.
    """
    package = Path(__file__).resolve().parent
    commit = _git(package, "rev-parse", "HEAD")
    # An installed copy can sit inside someone else's repository (a venv in a project): only a checkout that tracks
    # the package's own files is dstune's.
    if commit is None or not _git(package, "ls-files", "--", "__init__.py"):
        return {"commit": None, "dirty": None}
    status = _git(package, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(cwd: Path, *args: str) -> str | None:
    """Stripped stdout of a git command, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def recipe_from_manifest(path: str | Path) -> dict:
    """The resolved recipe recorded in a dstune manifest JSON (report.json, data/manifest.json, ...)."""
    from .errors import InputError

    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON manifest ({exc})") from None
    recipe = (manifest.get("provenance") or {}).get("recipe") if isinstance(manifest, dict) else None
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: no provenance.recipe in this JSON (a manifest written before dstune recorded "
                         "provenance?); give the recipe YAML instead")
    return recipe


def recipe_source(source):
    """What `load_recipe` should read: the recipe dict of a dstune manifest JSON, otherwise `source` unchanged.

    A .json recipe (JSON is YAML) stays a recipe file: a manifest is told apart by its "provenance" key, or, for
    one written before provenance, by having none of a recipe's top-level keys.
    """
    if isinstance(source, (str, Path)) and str(source).endswith(".json") and Path(source).is_file():
        from .config import Recipe

        try:
            manifest = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return source  # load_recipe reports what is wrong with it
        if isinstance(manifest, dict) and ("provenance" in manifest or not set(manifest) & set(Recipe.model_fields)):
            return recipe_from_manifest(source)
    return source


def load_recipe_or_manifest(source, overrides: list[str] | None = None):
    """`load_recipe` that also takes a manifest JSON; its errors then name the manifest file."""
    from .config import load_recipe
    from .errors import InputError

    resolved = recipe_source(source)
    if not isinstance(resolved, dict) or isinstance(source, dict):
        return load_recipe(resolved, overrides)
    try:
        return load_recipe(resolved, overrides)
    except InputError as exc:  # load_recipe calls a dict "recipe"
        raise InputError(f"{source} (provenance.recipe){str(exc).removeprefix('recipe')}") from None
