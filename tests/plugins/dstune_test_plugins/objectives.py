"""Objective plugins that exercise every hook of the loop, each the seed of a real feature to come:

- `two_loss`: two task losses weighted by learnable task weights (GradNorm-like): before the backward it calls
  torch.autograd.grad on a named subset of shared parameters, and trains the weights in their own optimizer group;
- `curriculum`: a sampler whose order depends on the optimizer step (short samples first, then shuffled);
- `dp_noise`: per-sample gradient clipping in its own backward, and an optimizer wrapper that adds seeded Gaussian
  noise (DP-SGD's shape; the real one is Opacus);
- `distill`: supervised cross-entropy plus a KL term to a frozen second model (the teacher).

Each keeps what a resumed run needs in `state_dict`, so a SIGKILL and `--resume` give bit-identical weights.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from pydantic import Field

from dstune.config import StrictModel
from dstune.data.tokenize import IGNORE_INDEX
from dstune.train.loss import supervised_lm_loss, supervised_positions
from dstune.train.objectives import LossOutput, Objective


def _rows(batch: dict, rows) -> dict:
    """The sub-batch of the given rows (unpacked batches: one sample per row)."""
    return {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


class TwoLossOptions(StrictModel):
    """The recipe section train.two_loss."""

    # Parameters whose gradient norms balance the tasks (a regex on parameter names).
    shared: str = r"layers\.0\..*lora_A"
    weight_lr: float = 0.05


class TwoLoss(Objective):
    """Even and odd rows (unpacked batches: samples) are two tasks; learnable weights balance their gradient norms on the shared parameters."""

    options = TwoLossOptions

    def setup(self):
        self.raw = torch.nn.Parameter(torch.zeros(2))  # task weights w = 2 * softmax(raw), 1 and 1 at the start
        model = self.context.model
        self.shared = [p for n, p in model.named_parameters() if p.requires_grad and re.search(self.config.shared, n)]
        assert self.shared, f"no parameter matches {self.config.shared!r}"
        self.norms = torch.zeros(2)

    def parameter_groups(self):
        return [{"params": [self.raw], "lr": self.config.weight_lr, "weight_decay": 0.0}]

    def weights(self) -> torch.Tensor:
        return 2 * torch.softmax(self.raw, dim=0)

    def loss(self, model, batch):
        rows = torch.arange(batch["labels"].shape[0])
        parts = []
        for task in (0, 1):
            chosen = rows[rows % 2 == task]
            parts.append(supervised_lm_loss(model, _rows(batch, chosen))[0] if len(chosen) else
                         batch["labels"].new_zeros((), dtype=torch.float32))
        self.parts = parts
        weights = self.weights().detach()
        return LossOutput(weights[0] * parts[0] + weights[1] * parts[1], {"loss_a": parts[0], "loss_b": parts[1]})

    def before_backward(self, output, scale):
        norms = []
        for part in self.parts:
            if not part.requires_grad:
                norms.append(torch.zeros(()))
                continue
            grads = torch.autograd.grad(part * scale, self.shared, retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        norms = torch.stack(norms).detach()
        self.norms = self.norms + norms  # over the micro-batches of the step
        # GradNorm's balance: each weighted norm towards their mean; the gradient reaches the weights only.
        weighted = self.weights() * norms
        balance = (weighted - weighted.mean().detach()).abs().sum()
        (grad,) = torch.autograd.grad(balance, self.raw)
        self.raw.grad = grad if self.raw.grad is None else self.raw.grad + grad

    def on_step_begin(self, step):
        self.norms = torch.zeros(2)

    def on_step_end(self, step):
        weights = self.weights().detach()
        return {"weight_a": float(weights[0]), "weight_b": float(weights[1]),
                "shared_grad_norm_a": float(self.norms[0]), "shared_grad_norm_b": float(self.norms[1])}

    def state_dict(self):
        return {"raw": self.raw.detach().clone(), "norms": self.norms.clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.raw.copy_(state["raw"])
        self.norms = state["norms"].clone()


class StepOrder(torch.utils.data.Sampler):
    """Shortest samples first while `step < warm_steps`, then a shuffle seeded by the step the epoch starts at."""

    def __init__(self, lengths, warm_steps: int, seed: int):
        self.lengths = lengths
        self.warm_steps = warm_steps
        self.seed = seed
        self.step = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_step(self, step: int) -> None:
        self.step = step

    def __iter__(self):
        if self.step < self.warm_steps:
            return iter(sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i)))
        generator = torch.Generator().manual_seed(self.seed + self.step)
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())

    def __len__(self):
        return len(self.lengths)


class CurriculumOptions(StrictModel):
    """The recipe section train.curriculum."""

    warm_steps: int = Field(4, ge=0)


class Curriculum(Objective):
    """Supervised cross-entropy on a step-dependent order of samples."""

    options = CurriculumOptions

    def sampler(self, lengths, batch_size, seed):
        self.order = StepOrder(lengths, self.config.warm_steps, seed)
        return self.order

    def loss(self, model, batch):
        return LossOutput(supervised_lm_loss(model, batch)[0])


class NoisyOptimizer(torch.optim.Optimizer):
    """Adds N(0, (sigma * clip)^2) noise from its own seeded generator to every gradient, then steps the inner one."""

    def __init__(self, inner, sigma: float, clip: float, seed: int):  # noqa: D107 (no Optimizer.__init__: delegate)
        self.inner = inner
        self.sigma, self.clip = sigma, clip
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self):
        return self.inner.defaults

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    noise = torch.randn(p.grad.shape, generator=self.generator) * (self.sigma * self.clip)
                    p.grad.add_(noise.to(p.grad.device, p.grad.dtype))
        return self.inner.step(closure)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.generator.set_state(state["generator"])


class DpOptions(StrictModel):
    """The recipe section train.dp_noise."""

    clip: float = Field(0.5, gt=0)
    sigma: float = Field(0.1, ge=0)
    seed: int = 0


class DpNoise(Objective):
    """Per-sample clipped gradients (in its own backward) and seeded Gaussian noise (in an optimizer wrapper)."""

    options = DpOptions

    def wrap(self, model, optimizer, dataloader):
        self.optimizer = NoisyOptimizer(optimizer, self.config.sigma, self.config.clip, self.config.seed)
        self.params = [p for p in self.context.model.parameters() if p.requires_grad]
        self.clipped = 0
        return model, self.optimizer, dataloader

    def loss(self, model, batch):
        self.per_row = [supervised_lm_loss(model, _rows(batch, [row]))[0] for row in range(batch["labels"].shape[0])]
        return LossOutput(torch.stack(self.per_row).sum())

    def backward(self, loss, accelerator):
        scale = loss.detach() / torch.stack(self.per_row).sum().detach().clamp(min=1e-30)
        for row_loss in self.per_row:
            grads = torch.autograd.grad(row_loss * scale, self.params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
            factor = torch.clamp(self.config.clip / (norm + 1e-12), max=1.0)
            self.clipped += int(factor < 1.0)
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad = g * factor if p.grad is None else p.grad + g * factor

    def on_step_end(self, step):
        return {"clipped_samples": self.clipped}

    def state_dict(self):
        return {"clipped": self.clipped}

    def load_state_dict(self, state):
        self.clipped = state["clipped"]


class DistillOptions(StrictModel):
    """The recipe section train.distill."""

    # The frozen teacher: a local model folder; None: the recipe's base model.
    teacher: str | None = None
    alpha: float = Field(0.5, ge=0)
    temperature: float = Field(2.0, gt=0)


class Distill(Objective):
    """Cross-entropy plus alpha * T^2 * KL(teacher || student) on the supervised positions."""

    options = DistillOptions

    def setup(self):
        from dstune.models.loading import load_model, resolve_model_path

        recipe = self.context.recipe
        self.teacher = load_model(resolve_model_path(self.config.teacher or recipe.model.name_or_path),
                                  recipe.model.dtype)
        self.teacher.requires_grad_(False).eval()

    def loss(self, model, batch):
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        positions = supervised_positions(labels)
        student = model(**inputs, logits_to_keep=positions).logits.float()
        with torch.no_grad():
            teacher = self.teacher(**inputs, logits_to_keep=positions).logits.float()
        targets = labels[:, positions + 1]
        mask = targets != IGNORE_INDEX
        ce = F.cross_entropy(student[mask], targets[mask], reduction="sum")
        t = self.config.temperature
        kd = F.kl_div(F.log_softmax(student[mask] / t, -1), F.log_softmax(teacher[mask] / t, -1), log_target=True,
                      reduction="sum") * t * t
        return LossOutput(ce + self.config.alpha * kd, {"ce": ce, "kd": kd})
