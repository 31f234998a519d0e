"""The fine-tuning recipe: setup, then one explicit loop on accelerate, then the save — top to bottom.

Each optimizer step reads: batch (the micro-batches of one accumulated step), forward and loss (the objective
plugin), backward, clip, the non-finite guard, step, schedule, log, evaluate, save. accelerate brings DDP, FSDP2
and DeepSpeed (`dstune train --launch CONFIG`, see dstune.scale.launch), and mixed precision on GPUs. Under FSDP2
checkpoints and the adapter hold the weights gathered whole, and a resume splits them back into the shards. The
method (dstune.tuners.method) and the objective (dstune.train.objectives) are plugins: the loop knows none by name.

Losses are summed over the supervised tokens and divided by the count of the whole accumulated step on all ranks,
so accumulation and data parallelism give the gradient of one big batch (8x1 = 1x8). Every checkpoint is crash-safe
and pickle-free (checkpoint.py), and a resumed run continues bit for bit: the data order, the RNG states, the
optimizer, the scheduler, early stopping and the objective's state all come back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from ..config import Recipe
from ..data.build import load_split, with_data_defaults
from ..data.templates import get_template
from ..data.tokenize import audit_labels, encode_record
from ..errors import DstuneError, InputError, phase
from ..evaluate.harness import evaluate_records, record_tasks
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..plugins import METHODS, OBJECTIVES
from ..provenance import provenance
from ..tuners.methods import add_method
from . import checkpoint as ckpt
from . import faults
from .collate import CausalCollator
from .events import EventLog
from .fastlora import enable_fused_lora
from .guards import NonFiniteGuard, Preemption
from .init_adapter import load_initial_adapter
from .objectives.base import TrainContext
from .packing import PackingCollator
from .qat import disable_qat, enable_qat
from .sampler import ShuffledLengthGroupedSampler

# Settings a resumed run may change: they do not alter the weights it trains.
RESUME_FREE_KEYS = {"logging_steps", "save_steps", "save_total_limit", "skip_nonfinite", "nonfinite_patience",
                    "preemption_grace_seconds", "max_dev_samples"}
# Parameters that get no weight decay (as in transformers: biases and norms).
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
LOOP_STATE = "trainer_state.json"  # the loop's own state in a checkpoint (name kept from the HF-Trainer days)


@dataclass
class LoopState:
    """Where training stands: what a checkpoint saves besides weights, and what the summary reports."""

    global_step: int = 0
    epoch: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    patience_used: int = 0
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0
    log_history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    """What the train stage produced."""

    adapter_dir: Path
    summary: dict
    model: object
    # Set when SIGTERM stopped the run early: the checkpoint to resume from (the adapter was not saved).
    preempted_checkpoint: Path | None = None
    # Under torchrun, only the main process saves and reports.
    main_process: bool = True


def encode_records(records, tokenizer, template, max_length, fields: tuple[str, ...] = ()):
    """Encoded samples (input_ids, labels, id, and the method's extra `fields`) of a split, after the label audit."""
    samples = [encode_record(tokenizer, template, r, max_length) for r in records]
    audit_labels(samples, tokenizer, template, max_length)
    encoded = [{"input_ids": s.input_ids, "labels": s.labels, "id": str(r["id"])} for s, r in zip(samples, records)]
    if "task" in fields:
        for sample, task in zip(encoded, record_tasks(records)):
            sample["task"] = task
    return encoded


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


def check_schedule(recipe: Recipe, has_dev: bool) -> tuple[bool, int]:
    """Whether dev evaluation runs, and the checkpoint interval (a multiple of the evaluation interval)."""
    cfg = recipe.train
    evaluate = has_dev and cfg.eval_steps > 0
    # A save_steps that is not a multiple of eval_steps is refused with the recipe (config.TrainConfig).
    return evaluate, cfg.save_steps or (cfg.eval_steps if evaluate else 50)


def build_optimizer(model, objective, cfg) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (no decay on biases and norms), plus the objective's own groups."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not NO_DECAY.search(n)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if NO_DECAY.search(n)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + list(objective.parameter_groups())
    # fused: one kernel for all parameters (torch >= 2.8 has it on CPUs too); as transformers' default optimizer.
    fused = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
    return torch.optim.AdamW(groups, lr=cfg.resolved_learning_rate(), betas=(0.9, 0.999), eps=1e-8, fused=fused)


def build_scheduler(optimizer, cfg, max_steps: int):
    """Warmup then the recipe's decay (transformers' schedule functions); warmup_ratio < 1 is a share of steps."""
    from transformers import get_scheduler

    warmup = cfg.warmup_ratio if cfg.warmup_ratio >= 1 else math.ceil(max_steps * cfg.warmup_ratio)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(warmup), num_training_steps=max_steps)


def make_accelerator(seed: int):
    """An Accelerator: DDP/FSDP2/DeepSpeed and mixed precision come from the launch's accelerate config."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs

    accelerator = Accelerator(
        # Seeded shuffles that accelerate re-seeds per epoch (seed + epoch), identical on every rank.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        # Staged adapters and multi-task prefixes leave some parameters without a gradient in a step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        cpu=not torch.cuda.is_available(),
    )
    # Tests and CPU-only machines run FSDP2 on gloo; accelerate itself only shards on accelerators.
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()
            and accelerator.num_processes > 1 and not accelerator.is_fsdp2):
        force_fsdp(accelerator)
    return accelerator


def force_fsdp(accelerator) -> None:
    """Make a CPU (gloo) accelerator shard with FSDP, as the environment asks, rather than fall back to DDP."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # accelerate's state only turns GPU-like distributed types into FSDP and drops the plugin on CPUs without a word;
    # the plugin is rebuilt from the FSDP_* variables, as accelerate does when ACCELERATE_USE_FSDP is set.
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    # Every AcceleratorState() (one per prepared optimizer) copies PartialState's shared state back over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


class Checkpointer:
    """Writes crash-safe, pickle-free checkpoints: staged, fsynced, renamed into place, marked, then rotated."""

    def __init__(self, root: Path, accelerator, keep: int, run_info: dict):
        self.root = root
        self.accelerator = accelerator
        self.keep = keep
        self.run_info = run_info  # what a resume must match, kept in every checkpoint

    @property
    def rng_name(self) -> str:
        acc = self.accelerator
        return "rng_state" if acc.num_processes <= 1 else f"rng_state_{acc.process_index}"

    def save(self, model, tokenizer, optimizer, scheduler, objective, state: LoopState, extra: dict) -> Path:
        """Write the checkpoint of `state.global_step`; a full disk is one line naming the last good checkpoint."""
        try:
            return self._write(model, tokenizer, optimizer, scheduler, objective, state, extra)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(ckpt.staging_dir(self.root, state.global_step), ignore_errors=True)  # give the space back
            last = ckpt.latest_checkpoint(self.root)
            raise DstuneError(f"{self.root}: disk full while writing the checkpoint of step {state.global_step} "
                              f"({exc.strerror}); the last complete checkpoint is {last or 'none'}. Free space, "
                              "then `dstune train RECIPE --resume`") from None

    def _write(self, model, tokenizer, optimizer, scheduler, objective, state: LoopState, extra: dict) -> Path:
        acc = self.accelerator
        step = state.global_step
        final, staging = self.root / f"checkpoint-{step}", ckpt.staging_dir(self.root, step)
        writer = acc.is_main_process
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        # Collectives under FSDP2/DeepSpeed: every rank takes part, the writer gets the whole tensors.
        if acc.is_fsdp2:
            weights, optimizer_state = ckpt.gathered_state(model, optimizer.optimizer)
        else:
            weights = acc.get_state_dict(model)
            optimizer_state = optimizer.state_dict() if writer else None
        if writer:
            acc.unwrap_model(model).save_pretrained(staging, state_dict=weights)
            tokenizer.save_pretrained(staging)
            faults.checkpoint_write("adapter")
            ckpt.save_without_pickle(optimizer_state, staging, "optimizer")
            faults.checkpoint_write("optimizer")
            ckpt.save_without_pickle(scheduler.state_dict(), staging, "scheduler")
            if acc.scaler is not None:
                ckpt.save_without_pickle(acc.scaler.state_dict(), staging, "scaler")
            objective_state = objective.state_dict()
            if objective_state:
                ckpt.save_without_pickle(objective_state, staging, "objective")
            faults.checkpoint_write("scheduler")
        acc.wait_for_everyone()  # the folder exists before the other ranks write their RNG state
        ckpt.save_without_pickle(ckpt.rng_states(), staging, self.rng_name)
        if writer:
            faults.checkpoint_write("rng")
            (staging / LOOP_STATE).write_text(json.dumps(vars(state), indent=1))
            faults.checkpoint_write("trainer_state")
            (staging / ckpt.STATE).write_text(json.dumps({
                **self.run_info, **extra, "global_step": step, "epoch": state.epoch,
                # Checkpoints are written after an optimizer step, so no gradients are half accumulated.
                "gradient_accumulation_phase": 0, "tokens_seen": state.tokens_seen,
                "supervised_tokens_seen": state.supervised_tokens_seen,
            }, indent=2))
            faults.checkpoint_write("dstune_state")
        acc.wait_for_everyone()  # every rank's RNG state is in the staging folder
        if writer:
            ckpt.publish(staging, final, {"step": step, "files": sorted(p.name for p in staging.iterdir())})
            best = self.root / f"checkpoint-{state.best_step}" if state.best_step else None
            ckpt.rotate(self.root, self.keep, best)
            faults.checkpoint_write("rotate")
        acc.wait_for_everyone()
        return final

    def load(self, folder: Path, model, optimizer, scheduler, objective, method) -> LoopState:
        """Restore weights, optimizer, scheduler, objective and the loop's state from a checkpoint (not the RNG)."""
        if self.accelerator.is_fsdp2:
            ckpt.load_sharded(model, folder, optimizer.optimizer)
        else:
            method.restore(self.accelerator.unwrap_model(model), folder)
            optimizer.load_state_dict(ckpt.load_without_pickle(folder, "optimizer"))
        scheduler.load_state_dict(ckpt.load_without_pickle(folder, "scheduler"))
        if self.accelerator.scaler is not None and (folder / "scaler.safetensors").is_file():
            self.accelerator.scaler.load_state_dict(ckpt.load_without_pickle(folder, "scaler"))
        if (folder / "objective.safetensors").is_file():
            objective.load_state_dict(ckpt.load_without_pickle(folder, "objective"))
        return LoopState(**json.loads((folder / LOOP_STATE).read_text()))

    def load_rng(self, folder: Path) -> None:
        """This rank's RNG states at the checkpoint (dropout masks then continue as if never interrupted)."""
        ckpt.set_rng_states(ckpt.load_without_pickle(folder, self.rng_name))


def _finite(entry: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}


@phase("training")
def train(recipe: Recipe, data_dir: Path | None = None, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune the recipe's model with its method and objective on its dataset folder; save the adapter.

    `resume`: True continues from the newest complete checkpoint of the run, a path from that checkpoint.
    """
    from accelerate.utils import set_seed

    # --- setup: data ---
    data_dir = Path(data_dir or recipe.run_dir / "data")
    recipe = with_data_defaults(recipe, data_dir)  # train.metric and eval.max_new_tokens, if the recipe sets none
    cfg = recipe.train
    method, method_options = METHODS[cfg.method], cfg.options(cfg.method)
    train_records, dev_records = load_split(data_dir, "train"), load_split(data_dir, "dev")
    if not train_records:
        raise InputError(f"{data_dir}: no train.jsonl; run `dstune data` first")
    if cfg.max_dev_samples is not None:
        dev_records = dev_records[: cfg.max_dev_samples]
    chat_dev = [r for r in dev_records if "messages" in r]  # generation metrics score chat records only
    evaluate, save_steps = check_schedule(recipe, bool(dev_records))
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    template = get_template(recipe.model.template, tokenizer)
    fields = method.sample_fields(method_options)
    train_set = encode_records(train_records, tokenizer, template, recipe.data.max_length, fields)
    dev_set = encode_records(dev_records, tokenizer, template, recipe.data.max_length, fields)

    # --- setup: model, method, objective ---
    accelerator = make_accelerator(cfg.seed)
    model = load_model(model_path, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.load_in_4bit)
    if recipe.model.load_in_4bit and recipe.model.dtype == "float16":
        # peft's preparation keeps every weight that is not 4-bit in fp32, which fp16 training needs. A bf16 base
        # keeps them in bf16, as LLaMA-Factory does: 2.9 GiB less on a 14B model's embeddings and LM head.
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(cfg.seed)  # adapter weights are drawn here
    model = add_method(model, cfg)
    method.before_training(model, method_options, train_set, recipe.data.max_length)
    parent = load_initial_adapter(model, cfg.init_adapter) if cfg.init_adapter else None
    qat = cfg.qat
    # QAT replaces the fused path on the layers it covers: its forward uses the fake-quantized merged weight.
    qat_layers = enable_qat(model, qat.scheme, qat.group_size) if qat else 0
    fused = enable_fused_lora(model) if cfg.fused_lora and method.fuses and not qat else 0
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the base model is frozen).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.packs:
        collator = PackingCollator(tokenizer.pad_token_id, cfg.pack_width or recipe.data.max_length,
                                   model.config._attn_implementation, model.dtype)
    else:
        collator = CausalCollator(tokenizer.pad_token_id)
    run_dir = recipe.run_dir
    objective = OBJECTIVES[cfg.objective](cfg.options(cfg.objective),
                                          TrainContext(recipe, tokenizer, model, accelerator, train_set, run_dir))
    objective.setup()
    trainable, total = model.get_nb_trainable_parameters()  # after the objective: O-LoRA grows the adapter
    set_seed(cfg.seed)  # everything after draws from here: data order, dropout masks

    # --- setup: data loaders, optimizer, schedule ---
    lengths = [len(s["input_ids"]) for s in train_set]
    sampler = objective.sampler(lengths, cfg.batch_size, cfg.seed)
    if sampler is None:
        sampler = (ShuffledLengthGroupedSampler(lengths, cfg.batch_size, cfg.seed) if cfg.group_by_length
                   else RandomSampler(train_set))  # accelerate swaps in its seedable sampler
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator)
    dev_loader = DataLoader(dev_set, batch_size=cfg.batch_size, collate_fn=collator) if evaluate else None
    optimizer = build_optimizer(model, objective, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if dev_loader is not None:
        dev_loader = accelerator.prepare(dev_loader)
    model, optimizer, train_loader = objective.wrap(model, optimizer, train_loader)
    unwrapped = accelerator.unwrap_model(model)
    micro_per_epoch = len(train_loader)
    ga = cfg.grad_accum
    steps_per_epoch = max(micro_per_epoch // ga + int(micro_per_epoch % ga > 0), 1)
    if cfg.max_steps > 0:
        max_steps = cfg.max_steps
        epochs = max_steps // steps_per_epoch + int(max_steps % steps_per_epoch > 0)
    else:
        # train.min_steps: a small set gets more epochs rather than a handful of steps.
        max_steps = max(math.ceil(cfg.epochs * steps_per_epoch), cfg.min_steps)
        epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, max_steps)

    # --- setup: checkpoints, resume, logs ---
    checkpoints = run_dir / "checkpoints"
    fingerprint = run_fingerprint(recipe, data_dir)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    # What a resume must match, and where the checkpoint came from (the resolved recipe, versions, commit).
    saver = Checkpointer(checkpoints, accelerator, cfg.save_total_limit,
                         {**fingerprint, "provenance": provenance(recipe)})
    resume_from, saved = (resume_checkpoint(resume, checkpoints, fingerprint, main) if resume else (None, {}))
    state = LoopState()
    if resume_from:
        print(f"dstune: resuming from {resume_from} (step {ckpt.step_of(resume_from)})", flush=True)
        state = saver.load(resume_from, model, optimizer, scheduler, objective, method)
    elif main and checkpoints.is_dir():
        # Checkpoints of an earlier run would mix with this run's rotation.
        if ckpt.complete_checkpoints(checkpoints):
            print(f"dstune: starting over: removing the checkpoints in {checkpoints} (--resume continues from them)",
                  flush=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    nonfinite = NonFiniteGuard(cfg.skip_nonfinite, cfg.nonfinite_patience, saved.get("nonfinite_skipped"))
    sample_log = ckpt.SampleOrderLog(run_dir / (f"sample_order.rank{accelerator.process_index}.jsonl" if world > 1
                                                else "sample_order.jsonl"), state.global_step if resume_from else None)
    events = EventLog(run_dir / "events.jsonl", main, resume_step=state.global_step if resume_from else None,
                      tensorboard_dir=run_dir / "tb")
    metric_name = cfg.metric if chat_dev else "loss"  # without chat dev records, the dev loss picks the best
    greater_is_better = bool(chat_dev)
    preemption = Preemption(cfg.preemption_grace_seconds, checkpoints, distributed=world > 1)
    tokens_before, supervised_before = state.tokens_seen, state.supervised_tokens_seen
    events.write("stage", stage="train", status="start", max_steps=max_steps, steps_per_epoch=steps_per_epoch,
                 resumed_from=str(resume_from) if resume_from else None)

    def dev_evaluation() -> dict:
        """The token-mean dev loss over every rank's share, and the generation metrics on the whole dev split."""
        unwrapped.eval()
        loss_sum = torch.zeros((), device=accelerator.device)
        count = torch.zeros((), device=accelerator.device)
        with torch.no_grad():
            for batch in dev_loader:
                batch.pop("sample_ids", None)
                batch.pop("num_tokens", None)
                loss_sum += objective.loss(unwrapped, batch).loss.detach().float()
                count += objective.count(batch)
        totals = accelerator.reduce(torch.stack([loss_sum, count]), reduction="sum")
        metrics = {"loss": float(totals[0] / totals[1].clamp(min=1))}
        if chat_dev:
            # Every rank scores the whole dev set, so all ranks take the same early-stopping decision.
            result = evaluate_records(unwrapped, tokenizer, template, chat_dev, [cfg.metric], recipe.eval.batch_size,
                                      recipe.eval.max_new_tokens)
            metrics.update(result["metrics"])
        unwrapped.train()
        return metrics

    def improved(value: float) -> bool:
        if state.best_metric is None:
            return True
        return value > state.best_metric if greater_is_better else value < state.best_metric

    # --- loop ---
    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=state.global_step, desc="train", unit="step", disable=not main,
                    dynamic_ncols=True)
    start = time.perf_counter()
    eval_seconds = 0.0
    step_seconds: list[float] = []
    # This rank's share of each step's mean loss since the last log line (on the device; summed over ranks when logged).
    window_losses: list[torch.Tensor] = []
    stop = state.global_step >= max_steps
    epochs_done = state.global_step // steps_per_epoch
    skip_micro = (state.global_step % steps_per_epoch) * ga
    rng_pending = bool(resume_from)
    unwrapped.train()
    preemption.install()
    try:
        for epoch in range(epochs_done, epochs):
            if stop:
                break
            loader = train_loader
            if epoch == epochs_done and skip_micro:
                # Mid-epoch resume: skip the micro-batches already trained on; the RNG comes back after fetching
                # the first step's batches (the skip itself draws from it).
                loader = accelerator.skip_first_batches(train_loader, skip_micro)
            elif rng_pending:
                saver.load_rng(resume_from)
                rng_pending = False
            loader.set_epoch(epoch)
            # accelerate's set_epoch does not reach a sampler inside its batch-sampler shard
            underlying = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
            if hasattr(underlying, "set_epoch"):
                underlying.set_epoch(epoch)
            if hasattr(sampler, "set_step"):
                sampler.set_step(epoch * steps_per_epoch)
            iterator = iter(loader)
            first_step = state.global_step - epoch * steps_per_epoch
            for update in range(first_step, steps_per_epoch):
                # batch: the micro-batches of one optimizer step, and the count that normalises their losses
                step_start = time.perf_counter()
                last = update == steps_per_epoch - 1
                wanted = ga if not last or micro_per_epoch % ga == 0 else micro_per_epoch % ga
                batches = []
                for _ in range(wanted):
                    try:
                        batches.append(next(iterator))
                    except StopIteration:
                        break
                if not batches:
                    break
                if rng_pending:
                    saver.load_rng(resume_from)
                    rng_pending = False
                step = state.global_step + 1
                counts = [objective.count(b) for b in batches]
                items = accelerator.reduce(torch.as_tensor(sum(counts), device=accelerator.device).float(),
                                           reduction="sum")
                scale = world / items.clamp(min=1)  # DDP and FSDP2 average gradients over the ranks
                method.on_step_begin(unwrapped, method_options, state.global_step, state.epoch)
                objective.on_step_begin(state.global_step)
                step_loss = torch.zeros((), device=accelerator.device)
                step_logs: dict[str, torch.Tensor] = {}
                ids: list[str] = []
                for i, batch in enumerate(batches):
                    ids += batch.pop("sample_ids", [])
                    state.tokens_seen += int(batch.pop("num_tokens"))
                    state.supervised_tokens_seen += int(counts[i])
                    faults.in_step(step, i == len(batches) - 1)
                    # forward, loss, backward (gradients are synchronised on the last micro-batch only)
                    sync = accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
                    with sync:
                        output = objective.loss(model, batch)
                        loss = output.loss
                        if faults.nan_loss(step):
                            loss = loss * float("nan")
                        objective.before_backward(output, scale)
                        objective.backward(loss * scale, accelerator)
                    step_loss += loss.detach().float()
                    for key, value in output.logs.items():
                        step_logs[key] = step_logs.get(key, 0.0) + value.detach().float()
                    # Let go of the micro-batch's graph before the next forward: held across it, the spent graph
                    # kept ~350 MB more resident on the demo (bench/train_speed.py, peak RSS).
                    del output, loss
                # clip
                grad_norm = (accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                             if cfg.max_grad_norm > 0 else None)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor over the ranks' shards
                    grad_norm = grad_norm.full_tensor()
                # the non-finite guard: one device sync per step; all ranks skip or stop together
                sample_log.write(step, epoch, ids)
                values = torch.stack([torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32,
                                                      device=accelerator.device).reshape(()), step_loss])
                flag = accelerator.reduce((~torch.isfinite(values)).any().float().reshape(1), reduction="sum")
                if flag.item():
                    last_ckpt = ckpt.latest_checkpoint(checkpoints)
                    nonfinite.bad_step(step, float(values[1]), float(values[0]), ids,
                                       str(last_ckpt) if last_ckpt else None)
                    optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
                else:
                    nonfinite.good_step()
                # step, schedule
                learning_rate = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step = step
                state.epoch = epoch + (min((update + 1) * ga, micro_per_epoch)) / micro_per_epoch
                extra_logs = objective.on_step_end(step)
                step_seconds.append(time.perf_counter() - step_start)
                progress.update(1)
                stop = step >= max_steps
                # log: the global token-mean loss of the steps since the last line
                window_losses.append(step_loss * (scale / world))
                if step == 1 or step % cfg.logging_steps == 0:
                    # one collective per log line, not per step
                    window = accelerator.reduce(torch.stack(window_losses), reduction="sum")
                    entry = {"step": step, "epoch": round(state.epoch, 4), "loss": float(window.mean()),
                             "learning_rate": learning_rate}
                    if grad_norm is not None:
                        entry["grad_norm"] = float(grad_norm)
                    for key, value in step_logs.items():
                        entry[key] = float(accelerator.reduce(value, reduction="sum") * (scale / world))
                    entry.update(extra_logs)
                    window_losses = []
                    state.log_history.append(_finite(entry))
                    events.write("step", **entry)
                    progress.set_postfix(loss=f"{entry['loss']:.4g}", lr=f"{learning_rate:.3g}", refresh=False)
                # evaluate: dev loss and metric; early stopping watches the metric
                should_save = step % save_steps == 0 or stop
                if evaluate and (step % cfg.eval_steps == 0 or stop):
                    eval_start = time.perf_counter()
                    metrics = dev_evaluation()
                    seconds = time.perf_counter() - eval_start
                    eval_seconds += seconds
                    value = metrics[metric_name]
                    if improved(value):
                        state.best_metric, state.best_step, state.patience_used = value, step, 0
                        should_save = True  # the best step's weights are restored at the end: keep them
                    else:
                        state.patience_used += 1
                        if 0 < cfg.early_stopping_patience <= state.patience_used and step >= cfg.min_steps:
                            stop = True
                    entry = {"step": step, "epoch": round(state.epoch, 4),
                             **{f"eval_{k}": v for k, v in metrics.items()}, "eval_runtime": round(seconds, 3)}
                    state.log_history.append(_finite(entry))
                    events.write("eval", **entry)
                # save; SIGTERM: every rank stops at the same step, after a checkpoint
                if preemption.should_stop(accelerator) and step < max_steps:
                    should_save, stop = True, True
                    preemption.stopped_at = step
                if should_save:
                    path = saver.save(model, tokenizer, optimizer, scheduler, objective, state,
                                      {"data_seed": cfg.seed, "micro_batches_done": step * ga,
                                       "nonfinite_skipped": nonfinite.skipped})
                    events.write("checkpoint", step=step, path=str(path))
                if stop:
                    break
    finally:
        preemption.uninstall()
        sample_log.close()
        progress.close()
    seconds = time.perf_counter() - start
    # The in-memory model is then the fp32 one that is evaluated, merged and quantized by the export.
    disable_qat(unwrapped)
    adapter_dir = run_dir / "adapter"
    if preemption.stopped_at is not None:
        events.write("stage", stage="train", status="preempted", step=preemption.stopped_at)
        events.close()
        return TrainResult(adapter_dir, {"stage": "train", "preempted_at_step": preemption.stopped_at}, unwrapped,
                           preempted_checkpoint=ckpt.latest_checkpoint(checkpoints), main_process=main)
    if evaluate and state.best_step is not None:
        # Keep the best dev step's weights (its checkpoint is protected from rotation).
        best = checkpoints / f"checkpoint-{state.best_step}"
        if accelerator.is_fsdp2:
            ckpt.load_sharded(unwrapped, best)
        else:
            method.restore(unwrapped, best, trainable=False)
    method.on_train_end(unwrapped, method_options)
    objective.on_train_end(unwrapped, adapter_dir)

    # --- save ---
    steps_done = state.global_step - (ckpt.step_of(resume_from) if resume_from else 0)
    step_time = max(seconds - eval_seconds, 1e-9)  # throughput counts optimizer work only
    losses = [e["loss"] for e in state.log_history if e.get("loss") is not None]
    summary = {
        "stage": "train",
        "base_model": str(model_path),
        "method": cfg.method,
        "objective": cfg.objective,
        "objective_summary": objective.summary(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "learning_rate": cfg.resolved_learning_rate(),
        "learning_rate_from": cfg.learning_rate_source()[1],
        "optimizer_steps": state.global_step,
        "max_steps": max_steps,
        "max_steps_from": ("train.max_steps" if cfg.max_steps > 0 else "train.min_steps"
                           if cfg.min_steps > math.ceil(cfg.epochs * steps_per_epoch) else "train.epochs"),
        "epochs": round(state.epoch, 3),
        "world_size": world,
        "train_seconds": round(seconds, 2),
        "dev_eval_seconds": round(eval_seconds, 2),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "tokens": state.tokens_seen,
        "supervised_tokens": state.supervised_tokens_seen,
        # This process's own work: a resumed run counts from its checkpoint on.
        "tokens_per_second": round((state.tokens_seen - tokens_before) / step_time, 2),
        "supervised_tokens_per_second": round((state.supervised_tokens_seen - supervised_before) / step_time, 2),
        "steps_this_run": steps_done,
        "packing": cfg.packs,
        "padding_fraction": round(collator.padding_fraction, 4),
        "fused_lora_layers": fused,
        "qat": {"scheme": qat.scheme, "group_size": qat.group_size, "layers": qat_layers} if qat else None,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "step_seconds": [round(t, 4) for t in step_seconds],
        "best_metric": {cfg.metric if chat_dev else "loss": state.best_metric} if evaluate else None,
        "best_checkpoint": str(checkpoints / f"checkpoint-{state.best_step}") if state.best_step else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "parent": parent,
        "nonfinite_skipped": len(nonfinite.skipped),
        "nonfinite_steps": nonfinite.skipped,
        "log_history": state.log_history,
        "provenance": provenance(recipe),
    }
    # Under FSDP2 every rank holds a shard: the adapter saved is the gathered whole (a collective).
    weights = ckpt.gathered_state(model)[0] if accelerator.is_fsdp2 else None
    if main:
        unwrapped.save_pretrained(adapter_dir, state_dict=weights)
        tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "dstune_train.json").write_text(json.dumps(summary, indent=2))
    events.write("stage", stage="train", status="done", steps=state.global_step, best_step=state.best_step,
                 adapter=str(adapter_dir))
    events.close()
    accelerator.wait_for_everyone()
    return TrainResult(adapter_dir, summary, unwrapped, main_process=main)
