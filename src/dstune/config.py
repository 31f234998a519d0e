"""Typed recipe configs: one pydantic model per stage, side by side in a recipe YAML."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError
from .plugins import did_you_mean


class StrictModel(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Which base model to load, and how."""

    name_or_path: str = "smollm2-135m-instruct"
    # "auto" uses the tokenizer's own chat template; other names come from the template registry.
    template: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # QLoRA: keep the frozen base in 4-bit NF4 through bitsandbytes (its CPU backend, or CUDA).
    load_in_4bit: bool = False


class QualityConfig(StrictModel):
    """Quality checks of the data stage; every dropped record is counted by reason in the data report."""

    # true: the first problem stops the stage with its file:line, instead of being dropped and counted.
    strict: bool = False
    # Samples longer than data.max_length tokens (rendered with the chat template).
    overlong: Literal["drop", "truncate", "raise"] = "drop"
    # exact: after case/width/whitespace normalisation; near: also MinHash (estimated Jaccard of 3-gram shingles).
    dedup: Literal["none", "exact", "near"] = "near"
    # Training records that also occur in dev/test are dropped from train.
    leakage: Literal["none", "exact", "near"] = "near"
    near_threshold: float = Field(0.8, gt=0.0, le=1.0)


class AugmentConfig(StrictModel):
    """Rule-based augmentation of the training split (see dstune.data.augment for the rules and options)."""

    # Rule name -> its options, e.g. {dose: {factors: [0.5, 2]}, date: {}, synonym: {terms: {fever: [pyrexia]}}}.
    rules: dict[str, dict] = {}
    # Augmented copies drawn per training record.
    copies: int = Field(1, ge=1)
    seed: int = 0


class StratifyConfig(StrictModel):
    """Stratified sampling of the training split for term coverage."""

    # A record field that names the stratum, e.g. meta.category (ICD-10 category) or meta.chapter.
    key: str | None = None
    # Or: terms to find in the text; each term is a stratum (a record may cover several).
    terms: list[str] = []
    # Training records to keep; None keeps all and only reports coverage.
    target: int | None = Field(None, ge=1)
    min_per_stratum: int = Field(1, ge=1)


class AdversarialConfig(StrictModel):
    """Adversarial validation: score each training record's similarity to a target-domain reference sample."""

    # dev, test, or a file/folder of target-domain records (any record form, or raw text). None: off.
    reference: str | None = None
    # Drop records whose domain score (out-of-fold P(reference-like)) is below this value...
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    # ...or below this quantile of the scores (0.1 drops the 10% least domain-like). Neither: score only.
    quantile: float | None = Field(None, ge=0.0, lt=1.0)
    # tfidf: character 2-4-grams (any language) + logistic regression; embeddings: mean-pooled hidden states of
    # a local model (embedding_model), + logistic regression.
    features: Literal["tfidf", "embeddings"] = "tfidf"
    embedding_model: str | None = None
    folds: int = Field(5, ge=2)
    examples: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _one_threshold(self):
        if self.threshold is not None and self.quantile is not None:
            raise ValueError("set threshold or quantile, not both")
        if self.features == "embeddings" and not self.embedding_model:
            raise ValueError("features=embeddings needs embedding_model (a local model folder)")
        return self


class ReplayConfig(StrictModel):
    """General-data replay: mix general instruction data into training to protect general ability."""

    # Replay records per domain training record, not counting augmented copies (0.1 adds 10% as many); 0 is off.
    ratio: float = Field(0.0, ge=0.0)
    # A file or folder of general records; None: the replay part of the general set that ships with dstune
    # (docs/data.md), never the held-out part that tier 1 scores.
    file: str | None = None


class DataConfig(StrictModel):
    """Where the domain data comes from and how it is rendered.

    Every registered data source with options adds its section here under its own name (`data.icd10`, ...): see
    `recipe_model`.
    """

    # A data source from the registry (dstune.plugins.SOURCES): files, icd10 (the demo domain), or a plugin's.
    source: str = "files"
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    # Added as the first turn of every conversation that has no system turn.
    system_prompt: str | None = None
    # dstune field name -> the files' field name, e.g. {instruction: question, output: answer, text: content}.
    fields: dict[str, str] = {}
    max_length: int = 512
    seed: int = 0
    quality: QualityConfig = QualityConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    stratify: StratifyConfig = StratifyConfig()
    augment: AugmentConfig = AugmentConfig()
    replay: ReplayConfig = ReplayConfig()

    def options(self, name: str):
        """The options section of the data source `name` (None for a source without one)."""
        return None if name in DataConfig.model_fields else getattr(self, name, None)


class QatConfig(StrictModel):
    """Quantization-aware LoRA training: the forward pass fake-quantizes the merged weight as the export will."""

    # int4: the ONNX export's int4 (MatMulNBits blocks); int8: the torchao export's per-row int8 weights.
    scheme: Literal["int4", "int8"]
    # int4 only: the block along the input dimension. dstune's ONNX int4 export writes blocks of 16
    # (dstune.export.onnx.INT4_BLOCK_SIZE; tests/train/test_qat.py checks the two agree) and keeps llama.cpp's
    # sensitive layers in int8, which QAT treats as int4: a little stricter than needed.
    group_size: Literal[16, 32, 64, 128, 256] = 16


class TrainConfig(StrictModel):
    """Fine-tuning: the method and objective plugins, the schedule, checkpoints and early stopping.

    Every registered method and objective adds its options section here under its own name (`train.lora`,
    `train.prefix`, ...): see `recipe_model`.
    """

    # A PEFT method from the registry (dstune.plugins.METHODS): lora, dora, prefix, bottleneck, ia3, or a plugin's.
    method: str = "lora"
    # A training objective from the registry (dstune.plugins.OBJECTIVES): sft (supervised cross-entropy), or a
    # plugin's.
    objective: str = "sft"
    # Continue this peft adapter folder instead of a fresh adapter: same method, rank and targets; its weights are
    # the starting point, and the new adapter's manifest records it as the parent. None: a fresh adapter.
    init_adapter: str | None = None
    # None: lr_fraction x pretrain_learning_rate when that is set (the 1/10 rule by default), else the method's
    # default (docs/methods.md: lora 2e-4, ia3 3e-3, prefix 1e-2, bottleneck 1e-4).
    learning_rate: float | None = Field(None, gt=0)
    pretrain_learning_rate: float | None = None
    lr_fraction: float = 0.1
    epochs: float = 3.0
    max_steps: int = -1
    # At least this many optimizer steps, however few the examples (more epochs over a small set), and no early
    # stop before it; 0: off. `dstune curve` sets it for its small sizes (docs/few_shot.md).
    min_steps: int = Field(0, ge=0)
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Batches of similar lengths waste less compute on padding (see dstune.train.sampler).
    group_by_length: bool = False
    # The training hot path (docs/performance.md). Packing puts a batch's samples into shared rows with a
    # block-diagonal causal mask; auto = on for every method but prefix (whose virtual tokens every sample sees).
    packing: Literal["auto"] | bool = "auto"
    # The widest packed row, in tokens; None: data.max_length. Wider rows waste fewer slots but attention grows.
    pack_width: int | None = Field(None, ge=1)
    # LoRA layers train through one fused autograd node with a fast dropout mask (dstune.train.fastlora).
    fused_lora: bool = True
    # Quantization-aware training (dstune.train.qat), for method lora with lora.dropout 0; None: off.
    qat: QatConfig | None = None
    # Recompute activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # Generation-based evaluation on the dev split every eval_steps optimizer steps; 0 turns it off.
    eval_steps: int = 50
    early_stopping_patience: int = 3
    metric: str = "exact_match"
    max_dev_samples: int | None = None
    logging_steps: int = 10
    # A crash-safe checkpoint every save_steps optimizer steps (None: eval_steps, or 50 without dev evaluation);
    # `dstune train --resume` continues from the newest complete one, bit for bit.
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int = Field(2, ge=1)
    # Steps with a NaN/inf loss or grad norm are never applied; up to skip_nonfinite of them are skipped and counted,
    # and the run stops at the next one, or at nonfinite_patience in a row (None: skip_nonfinite + 1).
    skip_nonfinite: int = Field(0, ge=0)
    nonfinite_patience: int | None = Field(None, ge=1)
    # On SIGTERM (preemption) the run checkpoints after the current step and exits 0; past this many seconds, exit 1.
    preemption_grace_seconds: float = Field(120.0, gt=0)
    seed: int = 42

    @model_validator(mode="before")
    @classmethod
    def _renamed_method(cls, raw):
        # `adapter` was the bottleneck method's old name; recipes that use it keep working, with a warning.
        if isinstance(raw, dict) and (raw.get("method") == "adapter" or "adapter" in raw):
            import sys

            raw = dict(raw)
            if raw.get("method") == "adapter":
                raw["method"] = "bottleneck"
            if "adapter" in raw:
                raw.setdefault("bottleneck", raw.pop("adapter"))
            print("dstune: warning: train.method 'adapter' and the train.adapter section are now called "
                  "'bottleneck'; the old names will be removed", file=sys.stderr, flush=True)
        return raw

    @model_validator(mode="after")
    def _plugins_accept(self) -> TrainConfig:
        from .plugins import METHODS, OBJECTIVES

        method = METHODS.get_plugin(self.method, "train.method")
        OBJECTIVES.get_plugin(self.objective, "train.objective")
        if self.packing is True and not method.packs:
            raise ValueError(f"packing: {self.method} {method.packing_conflict}; set train.packing to false or auto")
        if self.qat and not method.supports_qat:
            raise ValueError(f"qat: quantization-aware training covers method lora, not {self.method}")
        method.check(self)
        if self.eval_steps > 0 and self.save_steps and self.save_steps % self.eval_steps:
            raise ValueError(f"save_steps: {self.save_steps} must be a multiple of train.eval_steps "
                             f"({self.eval_steps}), so that the best dev checkpoint is one that was saved")
        return self

    def options(self, name: str):
        """The options section of the plugin `name`, a method or an objective (None for one without a section)."""
        return None if name in TrainConfig.model_fields else getattr(self, name, None)

    @property
    def packs(self) -> bool:
        """Whether batches are packed (auto: every method but prefix)."""
        if self.packing != "auto":
            return self.packing
        from .plugins import METHODS

        return METHODS[self.method].packs

    def resolved_learning_rate(self) -> float:
        """The learning rate to use: explicit, a fraction of the pretraining LR, or the method's default."""
        return self.learning_rate_source()[0]

    def learning_rate_source(self) -> tuple[float, str]:
        """The learning rate and where it comes from (for the training summary and the report)."""
        if self.learning_rate is not None:
            return self.learning_rate, "train.learning_rate"
        if self.pretrain_learning_rate is not None:
            return (self.lr_fraction * self.pretrain_learning_rate,
                    f"train.lr_fraction x train.pretrain_learning_rate ({self.lr_fraction} x "
                    f"{self.pretrain_learning_rate})")
        from .plugins import METHODS

        return METHODS[self.method].default_learning_rate, f"the {self.method} method's default"


class GeneralEvalConfig(StrictModel):
    """Tier 1, general capability kept: general exact match and perplexity, base vs tuned."""

    enabled: bool = False
    # General instruction records (any record form); None: the held-out questions that ship with dstune, which
    # replay and the KL anchor never read.
    file: str | None = None
    # General text for perplexity; None: the held-out prose that ships with dstune (English and Chinese).
    text_file: str | None = None
    # An even spread of this many records; None: all of them (the shipped held-out set has 633).
    max_samples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    # Scores the general answers; contains_answer suits chatty base models ("The capital is Paris.").
    metric: str = "contains_answer"
    # The gate: the run fails with exit code 3 when a retention (tuned / base; its point estimate, not its CI) falls
    # below this...
    min_retention: float | None = Field(None, gt=0.0)
    # ...or, with warn, says so in the report and on stderr and still succeeds.
    on_fail: Literal["error", "warn"] = "error"


class FewShotConfig(StrictModel):
    """The k-shot in-context baseline (dstune.evaluate.fewshot): k training examples as earlier chat turns."""

    k: int = Field(5, ge=1)
    # random: k drawn per question (seeded by seed and its id); similar: the k nearest by TF-IDF of the question.
    select: Literal["random", "similar"] = "random"
    seed: int = 0


class EvalConfig(StrictModel):
    """Generation-based evaluation of a model on the test split, in three tiers."""

    batch_size: int = 32
    max_new_tokens: int = 16
    # Tier 2, domain metrics (dstune.evaluate.metrics registry), each with a bootstrap 95% CI.
    metrics: list[str] = ["exact_match"]
    max_samples: int | None = None
    bootstrap_samples: int = Field(1000, ge=0)
    # Reuse answers this model already gave to the same prompt with the same settings ($DSTUNE_CACHE).
    cache: bool = True
    general: GeneralEvalConfig = GeneralEvalConfig()
    # Tier 3, business checks: [{kind: json_schema|required_fields|regex|verifier, ...options}].
    checks: list[dict] = []
    # The k-shot baseline: `dstune run` scores the base model with k demonstrations from the training split as
    # well, a row of the report next to zero-shot base and tuned; `dstune eval` scores its model that way.
    few_shot: FewShotConfig | None = None


class ExportConfig(StrictModel):
    """Deployable artifacts of the merged model, each scored on the test split against the fp32 model."""

    # "format:quant" items that `dstune run` exports after the merge, e.g. ["onnx:int8", "gguf:q8_0"]
    # (dstune.export registry: onnx, gguf, torchao).
    formats: list[str] = []
    # The accuracy gate: an export keeping less than this share of the fp32 domain score (eval.metrics[0]) is marked
    # failed in the report, and the command exits with code 3.
    min_retention: float = Field(0.98, gt=0.0)
    # Train-split records that calibrated quantizations (e.g. onnx:int4-gptq) calibrate on.
    calibration_samples: int = Field(128, ge=1)
    # Mixed-precision int4 (onnx:int4-gptq-mixed) keeps its most loss-sensitive matmuls in int8 while the export's
    # weight bytes stay within this share of the fp32 model's.
    int4_max_size: float = Field(0.22, gt=0.0, le=1.0)
    # Calibration records (spread over the export.calibration_samples) that the int8 placement scan measures each
    # matmul on: each of SmolLM2's 150 costs half a forward pass over them (32: ~3 min on 2 cores; the ranking's
    # Spearman correlation with 128 records' was 0.95).
    sensitivity_samples: int = Field(32, ge=1)

    @field_validator("formats")
    @classmethod
    def _format_quant(cls, value: list[str]) -> list[str]:
        for item in value:
            if item.count(":") != 1 or not all(item.split(":")):
                raise ValueError(f"{item!r}: write each export as format:quant, e.g. onnx:int8")
        return value


class PruneConfig(StrictModel):
    """Structured pruning (`dstune prune`) of the merged model: the share of each part to remove, by importance
    measured on train-split records (dstune.compress.prune). Counts are uniform across layers."""

    # Query heads to remove: per KV group ("queries": every group keeps its KV head and loses the same number), or
    # whole KV groups with their query heads ("groups").
    heads: float = Field(0.0, ge=0.0, lt=1.0)
    head_mode: Literal["queries", "groups"] = "queries"
    # MLP intermediate channels to remove, in every layer.
    mlp: float = Field(0.0, ge=0.0, lt=1.0)
    # Whole decoder layers to remove, those of least block influence.
    layers: float = Field(0.0, ge=0.0, lt=1.0)
    # Train-split records the importance is measured on.
    calibration_samples: int = Field(64, ge=1)


class Recipe(StrictModel):
    """A whole recipe: the stage configs side by side."""

    # The run folder's name under output_dir.
    name: str = Field(pattern=r"^[\w][\w.-]*$")
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    prune: PruneConfig = PruneConfig()

    @model_validator(mode="after")
    def _check_registries(self) -> Recipe:
        from .plugins import METRICS, SOURCES, VERIFIERS

        SOURCES.get_plugin(self.data.source, "data.source")
        for name in self.eval.metrics:
            METRICS.get_plugin(name, "eval.metrics")
        METRICS.get_plugin(self.train.metric, "train.metric")
        METRICS.get_plugin(self.eval.general.metric, "eval.general.metric")
        for i, check in enumerate(self.eval.checks):
            if check.get("kind") == "verifier":  # the other check kinds validate their options when built
                VERIFIERS.get_plugin(str(check.get("verifier")), f"eval.checks[{i}].verifier")
        return self

    @property
    def run_dir(self) -> Path:
        """The folder that holds every artifact of this recipe's run."""
        return Path(self.output_dir) / self.name


# Where plugins add their options sections: recipe section -> registries whose plugins each own `section.<name>`.
PLUGIN_SECTIONS = {"train": ("METHODS", "OBJECTIVES"), "data": ("SOURCES",)}
_recipe_models: dict[tuple, type] = {}


def recipe_model() -> type[Recipe]:
    """The Recipe class with a section for every registered plugin that has options (rebuilt when one registers).

    A method's options live under `train.<method name>`, an objective's under `train.<objective name>`, a data
    source's under `data.<source name>`: the recipe is validated by the plugins' own pydantic classes, with the
    same one-line errors as built-in keys.
    """
    from pydantic import create_model

    from . import plugins

    registries = {section: [getattr(plugins, name) for name in names] for section, names in PLUGIN_SECTIONS.items()}
    for found in registries.values():
        for registry in found:
            len(registry)  # load builtins and entry points before the version is read
    key = tuple(r.version for found in registries.values() for r in found)
    if key not in _recipe_models:
        sections = {}
        for section, found in registries.items():
            base = Recipe.model_fields[section].annotation
            fields = {}
            for registry in found:
                for name, plugin in registry.items():
                    options = getattr(plugin, "options", None)
                    if options is not None and name not in base.model_fields:
                        fields[name] = (options, Field(default_factory=options))
            sections[section] = create_model(base.__name__, __base__=base, __doc__=base.__doc__, **fields)
        _recipe_models[key] = create_model(
            "Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
            **{section: (model, Field(default_factory=model)) for section, model in sections.items()})
    return _recipe_models[key]


def _section_at(path: tuple, model: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The config class found by walking `path` through the nested field annotations."""
    model = model or recipe_model()
    for key in path:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the key path, with the closest valid key for unknown keys."""
    first = error.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc)
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        valid = list(section.model_fields) if section else []
        return f"{source}: unknown key '{key}'{did_you_mean(loc[-1], valid)}{more}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{key}'{more}"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:  # a whole-recipe check; its message names the key itself
        return f"{source}: {message}{more}"
    section = _section_at(loc)
    field, _, rest = message.partition(": ")
    if first["type"] == "value_error" and rest and section is not None and field in section.model_fields:
        key, message = f"{key}.{field}", rest  # a check across a section's keys names the key it is about
    got = first.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) and first["type"] != "value_error" else ""
    return f"{source}: {key}: {message}{shown}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `key.path=value`; the value is read as YAML so numbers and lists keep their types."""
    if "=" not in text:
        raise InputError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise InputError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `key.path=value` in a nested dict (validation happens afterwards)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def read_recipe_file(path: str | Path) -> dict:
    """A recipe YAML as written (not validated), its name defaulting to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a recipe must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return raw


def load_recipe(source: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (or dict), apply overrides, and validate it."""
    if isinstance(source, dict):
        raw, label = copy.deepcopy(source), "recipe"  # overrides must not reach into the caller's nested dicts
    else:
        raw, label = read_recipe_file(source), str(Path(source))
    raw = apply_overrides(raw, overrides or [])
    try:
        return recipe_model().model_validate(raw)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, label)) from None
