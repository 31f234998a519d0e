"""`continual`: supervised cross-entropy plus controls against forgetting, for a model tuned in stages.

    train:
      objective: continual
      init_adapter: runs/stage1/adapter      # EWC's anchor: the stage before
      continual:
        kl: {weight: 1.0}                      # KL anchor to the base model on general text
        ewc: {weight: 100.0}                   # elastic weight consolidation on the adapter
        orthogonal: {previous: runs/stage1/adapter, weight: 1.0}   # O-LoRA: grow the adapter orthogonally

Each control is off until configured, and any can be combined except EWC with O-LoRA (both protect the earlier
adapter's weights; O-LoRA freezes them outright). Every term is a per-token mean scaled by `weight`, added to the
step's token-mean cross-entropy.

- **KL anchor** (LwF / KL-anchor): on general records and prose (by default the replay part of the shipped general
  set, never the tier-1 test part), KL(reference || model) of the next-token distributions, with the reference's
  top-k log-probabilities computed once (dstune.train.logit_cache). The reference is the base model (adapter off)
  or the starting model (`reference: start`, the adapter of train.init_adapter). One anchor batch every `every`
  micro-batches (the term scaled by `every`).
- **EWC** (Kirkpatrick et al. 2017, online as Schwarz et al. 2018): (weight / 2) * sum F * (theta - theta*)^2 over
  the adapter's trainable parameters, theta* the starting adapter. F is the *empirical* Fisher: squared gradients of
  each sample's token-mean log-likelihood of its own labels (not of tokens sampled from the model), averaged over
  `samples` training records at the end of a stage, and written beside the adapter (`ewc_fisher.safetensors`).
  Stages accumulate it: F = decay * F_parent + F_this_stage.
- **O-LoRA** (Wang et al. 2023): the earlier adapter's LoRA is frozen and a new rank-r block is trained beside it;
  the loss keeps the new A orthogonal to the earlier A, normalised per layer to [0, 1]:
  ||A_prev A_new^T||_F^2 / (||A_prev||_F^2 ||A_new||_F^2), averaged over layers, so one weight suits every stage.
  The saved adapter is one standard LoRA with the ranks concatenated (the earlier B rescaled so that its product is
  unchanged): merge, export and serve take it as they take any LoRA.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ...config import StrictModel
from ...errors import InputError
from ...plugins import OBJECTIVES
from ..loss import supervised_lm_loss
from .base import LossOutput, Objective

FISHER_FILE = "ewc_fisher.safetensors"


class KLAnchorOptions(StrictModel):
    """train.continual.kl: the KL anchor on general text."""

    # The term's weight (0: off). The term is the mean KL per anchor token, in nats.
    weight: float = Field(0.0, ge=0.0)
    # base: the model without its adapter; start: the model as the run starts (train.init_adapter's adapter).
    reference: Literal["base", "start"] = "base"
    # A file or folder of records (messages or text); None: the replay part of the shipped general set.
    file: str | None = None
    # Plain prose, cut into windows of max_length tokens; None: the shipped anchor prose; "": none.
    text_file: str | None = None
    # How many of the reference's most likely tokens are kept per position (the rest is one bucket).
    top_k: int = Field(32, ge=1)
    # Anchor sequences per anchored micro-batch.
    batch_size: int = Field(4, ge=1)
    # Anchor every n-th training micro-batch, with the term scaled by n (the same weight on average, 1/n the cost).
    every: int = Field(1, ge=1)
    # None: data.max_length.
    max_length: int | None = Field(None, ge=2)


class EWCOptions(StrictModel):
    """train.continual.ewc: elastic weight consolidation on the adapter."""

    # lambda (0: off). With weight > 0 the run also writes its Fisher beside the adapter for the next stage.
    weight: float = Field(0.0, ge=0.0)
    # Training records whose squared gradients estimate the Fisher at the end of the stage.
    samples: int = Field(64, ge=1)
    # Online EWC: the parent's Fisher is multiplied by this before this stage's is added.
    decay: float = Field(1.0, ge=0.0, le=1.0)


class OrthogonalOptions(StrictModel):
    """train.continual.orthogonal: O-LoRA, a new LoRA block orthogonal to an earlier adapter's."""

    # The earlier LoRA adapter folder (frozen); None: off.
    previous: str | None = None
    # The weight of the normalised orthogonality term (in [0, 1] per layer).
    weight: float = Field(1.0, ge=0.0)


class ContinualOptions(StrictModel):
    """train.continual: controls against forgetting; see dstune.train.objectives.continual."""

    kl: KLAnchorOptions = KLAnchorOptions()
    ewc: EWCOptions = EWCOptions()
    orthogonal: OrthogonalOptions = OrthogonalOptions()

    @model_validator(mode="after")
    def _combinable(self):
        if self.ewc.weight > 0 and self.orthogonal.previous:
            raise ValueError("ewc and orthogonal both protect the earlier adapter (O-LoRA freezes it): choose one")
        for key, value in (("kl.file", self.kl.file), ("kl.text_file", self.kl.text_file),
                           ("orthogonal.previous", self.orthogonal.previous)):
            if value and not Path(value).exists():
                raise ValueError(f"{key}: {value} not found")
        return self


@OBJECTIVES.register("continual")
class Continual(Objective):
    """Cross-entropy on the task plus a KL anchor, EWC and/or O-LoRA (each off until configured)."""

    options = ContinualOptions

    @classmethod
    def check(cls, options, recipe):
        from ...tuners.methods import check_adapter_dir

        if options.orthogonal.previous:
            if recipe.train.method != "lora":
                raise InputError(f"train.continual.orthogonal: O-LoRA grows a LoRA adapter; train.method is "
                                 f"{recipe.train.method}")
            try:
                check_adapter_dir(Path(options.orthogonal.previous))
            except InputError as exc:
                raise InputError(f"train.continual.orthogonal.previous: {exc}") from None
        if options.ewc.weight > 0 and recipe.train.init_adapter:
            if not (Path(recipe.train.init_adapter) / FISHER_FILE).is_file():
                raise InputError(f"train.continual.ewc: {recipe.train.init_adapter} (train.init_adapter) has no "
                                 f"{FISHER_FILE}; train that stage with train.continual.ewc.weight > 0, which "
                                 "writes it")
        if options.kl.reference == "start" and not recipe.train.init_adapter and options.kl.weight > 0:
            raise InputError("train.continual.kl.reference: start anchors to train.init_adapter's model; set "
                             "train.init_adapter, or use reference: base")

    def setup(self):
        recipe, model = self.context.recipe, self.context.model
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.anchor = self._anchor_logits() if self.config.kl.weight > 0 else None
        self.cursor = 0  # anchor sequences used so far
        self.micro_batches = 0  # training micro-batches so far
        self.ewc = self._ewc_parent() if self.config.ewc.weight > 0 and recipe.train.init_adapter else None
        self.frozen: list[tuple[torch.nn.Parameter, torch.Tensor, int, int]] = []
        self.blocks: list[tuple[torch.nn.Parameter, int]] = []
        self.previous = None
        if self.config.orthogonal.previous:
            self._grow_orthogonally(Path(self.config.orthogonal.previous))

    # ------------------------------------------------------------------ the loss
    def loss(self, model, batch):
        loss, count = supervised_lm_loss(model, batch)
        if not model.training:  # the dev loss is the task's own
            return LossOutput(loss)
        logs = {}
        self.micro_batches += 1
        if self.anchor is not None and (self.micro_batches - 1) % self.config.kl.every == 0:
            kl = self.anchor_kl(model) * self.config.kl.weight
            loss, logs["kl_anchor"] = loss + kl * count * self.config.kl.every, kl.detach() * count
        if self.ewc is not None:
            penalty = self.ewc_penalty() * self.config.ewc.weight / 2
            loss, logs["ewc"] = loss + penalty * count, penalty.detach() * count
        if self.blocks:
            ortho = self.orthogonality() * self.config.orthogonal.weight
            loss, logs["orthogonality"] = loss + ortho * count, ortho.detach() * count
        return LossOutput(loss, logs)

    def anchor_kl(self, model) -> torch.Tensor:
        """The mean KL per token of the next anchor batch (the order is a seeded shuffle, one pass per epoch)."""
        from ..logit_cache import topk_kl

        n = len(self.anchor.samples)
        rows = [self._order(position // n)[position % n]
                for position in range(self.cursor, self.cursor + min(self.config.kl.batch_size, n))]
        self.cursor += len(rows)
        inputs, ref_logprobs, ref_indices = self.anchor.batch(rows, self.context.tokenizer.pad_token_id)
        device = self.context.accelerator.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = model(**inputs).logits
        mask = inputs["attention_mask"].float()
        return topk_kl(logits, ref_logprobs.to(device), ref_indices.to(device), mask) / mask.sum()

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_order_epoch", None) != epoch:
            order = list(range(len(self.anchor.samples)))
            random.Random(f"{self.context.recipe.train.seed}-{epoch}").shuffle(order)
            self._order_epoch, self._order_cached = epoch, order
        return self._order_cached

    def ewc_penalty(self) -> torch.Tensor:
        """sum F * (theta - theta*)^2 over the adapter's trainable parameters (without the 1/2 and the weight)."""
        fisher, anchor = self.ewc
        return sum(((p - anchor[n].to(p)) ** 2 * fisher[n].to(p)).sum() for n, p in self.trainable)

    def orthogonality(self) -> torch.Tensor:
        """Mean over layers of ||A_prev A_new^T||_F^2 / (||A_prev||_F^2 ||A_new||_F^2)."""
        total = 0.0
        for weight, r_prev in self.blocks:
            total = total + orthogonality(weight[:r_prev], weight[r_prev:])
        return total / len(self.blocks)

    # ------------------------------------------------------------------ hooks
    def on_step_end(self, step):
        with torch.no_grad():  # the earlier block stays exactly as it was (weight decay would move it)
            for param, saved, dim, r_prev in self.frozen:
                param.narrow(dim, 0, r_prev).copy_(saved)
        return {}

    def on_train_end(self, model, adapter_dir: Path) -> None:
        if self.config.ewc.weight <= 0:
            return
        fisher = self.empirical_fisher(model)
        if self.ewc is not None:
            fisher = {n: self.config.ewc.decay * self.ewc[0][n] + f for n, f in fisher.items()}
        if self.context.accelerator.is_main_process:
            from safetensors.torch import save_file

            tensors = {f"fisher.{n}": f.contiguous() for n, f in fisher.items()}
            tensors.update({f"anchor.{n}": p.detach().float().cpu().contiguous() for n, p in self.trainable})
            adapter_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(adapter_dir / FISHER_FILE),
                      metadata={"kind": "empirical", "samples": str(self.config.ewc.samples)})

    def summary(self) -> dict:
        out = {}
        if self.anchor is not None:
            out["kl_anchor"] = {"reference": self.config.kl.reference, "sequences": len(self.anchor.samples),
                                "tokens": sum(len(s) for s in self.anchor.samples), "top_k": self.config.kl.top_k}
        if self.config.ewc.weight > 0:
            out["ewc"] = {"fisher": "empirical", "samples": self.config.ewc.samples,
                          "from_parent": self.ewc is not None}
        if self.previous:
            out["orthogonal"] = self.previous
        return out

    def state_dict(self):
        return {"cursor": self.cursor, "micro_batches": self.micro_batches}

    def load_state_dict(self, state):
        self.cursor, self.micro_batches = int(state["cursor"]), int(state["micro_batches"])

    # ------------------------------------------------------------------ setup helpers
    def _anchor_logits(self):
        """The reference's top-k on the anchor records and prose (base: adapter off; start: as loaded)."""
        from ...data.build import GENERAL_SET, GENERAL_TEXT
        from ...data.formats import read_samples
        from ...data.templates import get_template
        from ..logit_cache import TopKLogits
        from ...data.tokenize import encode_record

        options, recipe, tokenizer = self.config.kl, self.context.recipe, self.context.tokenizer
        max_length = options.max_length or recipe.data.max_length
        template = get_template(recipe.model.template, tokenizer)
        # Whole sequences, prompt and answer: the anchor is the next-token distribution everywhere, and a record
        # cut by max_length still anchors its first tokens.
        samples = [encode_record(tokenizer, template, r, max_length).input_ids
                   for r in read_samples(options.file or GENERAL_SET)]
        text_file = GENERAL_TEXT if options.text_file is None else options.text_file
        if text_file:
            text = Path(text_file).read_text(encoding="utf-8")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            samples += [ids[i:i + max_length] for i in range(0, len(ids) - 1, max_length)]
        samples = [s for s in samples if len(s) >= 2]
        if not samples:
            raise InputError("train.continual.kl: the anchor data has no sequence of 2 tokens or more")
        model = self.context.model
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with model.disable_adapter() if options.reference == "base" else contextlib.nullcontext():
            return TopKLogits.compute(model, samples, options.top_k, 8, pad, progress="kl anchor")

    def _ewc_parent(self) -> tuple[dict, dict]:
        """The parent's accumulated Fisher and its weights (theta*), by parameter name."""
        from safetensors.torch import load_file

        path = Path(self.context.recipe.train.init_adapter) / FISHER_FILE
        if not path.is_file():
            raise InputError(f"train.continual.ewc: {path.parent} has no {FISHER_FILE}; train that stage with "
                             "train.continual.ewc.weight > 0, which writes it")
        saved = load_file(str(path))
        fisher = {k[len("fisher."):]: v for k, v in saved.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor."):]: v for k, v in saved.items() if k.startswith("anchor.")}
        missing = [n for n, _ in self.trainable if n not in fisher or n not in anchor]
        if missing:
            raise InputError(f"train.continual.ewc: {path} has no Fisher for {missing[0]} ({len(missing)} missing); "
                             "the stages need the same method, rank and targets")
        return fisher, anchor

    def _grow_orthogonally(self, path: Path) -> None:
        """Put the earlier adapter's LoRA (frozen) before this run's fresh block, in every adapted layer."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import load_peft_weights

        model = self.context.model
        config = model.peft_config[model.active_adapter]
        saved = json.loads((path / "adapter_config.json").read_text())
        if getattr(config, "peft_type", None) != "LORA" or saved.get("peft_type") != "LORA" or config.use_dora:
            raise InputError("train.continual.orthogonal: O-LoRA needs train.method lora and a LoRA adapter in "
                             f"{path} (DoRA and other methods are not supported)")
        if config.rank_pattern or config.alpha_pattern or saved.get("rank_pattern") or saved.get("alpha_pattern"):
            raise InputError("train.continual.orthogonal: per-layer rank or alpha patterns are not supported")
        weights = load_peft_weights(str(path), device="cpu")
        name = model.active_adapter
        r_prev, alpha_prev = saved["r"], saved["lora_alpha"]
        r_new, alpha = config.r, config.lora_alpha
        rs = config.use_rslora
        if bool(saved.get("use_rslora")) != rs:
            raise InputError("train.continual.orthogonal: use_rslora differs from the earlier adapter's")
        r_total = r_prev + r_new
        # The new block keeps the recipe's own scaling; the earlier B is rescaled to keep its product unchanged.
        scale_new = alpha / (math.sqrt(r_new) if rs else r_new)
        scale_prev = alpha_prev / (math.sqrt(r_prev) if rs else r_prev)
        alpha_total = scale_new * (math.sqrt(r_total) if rs else r_total)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        used = set()
        for module_name, layer in layers:
            key_a, key_b = f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"
            if key_a not in weights or key_b not in weights:
                raise InputError(f"train.continual.orthogonal: {path} has no LoRA for {module_name}; the stages "
                                 "need the same train.lora.targets")
            used.update((key_a, key_b))
            a, b = layer.lora_A[name], layer.lora_B[name]
            prev_a = weights[key_a].to(a.weight)
            prev_b = (weights[key_b] * (scale_prev / scale_new)).to(b.weight)
            a.weight = torch.nn.Parameter(torch.cat([prev_a, a.weight.detach()], dim=0))
            b.weight = torch.nn.Parameter(torch.cat([prev_b, b.weight.detach()], dim=1))
            a.out_features = b.in_features = r_total
            layer.r[name], layer.lora_alpha[name], layer.scaling[name] = r_total, alpha_total, scale_new
            self.frozen += [(a.weight, prev_a.clone(), 0, r_prev), (b.weight, prev_b.clone(), 1, r_prev)]
            self.blocks.append((a.weight, r_prev))
            for param, dim in ((a.weight, 0), (b.weight, 1)):
                param.register_hook(_zero_first(dim, r_prev))
        extra = sorted(k for k in weights if k not in used)
        if extra:
            raise InputError(f"train.continual.orthogonal: {path} adapts {extra[0]}, which this recipe's "
                             "train.lora.targets do not; the stages need the same targets")
        config.r, config.lora_alpha = r_total, alpha_total
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        from ..init_adapter import parent_record

        self.previous = {**parent_record(path), "rank": r_prev, "new_rank": r_new}

    def empirical_fisher(self, model) -> dict[str, torch.Tensor]:
        """Mean over `samples` training records of the squared gradient of each one's token-mean log-likelihood."""
        from tqdm.auto import tqdm

        samples = self.context.train_set
        picked = random.Random(self.context.recipe.train.seed).sample(range(len(samples)),
                                                                     min(self.config.ewc.samples, len(samples)))
        device = self.context.accelerator.device
        params = [p for _, p in self.trainable]
        fisher = [torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in params]
        was_training = model.training
        model.eval()
        try:
            for index in tqdm(picked, desc="ewc fisher", unit="sample"):
                sample = samples[index]
                ids = torch.as_tensor([sample["input_ids"]], device=device)
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "labels": torch.as_tensor([sample["labels"]], device=device)}
                loss, count = supervised_lm_loss(model, batch)
                if int(count) == 0:
                    continue
                grads = torch.autograd.grad(loss / count, params, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.detach().float().cpu() ** 2
        finally:
            model.train(was_training)
        return {n: f / len(picked) for (n, _), f in zip(self.trainable, fisher)}


def orthogonality(a_prev: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """||A_prev A_new^T||_F^2 / (||A_prev||_F^2 ||A_new||_F^2), in [0, 1]; 0 when the row spaces are orthogonal."""
    cross = (a_prev.float() @ a_new.float().t()).pow(2).sum()
    return cross / (a_prev.float().pow(2).sum() * a_new.float().pow(2).sum()).clamp(min=1e-30)


def _zero_first(dim: int, count: int):
    """A gradient hook that zeroes the first `count` rows (dim 0) or columns (dim 1): the frozen earlier block."""
    def hook(grad):
        grad = grad.clone()
        grad.narrow(dim, 0, count).zero_()
        return grad
    return hook
