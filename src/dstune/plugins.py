"""Plugin registries: methods, objectives, data sources, metrics, verifiers and export formats.

Each registry is filled by dstune's own modules and by other installed packages through entry points in the group
`dstune.<kind>` (e.g. `dstune.methods`). An entry point names an object, registered under the entry point's name, or
a module, which registers what it defines when imported. Registries load lazily, on the first look-up, so importing
dstune stays cheap and a plugin may import dstune freely.

registry    entry point group  a plugin is                                    a recipe names it in
METHODS     dstune.methods     a dstune.tuners.method.Method subclass         train.method
OBJECTIVES  dstune.objectives  a dstune.train.objectives.Objective subclass   train.objective
SOURCES     dstune.sources     a dstune.data.sources.Source subclass          data.source
METRICS     dstune.metrics     a function (predictions, references) -> score  eval.metrics, train.metric
VERIFIERS   dstune.verifiers   a function (answer, record) -> bool            eval.checks[].verifier
EXPORTS     dstune.exports     a dstune.export.formats.ExportFormat           export.formats

A plugin with an `options` class (a StrictModel) owns a recipe section under its name: `train.<method>`,
`train.<objective>`, `data.<source>` (see dstune.config.recipe_model).

A domain (a data source with its metrics and verifiers, like dstune.domains.icd10) lists each of its plugins in its
kind's group. A package adds a method and a domain's source with, in its pyproject.toml:

    [project.entry-points."dstune.methods"]
    my_method = "my_package.method:MyMethod"

    [project.entry-points."dstune.sources"]
    my_source = "my_package.domain:MySource"
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points

from .errors import DstuneError

KINDS = ("methods", "objectives", "sources", "metrics", "verifiers", "exports")


class PluginError(DstuneError):
    """An installed plugin failed to load (exit code 1)."""


class Registry(Mapping):
    """Name -> plugin, from dstune's own modules and the `dstune.<kind>` entry points, loaded on first use."""

    def __init__(self, kind: str, builtin: tuple[str, ...] = (), instantiate: bool = False):
        self.kind = kind
        self.instantiate = instantiate  # a registered class is stored as one instance (methods are stateless)
        self.group = f"dstune.{kind}"
        self.builtin = builtin  # modules that register dstune's own plugins when imported
        self._items: dict[str, object] = {}
        self._loading = False
        self._loaded = False
        self.version = 0  # bumped on every registration (the recipe schema is rebuilt when it changes)

    def register(self, name: str, item=None):
        """Register `item` under `name`; without `item`, a decorator that registers what it decorates."""
        if item is None:
            return lambda obj: self.register(name, obj)
        self._items[name] = item() if self.instantiate and isinstance(item, type) else item
        self.version += 1
        return item

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True  # a builtin module that looks something up while it registers sees what is there
        try:
            for module in self.builtin:
                importlib.import_module(module)
            for point in entry_points(group=self.group):
                try:
                    loaded = point.load()
                except Exception as exc:  # a third party's bug: name the plugin, not our stack
                    raise PluginError(f"plugin {point.name!r} ({self.group} = {point.value}) failed to load: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
                if not hasattr(loaded, "__path__") and type(loaded).__name__ != "module":
                    self.register(point.name, loaded)
            self._loaded = True
        finally:
            self._loading = False

    def __getitem__(self, name: str):
        self._load()
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(dict(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __contains__(self, name) -> bool:
        self._load()
        return name in self._items

    def get_plugin(self, name: str, key: str):
        """The plugin named `name`, or an error naming the recipe `key` with the closest registered name."""
        self._load()
        if name not in self._items:
            raise ValueError(unknown_choice(key, name, list(self._items)))
        return self._items[name]


def did_you_mean(word: str, choices: list[str]) -> str:
    """` (did you mean 'y'?)` for the closest choice, or nothing."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown_choice(key: str, value: str, choices: list[str]) -> str:
    """`unknown value 'x' for key (did you mean 'y'?); choose from [...]`."""
    return f"unknown value {value!r} for {key}{did_you_mean(value, choices)}; choose from {sorted(choices)}"


METHODS = Registry("methods", ("dstune.tuners.lora", "dstune.tuners.ia3", "dstune.tuners.prefix",
                               "dstune.tuners.bottleneck"), instantiate=True)
OBJECTIVES = Registry("objectives", ("dstune.train.objectives",))
# dstune's own domains: each module registers its data source, metrics and verifiers (nothing else imports them).
DOMAINS = ("dstune.domains.icd10",)
SOURCES = Registry("sources", ("dstune.data.sources", *DOMAINS), instantiate=True)
METRICS = Registry("metrics", ("dstune.evaluate.metrics", *DOMAINS))
VERIFIERS = Registry("verifiers", DOMAINS)
EXPORTS = Registry("exports", ("dstune.export.onnx", "dstune.export.gguf", "dstune.export.torchao"))
