"""InfoNCE / sampled softmax over L2-normalised vectors with shared uniform negatives."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_negatives(neg: torch.Tensor) -> torch.Tensor:
    """All-gather every worker's negatives (differentiably) so each position sees the whole pool."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return neg
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(neg), dim=0)


def sample_negatives(num_items: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` item ids drawn uniformly from 1..num_items (0 is padding)."""
    return torch.randint(1, num_items + 1, (count,), generator=generator)


def step_negatives(num_items: int, count: int, seed: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This worker's share of the step's negative pool. Every worker draws the same pool from
    (seed, step) and keeps every world-th id, so the all-gathered pool is the single-process pool
    (reordered), and a resumed run draws what the uninterrupted run drew."""
    pool = sample_negatives(num_items, count, torch.Generator().manual_seed(seed * 1_000_003 + step))
    return pool[rank::world]


class InfoNCE(nn.Module):
    """-log softmax of the positive among [positive, negatives], on cosine similarities.

    Temperature is fixed or a learnable CLIP-style logit scale (init 1/0.07, clamped to <= 100).
    Negatives whose cosine to the positive exceeds `mask_cosine` (the positive itself, or a
    near-duplicate item) are masked out. Positions where `valid` is False (padding) are ignored.
    """

    def __init__(self, temperature: float = 0.05, learnable: bool = False, mask_cosine: float = 0.99,
                 max_scale: float = 100.0) -> None:
        super().__init__()
        self.learnable = learnable
        self.max_scale = max_scale
        self.mask_cosine = mask_cosine
        init = math.log(1 / 0.07) if learnable else math.log(1 / temperature)
        self.log_scale = nn.Parameter(torch.tensor([init]), requires_grad=learnable)  # 1-d: DeepSpeed broadcasts bytes

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, out: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
        """out, pos: (N, d) predictions and positives; neg: (R, d) shared negatives; valid: (N,) bool.
        reduction: "mean" over valid positions, or "sum" (distributed training normalises globally)."""
        out, pos, neg = out[valid], pos[valid], neg
        if out.shape[0] == 0:
            return out.sum() * 0.0 + neg.sum() * 0.0
        out, pos, neg = F.normalize(out, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
        pos_logit = (out * pos).sum(-1, keepdim=True)
        neg_logits = out @ neg.T
        too_close = (pos @ neg.T).detach() > self.mask_cosine
        neg_logits = neg_logits.masked_fill(too_close, float("-inf"))
        logits = torch.cat([pos_logit, neg_logits], dim=1) * self.scale()
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device),
                               reduction=reduction)
