"""The fine-tuning recipe: setup, then the Trainer loop, then the save — top to bottom."""

from __future__ import annotations

import errno
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ExportableState
from transformers.integrations import TensorBoardCallback

from ..config import Recipe
from ..data.build import load_split
from ..data.templates import ChatTemplate, get_template
from ..data.tokenize import audit_labels, encode_conversation, encode_text
from ..errors import DstuneError, InputError
from ..evaluate.harness import evaluate_records, record_tasks
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..tuners.methods import add_method
from ..tuners.prefix import SHARED
from ..tuners.lora import keep_moe_targets
from ..tuners.staging import StagedActivationCallback
from . import checkpoint as ckpt
from . import faults
from .collate import CausalCollator
from .fastlora import enable_fused_lora
from .guards import NonFiniteGuard, Preemption
from .loss import supervised_lm_loss
from .packing import PackingCollator
from .qat import disable_qat, enable_qat
from .sampler import ShuffledLengthGroupedSampler


class DstuneTrainer(Trainer):
    """HF Trainer with a supervised-positions loss and generation-based dev metrics for early stopping."""

    def __init__(self, *args, dev_records=None, template: ChatTemplate | None = None, eval_metrics=(),
                 generation_batch_size: int = 32, max_new_tokens: int = 16, group_by_length: bool = False,
                 sample_log: ckpt.SampleOrderLog | None = None, nonfinite: NonFiniteGuard | None = None,
                 run_info: dict | None = None, **kwargs):
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
        self.sample_log = sample_log
        self.nonfinite = nonfinite or NonFiniteGuard()
        self.run_info = run_info or {}  # what a resume must match, kept in every checkpoint
        self._step_ids: list[str] = []
        self._step_loss: torch.Tensor | None = None
        self._micro_batch = 0

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
        sample_ids = inputs.pop("sample_ids", None) or []
        if model.training:
            step = self.state.global_step + 1
            self._micro_batch += 1
            faults.in_step(step, self._micro_batch == self.current_gradient_accumulation_steps)
        loss_sum, count = supervised_lm_loss(model, inputs)
        if model.training:
            if faults.nan_loss(step):
                loss_sum = loss_sum * float("nan")
            self.tokens_seen += int(inputs["num_tokens"])
            self.supervised_tokens_seen += int(count)
            self._step_ids += sample_ids
            # Summed on the device: one sync per optimizer step, in `_get_grad_norm`.
            detached = loss_sum.detach().float()
            self._step_loss = detached if self._step_loss is None else self._step_loss + detached
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

    def _get_grad_norm(self, model, grad_norm=None):
        """The step's grad norm; also where each optimizer step ends: log its samples, guard against NaN/inf."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        step = self.state.global_step + 1
        ids, self._step_ids = self._step_ids, []
        loss, self._step_loss = self._step_loss, None
        self._micro_batch = 0
        if self.sample_log is not None:
            self.sample_log.write(step, int(self.state.epoch or 0), ids)
        device = loss.device if loss is not None else self.args.device
        values = torch.stack([torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32,
                                              device=device).reshape(()),
                              loss if loss is not None else torch.zeros((), device=device)])
        flag = (~torch.isfinite(values)).any().float().reshape(1)
        if self.args.world_size > 1:  # all ranks skip or stop together
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():  # the step's one device sync
            self.nonfinite.good_step()
            return grad_norm
        last = ckpt.latest_checkpoint(Path(self.args.output_dir))
        norm, loss_value = float(values[0]), float(values[1]) if loss is not None else None
        self.nonfinite.bad_step(step, loss_value, norm, ids, str(last) if last else None)
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient: nothing moves
        return grad_norm

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        """After a logged window with a skipped NaN step: the log shows NaN, then the running sums start clean."""
        total = self._total_loss_scalar
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        if not math.isfinite(self._total_loss_scalar):  # HF resets tr_loss by subtracting it: NaN would stay
            self._total_loss_scalar = total
            tr_loss.zero_()

    # --- crash-safe checkpoints without pickle (see checkpoint.py) ---

    def _barrier(self) -> None:
        if self.args.world_size > 1:
            torch.distributed.barrier()

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _native_state(self) -> bool:
        """DeepSpeed and FSDP write their own optimizer state; everything else gets dstune's pickle-free files."""
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_checkpoint(self, model, trial):
        """Stage the whole checkpoint, fsync, rename into place, mark complete, and only then rotate old ones."""
        try:
            self._write_checkpoint()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            root = Path(self.args.output_dir)
            shutil.rmtree(ckpt.staging_dir(root, self.state.global_step), ignore_errors=True)  # give the space back
            last = ckpt.latest_checkpoint(root)
            raise DstuneError(f"{root}: disk full while writing the checkpoint of step {self.state.global_step} "
                              f"({exc.strerror}); the last complete checkpoint is {last or 'none'}. Free space, then "
                              "`dstune train RECIPE --resume`") from None

    def _write_checkpoint(self) -> None:
        root = Path(self.args.output_dir)
        step = self.state.global_step
        final, staging = root / f"checkpoint-{step}", ckpt.staging_dir(root, step)
        writer = self.args.should_save
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        self.store_flos()
        self.save_model(str(staging), _internal_call=True)
        if writer:
            (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle nothing needs
            faults.checkpoint_write("adapter")
        if self.state.best_global_step:
            best = root / f"checkpoint-{self.state.best_global_step}"
            if self.state.best_global_step == step or best.is_dir():
                self.state.best_model_checkpoint = str(best)
        staging.mkdir(parents=True, exist_ok=True)
        if not self._native_state():
            self._save_optimizer_and_scheduler(str(staging))
        elif writer:
            ckpt.save_without_pickle(self.optimizer.state_dict(), staging, "optimizer")
            faults.checkpoint_write("optimizer")
            ckpt.save_without_pickle(self.lr_scheduler.state_dict(), staging, "scheduler")
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                ckpt.save_without_pickle(scaler.state_dict(), staging, "scaler")
            faults.checkpoint_write("scheduler")
        ckpt.save_without_pickle(ckpt.rng_states(), staging, self._rng_name())
        if writer:
            faults.checkpoint_write("rng")
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    self.state.stateful_callbacks[callback.__class__.__name__] = callback.state()
            self.state.save_to_json(str(staging / "trainer_state.json"))
            faults.checkpoint_write("trainer_state")
            (staging / ckpt.STATE).write_text(json.dumps({
                **self.run_info, "global_step": step, "epoch": self.state.epoch,
                # Checkpoints are written after an optimizer step, so no gradients are half accumulated.
                "gradient_accumulation_phase": 0,
                "micro_batches_done": step * self.args.gradient_accumulation_steps,
                "data_seed": self.args.data_seed, "tokens_seen": self.tokens_seen,
                "supervised_tokens_seen": self.supervised_tokens_seen, "nonfinite_skipped": self.nonfinite.skipped,
            }, indent=2))
            faults.checkpoint_write("dstune_state")
        self._barrier()  # every rank's RNG state is in the staging folder
        if writer:
            ckpt.publish(staging, final, {"step": step, "files": sorted(p.name for p in staging.iterdir())})
            ckpt.rotate(root, self.args.save_total_limit, self.state.best_model_checkpoint)
            faults.checkpoint_write("rotate")
        self._barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The adapter weights of a checkpoint, from safetensors (checked in `check_checkpoint`)."""
        with keep_moe_targets():
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        folder = Path(checkpoint) if checkpoint else None
        if folder is None or not (folder / "optimizer.safetensors").is_file() or not self._native_state():
            return super()._load_optimizer_and_scheduler(checkpoint)  # HF's format: torch.load(weights_only=True)
        self.optimizer.load_state_dict(ckpt.load_without_pickle(folder, "optimizer"))
        self.lr_scheduler.load_state_dict(ckpt.load_without_pickle(folder, "scheduler"))

    def _load_scaler(self, checkpoint):
        folder = Path(checkpoint) if checkpoint else None
        if folder is None or not (folder / "scaler.safetensors").is_file():
            return super()._load_scaler(checkpoint)
        self.accelerator.scaler.load_state_dict(ckpt.load_without_pickle(folder, "scaler"))

    def _load_rng_state(self, checkpoint):
        folder = Path(checkpoint) if checkpoint else None
        if folder is None or not (folder / f"{self._rng_name()}.safetensors").is_file():
            return super()._load_rng_state(checkpoint)
        ckpt.set_rng_states(ckpt.load_without_pickle(folder, self._rng_name()))

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
    # Set when SIGTERM stopped the run early: the checkpoint to resume from (the adapter was not saved).
    preempted_checkpoint: Path | None = None


def encode_records(records, tokenizer, template, max_length, with_tasks: bool = False):
    """Encoded samples (input_ids and labels, and the task when asked) of a split, after the label-mask audit."""
    samples = [encode_text(tokenizer, r["text"], str(r["id"]), max_length) if "text" in r
               else encode_conversation(tokenizer, template, r["messages"], str(r["id"]), max_length) for r in records]
    audit_labels(samples, tokenizer, template, max_length)
    encoded = [{"input_ids": s.input_ids, "labels": s.labels, "id": str(r["id"])} for s, r in zip(samples, records)]
    if with_tasks:
        for sample, task in zip(encoded, record_tasks(records)):
            sample["task"] = task
    return encoded


def training_arguments(recipe: Recipe, output_dir: Path, has_dev: bool, chat_dev: bool = True) -> TrainingArguments:
    """TrainingArguments from the recipe's train section (without chat dev records, the dev loss picks the best)."""
    cfg = recipe.train
    evaluate = has_dev and cfg.eval_steps > 0
    save_steps = cfg.save_steps or (cfg.eval_steps if evaluate else 50)
    if evaluate and save_steps % cfg.eval_steps:
        raise InputError(f"train.save_steps: {save_steps} must be a multiple of train.eval_steps ({cfg.eval_steps}), "
                         "so that the best dev checkpoint is one that was saved")
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
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_nan_inf_filter=False,  # a NaN step shows in the logs as NaN (the guard stops or skips it)
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


# Settings a resumed run may change: they do not alter the weights it trains.
RESUME_FREE_KEYS = {"logging_steps", "save_steps", "save_total_limit", "skip_nonfinite", "nonfinite_patience",
                    "preemption_grace_seconds", "max_dev_samples"}


def run_fingerprint(recipe: Recipe, data_dir: Path) -> dict:
    """What a checkpoint was trained with; `--resume` refuses a checkpoint written with other settings or data."""
    return {"train": recipe.train.model_dump(mode="json", exclude=RESUME_FREE_KEYS),
            "model": recipe.model.model_dump(mode="json"),
            "train_data_sha256": ckpt.file_sha256(data_dir / "train.jsonl")}


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def resume_checkpoint(resume: bool | str | Path, root: Path, fingerprint: dict,
                      main_process: bool) -> tuple[Path, dict]:
    """The complete checkpoint to resume from and its dstune state, checked to be safe and to match the recipe."""
    if resume is True:
        if main_process:
            for path in ckpt.remove_incomplete(root):
                print(f"dstune: removed {path}, an incomplete checkpoint left by an interrupted save", flush=True)
        found = ckpt.latest_checkpoint(root)
        if found is None:
            raise InputError(f"{root}: no complete checkpoint to resume from; run without --resume to start over")
    else:
        found = Path(resume)
        if not ckpt.is_complete(found):
            raise InputError(f"{found}: not a complete checkpoint (no {ckpt.MARKER}); resume from a complete one")
    ckpt.check_checkpoint(found)
    saved = ckpt.load_state(found)
    if saved:
        before, now = _flat({k: saved.get(k) for k in fingerprint}), _flat(fingerprint)
        for key in now:
            if key in before and before[key] != now[key]:
                name = key if key.startswith(("train.", "model.")) else "the train split"
                raise InputError(f"{found}: written with {name} = {before[key]!r}, and the recipe now gives "
                                 f"{now[key]!r}; an exact resume needs the same settings and data (or start over "
                                 "without --resume)")
    return found, saved


def train(recipe: Recipe, data_dir: Path | None = None, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune the recipe's model with its PEFT method on its dataset folder; save the adapter and a summary.

    `resume`: True continues from the newest complete checkpoint of the run, a path from that checkpoint.
    """
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
    qat = recipe.train.qat
    # QAT replaces the fused path on the layers it covers: its forward uses the fake-quantized merged weight.
    qat_layers = enable_qat(model, qat.scheme, qat.group_size) if qat else 0
    fuses = recipe.train.fused_lora and recipe.train.method in ("lora", "dora") and not qat
    fused = enable_fused_lora(model) if fuses else 0
    if recipe.train.packs:
        collator = PackingCollator(tokenizer.pad_token_id, recipe.train.pack_width or recipe.data.max_length,
                                   model.config._attn_implementation, model.dtype)
    else:
        collator = CausalCollator(tokenizer.pad_token_id)
    run_dir = recipe.run_dir
    checkpoints = run_dir / "checkpoints"
    args = training_arguments(recipe, checkpoints, bool(dev_set), any("messages" in r for r in dev_records))
    fingerprint = run_fingerprint(recipe, data_dir)
    resume_from, saved = (resume_checkpoint(resume, checkpoints, fingerprint, args.process_index == 0) if resume
                          else (None, {}))
    if resume_from:
        print(f"dstune: resuming from {resume_from} (step {ckpt.step_of(resume_from)})", flush=True)
    elif args.process_index == 0 and checkpoints.is_dir():
        # Checkpoints of an earlier run would mix with this run's rotation.
        if ckpt.complete_checkpoints(checkpoints):
            print(f"dstune: starting over: removing the checkpoints in {checkpoints} (--resume continues from them)",
                  flush=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    timer = StepTimer()
    preemption = Preemption(recipe.train.preemption_grace_seconds, checkpoints, distributed=args.world_size > 1)
    callbacks = [timer, preemption]
    if args.load_best_model_at_end and recipe.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))
    if recipe.train.method == "adapter" and recipe.train.adapter.stages:
        callbacks.append(StagedActivationCallback(model, recipe.train.adapter.stages))
    if args.process_index == 0:
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tb"))))
    trainer = DstuneTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=dev_set or None,
        data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        dev_records=dev_records, template=template, eval_metrics=[recipe.train.metric],
        generation_batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
        group_by_length=recipe.train.group_by_length,
        sample_log=ckpt.SampleOrderLog(run_dir / (f"sample_order.rank{args.process_index}.jsonl" if args.world_size > 1
                                                  else "sample_order.jsonl"),
                                       ckpt.step_of(resume_from) if resume_from else None),
        nonfinite=NonFiniteGuard(recipe.train.skip_nonfinite, recipe.train.nonfinite_patience,
                                 saved.get("nonfinite_skipped")),
        run_info=fingerprint,
    )
    trainer.tokens_seen = saved.get("tokens_seen", 0)
    trainer.supervised_tokens_seen = saved.get("supervised_tokens_seen", 0)
    tokens_before, supervised_before = trainer.tokens_seen, trainer.supervised_tokens_seen

    # --- loop ---
    start = time.perf_counter()
    preemption.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        preemption.uninstall()
        trainer.sample_log.close()
    seconds = time.perf_counter() - start
    # The in-memory model is then the fp32 one that is evaluated, merged and quantized by the export.
    disable_qat(model)
    adapter_dir = run_dir / "adapter"
    if preemption.stopped_at is not None:
        return TrainResult(adapter_dir, {"stage": "train", "preempted_at_step": preemption.stopped_at}, model,
                           trainer, preempted_checkpoint=ckpt.latest_checkpoint(checkpoints))

    # --- save ---
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
        "train_loss": output.training_loss if math.isfinite(output.training_loss) else None,
        "tokens": trainer.tokens_seen,
        "supervised_tokens": trainer.supervised_tokens_seen,
        # This process's own work: a resumed run counts from its checkpoint on.
        "tokens_per_second": round((trainer.tokens_seen - tokens_before) / step_seconds, 2),
        "supervised_tokens_per_second": round((trainer.supervised_tokens_seen - supervised_before) / step_seconds, 2),
        "packing": recipe.train.packs,
        "padding_fraction": round(collator.padding_fraction, 4),
        "fused_lora_layers": fused,
        "qat": {"scheme": qat.scheme, "group_size": qat.group_size, "layers": qat_layers} if qat else None,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "step_seconds": [round(t, 4) for t in timer.seconds],
        "best_metric": {recipe.train.metric: trainer.state.best_metric} if args.load_best_model_at_end else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": str(resume_from) if resume_from else None,
        "nonfinite_skipped": len(trainer.nonfinite.skipped),
        "nonfinite_steps": trainer.nonfinite.skipped,
        "log_history": [_finite(entry) for entry in trainer.state.log_history],
    }
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "dstune_train.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(adapter_dir, summary, model, trainer)


def _finite(entry: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
