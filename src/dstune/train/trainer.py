"""The fine-tuning recipe: setup, then the Trainer loop, then the save — top to bottom."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

from ..config import Recipe
from ..data.build import load_split
from ..data.templates import ChatTemplate, get_template
from ..data.tokenize import audit_labels, encode_conversation, encode_text
from ..errors import InputError
from ..evaluate.harness import evaluate_records, record_tasks
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..tuners.methods import add_method
from ..tuners.prefix import SHARED
from ..tuners.staging import StagedActivationCallback
from .collate import CausalCollator
from .fastlora import enable_fused_lora
from .loss import supervised_lm_loss
from .packing import PackingCollator
from .sampler import ShuffledLengthGroupedSampler


class DstuneTrainer(Trainer):
    """HF Trainer with a supervised-positions loss and generation-based dev metrics for early stopping."""

    def __init__(self, *args, dev_records=None, template: ChatTemplate | None = None, eval_metrics=(),
                 generation_batch_size: int = 32, max_new_tokens: int = 16, group_by_length: bool = False,
                 **kwargs):
        self.group_by_length = group_by_length
        super().__init__(*args, **kwargs)
        # Generation metrics score chat records; raw-text records count in the dev loss only.
        self.dev_records = [r for r in dev_records or [] if "messages" in r]
        self.template = template
        self.eval_metrics = list(eval_metrics)
        self.generation_batch_size = generation_batch_size
        self.max_new_tokens = max_new_tokens
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        """Shuffled length-grouped batches when the recipe asks for them (see ShuffledLengthGroupedSampler)."""
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Under DDP, accelerate deals these per-device batches out to the ranks in turn.
        return ShuffledLengthGroupedSampler([len(s["input_ids"]) for s in dataset],
                                            self.args.per_device_train_batch_size, self.args.seed)

    def _load_best_model(self):
        """The Trainer restores one adapter from the checkpoint root; a multi-task prefix has one per sub-folder."""
        tasks = getattr(self.model, "prefix_tasks", None)
        if not tasks:
            return super()._load_best_model()
        best = Path(self.state.best_model_checkpoint)
        for name in [SHARED, *tasks]:
            # Not trainable: peft then reads the saved prefixes as they are, without the projection MLP.
            self.model.load_adapter(best / name, adapter_name=name, is_trainable=False)
        self.model.set_adapter(SHARED)
        self.model.set_prefix_tasks(tasks)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token-level cross-entropy normalised by the supervised tokens of the whole accumulated batch."""
        loss_sum, count = supervised_lm_loss(model, inputs)
        if model.training:
            self.tokens_seen += int(inputs["num_tokens"])
            self.supervised_tokens_seen += int(count)
        if num_items_in_batch is not None:
            # Normalising by the global count makes accumulation exact (transformers #34191).
            self.loss_is_scaled_for_ga = True
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        else:
            self.loss_is_scaled_for_ga = False
            loss = loss_sum / count.clamp(min=1)
        return (loss, {}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The dev loss from the usual loop, plus generation metrics that early stopping can watch."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.dev_records and self.eval_metrics:
            # Every rank scores the whole dev set, so all ranks take the same early-stopping decision.
            result = evaluate_records(
                self.model, self.processing_class, self.template, self.dev_records, self.eval_metrics,
                self.generation_batch_size, self.max_new_tokens,
            )
            for name, value in result["metrics"].items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (dev evaluations fall between steps and are not counted)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


@dataclass
class TrainResult:
    """What the train stage produced."""

    adapter_dir: Path
    summary: dict
    model: object
    trainer: DstuneTrainer


def encode_records(records, tokenizer, template, max_length, with_tasks: bool = False):
    """Encoded samples (input_ids and labels, and the task when asked) of a split, after the label-mask audit."""
    samples = [encode_text(tokenizer, r["text"], str(r["id"]), max_length) if "text" in r
               else encode_conversation(tokenizer, template, r["messages"], str(r["id"]), max_length) for r in records]
    audit_labels(samples, tokenizer, template, max_length)
    encoded = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
    if with_tasks:
        for sample, task in zip(encoded, record_tasks(records)):
            sample["task"] = task
    return encoded


def training_arguments(recipe: Recipe, output_dir: Path, has_dev: bool, chat_dev: bool = True) -> TrainingArguments:
    """TrainingArguments from the recipe's train section (without chat dev records, the dev loss picks the best)."""
    cfg = recipe.train
    evaluate = has_dev and cfg.eval_steps > 0
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.resolved_learning_rate(),
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        save_strategy="steps" if evaluate else "no",
        save_steps=cfg.eval_steps if evaluate else 500,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=evaluate,
        metric_for_best_model=(cfg.metric if chat_dev else "loss") if evaluate else None,
        greater_is_better=chat_dev,
        prediction_loss_only=True,
        remove_unused_columns=False,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input that requires grad (the base model is frozen).
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def train(recipe: Recipe, data_dir: Path | None = None) -> TrainResult:
    """Fine-tune the recipe's model with its PEFT method on its dataset folder; save the adapter and a summary."""
    # --- setup ---
    data_dir = Path(data_dir or recipe.run_dir / "data")
    train_records, dev_records = load_split(data_dir, "train"), load_split(data_dir, "dev")
    if not train_records:
        raise InputError(f"{data_dir}: no train.jsonl; run `dstune data` first")
    if recipe.train.max_dev_samples is not None:
        dev_records = dev_records[: recipe.train.max_dev_samples]
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    template = get_template(recipe.model.template, tokenizer)
    with_tasks = recipe.train.method == "prefix" and bool(recipe.train.prefix.tasks)
    train_set = encode_records(train_records, tokenizer, template, recipe.data.max_length, with_tasks)
    dev_set = encode_records(dev_records, tokenizer, template, recipe.data.max_length, with_tasks)
    model = load_model(model_path, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.load_in_4bit)
    if recipe.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(recipe.train.seed)  # adapter weights are drawn here, before the Trainer seeds anything
    model = add_method(model, recipe.train)
    if recipe.train.method == "prefix" and recipe.train.prefix.init == "activations":
        # The keys and values of real training prompts, concatenated until every virtual token has one.
        text = [t for s in train_set[:64] for t in s["input_ids"]]
        model.init_from_activations(torch.tensor(text[:4 * recipe.data.max_length]))
    trainable, total = model.get_nb_trainable_parameters()
    fused = enable_fused_lora(model) if recipe.train.fused_lora and recipe.train.method in ("lora", "dora") else 0
    if recipe.train.packs:
        collator = PackingCollator(tokenizer.pad_token_id, recipe.train.pack_width or recipe.data.max_length,
                                   model.config._attn_implementation, model.dtype)
    else:
        collator = CausalCollator(tokenizer.pad_token_id)
    run_dir = recipe.run_dir
    args = training_arguments(recipe, run_dir / "checkpoints", bool(dev_set), any("messages" in r for r in dev_records))
    timer = StepTimer()
    callbacks = [timer]
    if args.load_best_model_at_end and recipe.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))
    if recipe.train.method == "adapter" and recipe.train.adapter.stages:
        callbacks.append(StagedActivationCallback(model, recipe.train.adapter.stages))
    if args.process_index == 0:
        from torch.utils.tensorboard import SummaryWriter

        # Checkpoints of an earlier run would mix with this run's rotation; there is no resume yet.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tb"))))
    trainer = DstuneTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=dev_set or None,
        data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        dev_records=dev_records, template=template, eval_metrics=[recipe.train.metric],
        generation_batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
        group_by_length=recipe.train.group_by_length,
    )

    # --- loop ---
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start

    # --- save ---
    adapter_dir = run_dir / "adapter"
    # Throughput counts optimizer work only: the dev evaluations inside the loop are timed apart.
    eval_seconds = sum(e.get("eval_runtime", 0.0) for e in trainer.state.log_history)
    step_seconds = max(seconds - eval_seconds, 1e-9)
    summary = {
        "stage": "train",
        "base_model": str(model_path),
        "method": recipe.train.method,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "learning_rate": args.learning_rate,
        "optimizer_steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_seconds": round(seconds, 2),
        "dev_eval_seconds": round(eval_seconds, 2),
        "train_loss": output.training_loss,
        "tokens": trainer.tokens_seen,
        "supervised_tokens": trainer.supervised_tokens_seen,
        "tokens_per_second": round(trainer.tokens_seen / step_seconds, 2),
        "supervised_tokens_per_second": round(trainer.supervised_tokens_seen / step_seconds, 2),
        "packing": recipe.train.packs,
        "padding_fraction": round(collator.padding_fraction, 4),
        "fused_lora_layers": fused,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "step_seconds": [round(t, 4) for t in timer.seconds],
        "best_metric": {recipe.train.metric: trainer.state.best_metric} if args.load_best_model_at_end else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "log_history": [_finite(entry) for entry in trainer.state.log_history],
    }
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "dstune_train.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(adapter_dir, summary, model, trainer)


def _finite(entry: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
