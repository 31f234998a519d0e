"""Offline top-k next-token distributions of a frozen model: the KL anchor's reference (and a teacher's, later).

A reference model's full distribution over a 50k-150k vocabulary at every position would be gigabytes; its k most
likely tokens carry nearly all the mass. `TopKLogits` keeps, per position, the k largest log-probabilities and their
token ids, computed once in eval mode, and saved as safetensors.

`topk_kl` compares a model to it over the k + 1 buckets "each of the top k tokens, and all the others": the exact KL
divergence of those coarsened distributions, so it is 0 when the model equals the reference and never negative, and
a lower bound of the full KL (coarsening cannot raise a divergence).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_TINY = 1e-12


def pad_batch(samples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids and attention mask of token lists (positions count from 0 in every row)."""
    width = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, ids in enumerate(samples):
        input_ids[row, :len(ids)] = torch.as_tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class TopKLogits:
    """Per sample: `logprobs` [tokens, k] (float32, descending) and `indices` [tokens, k] of the reference."""

    samples: list[list[int]]
    logprobs: list[torch.Tensor]
    indices: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def compute(cls, model, samples: list[list[int]], k: int, batch_size: int, pad_token_id: int,
                progress: str | None = None) -> TopKLogits:
        """Run `model` (as it is now, in eval mode) over token lists and keep each position's top k."""
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        logprobs, indices = [], []
        device = next(model.parameters()).device
        try:
            for start in tqdm(range(0, len(samples), batch_size), desc=progress, disable=progress is None,
                              unit="batch"):
                chunk = samples[start:start + batch_size]
                batch = {key: v.to(device) for key, v in pad_batch(chunk, pad_token_id).items()}
                logits = model(**batch).logits.float()
                values, ids = F.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
                for row, tokens in enumerate(chunk):
                    logprobs.append(values[row, :len(tokens)].cpu())
                    indices.append(ids[row, :len(tokens)].to(torch.int32).cpu())
        finally:
            model.train(was_training)
        return cls([list(s) for s in samples], logprobs, indices)

    def save(self, path: Path, meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for i, (tokens, values, ids) in enumerate(zip(self.samples, self.logprobs, self.indices)):
            tensors[f"{i}.tokens"] = torch.as_tensor(tokens, dtype=torch.int32)
            tensors[f"{i}.logprobs"] = values.contiguous()
            tensors[f"{i}.indices"] = ids.contiguous()
        save_file(tensors, str(path), metadata=meta or {})

    @classmethod
    def load(cls, path: Path) -> tuple[TopKLogits, dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            count = len({key.split(".")[0] for key in f.keys()})
            samples = [f.get_tensor(f"{i}.tokens").tolist() for i in range(count)]
            logprobs = [f.get_tensor(f"{i}.logprobs") for i in range(count)]
            indices = [f.get_tensor(f"{i}.indices").long() for i in range(count)]
        return cls(samples, logprobs, indices), meta

    def batch(self, rows: list[int], pad_token_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Model inputs of the given samples, and their reference top-k, right-padded (padding rows are masked)."""
        inputs = pad_batch([self.samples[r] for r in rows], pad_token_id)
        width, k = inputs["input_ids"].shape[1], self.logprobs[0].shape[1]
        logprobs = torch.zeros((len(rows), width, k))
        indices = torch.zeros((len(rows), width, k), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(self.samples[r])
            logprobs[i, :n], indices[i, :n] = self.logprobs[r], self.indices[r].long()
        return inputs, logprobs, indices


def topk_kl(logits: torch.Tensor, ref_logprobs: torch.Tensor, ref_indices: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Summed KL(reference || model) over the masked positions, on the top-k buckets plus one "other" bucket.

    logits [B, T, V] of the model; ref_logprobs and ref_indices [B, T, k]; mask [B, T] (1: a real position).
    """
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, ref_indices)
    ref_probs = ref_logprobs.exp()
    ref_tail = (1.0 - ref_probs.sum(-1)).clamp(min=_TINY)
    tail = (1.0 - logprobs.exp().sum(-1)).clamp(min=_TINY)
    per_position = (ref_probs * (ref_logprobs - logprobs)).sum(-1) + ref_tail * (ref_tail.log() - tail.log())
    return (per_position * mask).sum()
