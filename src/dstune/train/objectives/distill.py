"""`kd`: knowledge distillation from a frozen teacher (Hinton et al. 2015), on the supervised tokens.

    train:
      objective: kd
      kd: {teacher: runs/icd10_lora/merged, alpha: 0.5, temperature: 2.0}

The loss per supervised token is (1 − α)·CE(student, label) + α·T²·KL(p_T ‖ p_S), where p_T and p_S are the
teacher's and the student's next-token distributions at temperature T. The T² keeps the soft term's gradient on
the scale of the hard one's as T grows (the gradient of KL at temperature T carries a 1/T).

The teacher runs online, frozen, in the same forward layout as the student (packed rows included). Both heads run
only on the supervised positions and the KL is taken a chunk of rows at a time (`linear_kd`), as the cross-entropy
is, so the student's [tokens, vocabulary] logits never exist at once. Teacher and student must share the tokenizer:
a different vocabulary is a one-line error before any model loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ...config import StrictModel
from ...errors import InputError
from ...plugins import OBJECTIVES
from ..loss import (CHUNK_BYTES, accumulate_head_gradients, linear_cross_entropy, output_head,
                    scaled_head_gradients, supervised_hidden)
from .base import LossOutput, Objective


class DistillOptions(StrictModel):
    """train.kd: the teacher and the mix of the hard and soft terms."""

    # The teacher: an HF directory (e.g. the tuned model's merged directory) with the student's tokenizer.
    teacher: str = ""
    # Weight of the soft (KD) term; 1 − alpha goes to the cross-entropy on the labels.
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    # Softmax temperature of both distributions in the soft term (the seed's T = 2).
    temperature: float = Field(2.0, gt=0.0)


class LinearKD(torch.autograd.Function):
    """Σ_rows T²·KL(softmax(t/T) ‖ softmax(h·Wᵀ/T)), the teacher's logits t = h_T·W_Tᵀ, computed and differentiated
    a chunk of rows at a time for both heads (the gradient with respect to the student's logits is T·(q − p))."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, temperature: float, chunk: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        precision = torch.promote_types(hidden.dtype, torch.float32)  # at least float32 (bf16 training)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=precision, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=precision, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            student = torch.log_softmax((h @ weight.t()).to(precision) / temperature, dim=-1)
            teacher_logits = teacher_hidden[start:start + chunk] @ teacher_weight.t()
            teacher = torch.log_softmax(teacher_logits.to(precision) / temperature, dim=-1)
            p = teacher.exp()
            total += temperature ** 2 * (p * (teacher - student)).sum()
            if want_hidden or want_weight:
                dlogits = (temperature * (student.exp() - p)).to(h.dtype)
                accumulate_head_gradients(dlogits, h, weight, grad_hidden, grad_weight, start)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return (*scaled_head_gradients(ctx, grad_total), None, None, None, None)


def linear_kd(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
              temperature: float, chunk: int | None = None) -> torch.Tensor:
    """The summed T²-scaled KL of the student's head on `hidden` [rows, d] from the teacher's head on its own
    hidden states [rows, d_T] (the teacher is frozen: no gradient reaches it)."""
    chunk = chunk or max(1, CHUNK_BYTES // (8 * weight.shape[0]))  # two chunks of logits live at once
    return LinearKD.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), temperature, chunk)


def _vocabulary(path: str, trust_remote_code: bool) -> tuple[int, dict]:
    from transformers import AutoConfig

    from ...models.loading import load_tokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "vocab_size", None), load_tokenizer(Path(path), trust_remote_code).get_vocab()


@OBJECTIVES.register("kd")
class Distill(Objective):
    """(1 − α)·cross-entropy on the labels + α·T²·KL from a frozen teacher, on the supervised tokens."""

    options = DistillOptions

    @classmethod
    def check(cls, options, recipe):
        from ...models.loading import resolve_model_path

        if not options.teacher:
            raise InputError("train.kd.teacher: name the teacher's HF directory (e.g. runs/<name>/merged)")
        if not (Path(options.teacher) / "config.json").is_file():
            raise InputError(f"train.kd.teacher: {options.teacher} is not an HF model directory (no config.json)")
        trust = recipe.model.trust_remote_code
        teacher_size, teacher_vocab = _vocabulary(options.teacher, trust)
        student_size, student_vocab = _vocabulary(str(resolve_model_path(recipe.model.name_or_path)), trust)
        if teacher_size != student_size or teacher_vocab != student_vocab:
            differ = sum(teacher_vocab.get(t) != i for t, i in student_vocab.items())
            raise InputError(f"train.kd.teacher: {options.teacher} has another vocabulary than the student "
                             f"{recipe.model.name_or_path} ({teacher_size} against {student_size} logits, {differ} "
                             "tokens mapped differently); distillation compares distributions token by token, so "
                             "both need the same tokenizer")

    def setup(self):
        from ...models.loading import load_model

        recipe = self.context.recipe
        self.teacher = load_model(self.config.teacher, recipe.model.dtype, recipe.model.trust_remote_code, False)
        self.teacher.requires_grad_(False)
        self.teacher.eval().to(self.context.accelerator.device)
        self.teacher_head = output_head(self.teacher)
        if self.teacher_head is None or output_head(self.context.model) is None:
            raise InputError("train.kd: the teacher and the student need a plain LM head (lm_head of the final "
                             "hidden state), as Llama, Qwen2/3 and DeepSeek have")

    def loss(self, model, batch):
        rows, targets = supervised_hidden(model, batch)
        head = output_head(model)
        ce = linear_cross_entropy(rows, head.weight, targets)
        if not model.training or self.config.alpha == 0:  # the dev loss is the task's own
            return LossOutput(ce)
        with torch.no_grad():
            taught, _ = supervised_hidden(self.teacher, batch)
        kd = linear_kd(rows, head.weight, taught, self.teacher_head.weight, self.config.temperature)
        alpha = self.config.alpha
        return LossOutput((1 - alpha) * ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach()})

    def summary(self):
        return {"teacher": self.config.teacher, "alpha": self.config.alpha, "temperature": self.config.temperature}
