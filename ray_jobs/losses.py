"""The training loss: InfoNCE / sampled softmax over L2-normalised vectors (shared, per-position or
no negatives = full softmax), the step's negatives, and model + loss as one trainable module."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from jobs.schema import TrainSpec


def gather_negatives(neg: torch.Tensor) -> torch.Tensor:
    """All-gather every worker's negatives (differentiably) so each position sees the whole pool."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return neg
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(neg), dim=0)


def sample_negatives(universe: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` item ids drawn uniformly from `universe` (the sorted ids models train on: the k-core;
    when it is 1..n the draws are those of `randint(1, n + 1)`)."""
    return universe[torch.randint(0, len(universe), (count,), generator=generator)]


def step_negatives(universe: torch.Tensor, count: int, seed: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This worker's share of the step's negative pool. Every worker draws the same pool from
    (seed, step) and keeps every world-th id, so the all-gathered pool is the single-process pool
    (reordered), and a resumed run draws what the uninterrupted run drew."""
    pool = sample_negatives(universe, count, torch.Generator().manual_seed(seed * 1_000_003 + step))
    return pool[rank::world]


def position_negatives(universe: torch.Tensor, shape: tuple[int, ...], count: int, seed: int, step: int,
                       rank: int = 0) -> torch.Tensor:
    """(*shape, count) item ids, uniform over `universe`, drawn afresh for every position (the
    sampled softmax of generative-recommenders' SASRec). Seeded by (seed, step, rank), so a resumed
    run draws what the uninterrupted run drew."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return universe[torch.randint(0, len(universe), (*shape, count), generator=gen)]


@contextmanager
def fp32(device: torch.device):
    """Autocast off: what runs inside computes in float32 whatever the model's precision (bf16 under
    autocast or a DeepSpeed bf16 engine). The loss upcasts its vectors and keeps its logits, the
    softmax and the cross-entropy here: cosine logits times a scale of 20 (temperature 0.05) would
    keep about two significant digits in bf16."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class InfoNCE(nn.Module):
    """-log softmax of the positive among [positive, negatives], on cosine similarities, in float32
    (`fp32`) whatever precision the model runs in.

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
        with fp32(out.device):
            out, pos, neg = out[valid].float(), pos[valid].float(), neg.float()
            if out.shape[0] == 0:
                return out.sum() * 0.0 + neg.sum() * 0.0
            out, pos, neg = F.normalize(out, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
            pos_logit = (out * pos).sum(-1, keepdim=True)
            neg_logits = out @ neg.T
            too_close = (pos @ neg.T).detach() > self.mask_cosine
            neg_logits = neg_logits.masked_fill(too_close, float("-inf"))
            return self._cross_entropy(pos_logit, neg_logits, reduction)

    def _cross_entropy(self, pos_logit: torch.Tensor, neg_logits: torch.Tensor, reduction: str) -> torch.Tensor:
        logits = torch.cat([pos_logit, neg_logits], dim=1) * self.scale()
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device),
                               reduction=reduction)

    def per_position(self, out: torch.Tensor, pos_ids: torch.Tensor, table: torch.Tensor, neg_ids: torch.Tensor,
                     valid: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Every position against its own negatives. out: (N, d); pos_ids: (N,) target ids; table:
        (num_items + 1, d) every item's vector (row = id); neg_ids: (N, R) ids; valid: (N,) bool.

        Negatives equal to the target, or closer than `mask_cosine` to it, are masked. When the
        catalogue is smaller than R * d the logits against the whole table are one matmul and the
        negatives are gathered from it (cheaper and lighter than gathering (N, R, d) vectors)."""
        with fp32(out.device):
            return self._per_position(out[valid].float(), pos_ids[valid], table.float(), neg_ids[valid], reduction)

    def _per_position(self, out: torch.Tensor, pos_ids: torch.Tensor, table: torch.Tensor, neg_ids: torch.Tensor,
                      reduction: str) -> torch.Tensor:
        if out.shape[0] == 0:
            return out.sum() * 0.0 + table.sum() * 0.0
        out, table = F.normalize(out, dim=-1), F.normalize(table, dim=-1)
        pos = table[pos_ids]
        pos_logit = (out * pos).sum(-1, keepdim=True)
        if table.shape[0] <= neg_ids.shape[1] * table.shape[1]:
            neg_logits = (out @ table.T).gather(1, neg_ids)
            with torch.no_grad():
                close = (pos @ table.T).gather(1, neg_ids) > self.mask_cosine
        else:
            neg = table[neg_ids]
            neg_logits = torch.einsum("nd,nrd->nr", out, neg)
            with torch.no_grad():
                close = torch.einsum("nd,nrd->nr", pos, neg) > self.mask_cosine
        too_close = close | (neg_ids == pos_ids[:, None])
        return self._cross_entropy(pos_logit, neg_logits.masked_fill(too_close, float("-inf")), reduction)

    def full(self, out: torch.Tensor, pos_ids: torch.Tensor, table: torch.Tensor, valid: torch.Tensor,
             reduction: str = "mean", outside: torch.Tensor | None = None) -> torch.Tensor:
        """Full softmax: every position against the whole catalogue. table: (num_items + 1, d), row 0
        = padding (never a candidate), nor the items `outside` (a mask: not trained on) are; items
        closer than `mask_cosine` to the target are masked."""
        with fp32(out.device):
            out, pos_ids, table = out[valid].float(), pos_ids[valid], table.float()
            if out.shape[0] == 0:
                return out.sum() * 0.0 + table.sum() * 0.0
            out, table = F.normalize(out, dim=-1), F.normalize(table, dim=-1)
            logits = out @ table.T
            with torch.no_grad():
                blocked = (table[pos_ids] @ table.T) > self.mask_cosine
                blocked[:, 0] = True
                if outside is not None:
                    blocked |= outside
                blocked[torch.arange(len(pos_ids), device=pos_ids.device), pos_ids] = False
            return F.cross_entropy(logits.masked_fill(blocked, float("-inf")) * self.scale(), pos_ids,
                                   reduction=reduction)


def draw_negatives(t: TrainSpec, universe: torch.Tensor, targets: torch.Tensor, step: int, rank: int = 0,
                   world: int = 1) -> torch.Tensor:
    """The step's negatives for `sequence_loss`, drawn from `universe` (the training items): this
    worker's share of the shared pool (R,), or R per position (B, L, R) when
    `train.negative_sampling` is per_position, or nothing (full softmax)."""
    universe = universe.cpu()
    if t.negative_sampling == "full":
        return torch.empty(0, dtype=torch.long)
    if t.negative_sampling == "per_position":
        return position_negatives(universe, tuple(targets.shape), t.negatives, t.seed, step, rank)
    return step_negatives(universe, t.negatives, t.seed, step, rank, world)


def sequence_loss(model: nn.Module, loss_fn: InfoNCE, inputs: torch.Tensor, targets: torch.Tensor,
                  negatives: torch.Tensor, reduction: str = "mean", times: torch.Tensor | None = None,
                  outside: torch.Tensor | None = None) -> torch.Tensor:
    """Every non-padded position predicts its next item against the step's negatives (this worker's
    share of a shared pool, all-gathered when distributed; per-position ids; or none: full softmax).
    `times`: the inputs' timestamps and then the last target's (train_batches), for a model that
    reads them (HSTU's time bias)."""
    shared = negatives.dim() == 1 and negatives.numel() > 0
    with model.one_item_pass(*((inputs, targets, negatives) if shared else ())):  # else every item is scored
        out = model(inputs) if times is None else model(inputs, times)
        d = out.shape[-1]
        valid = (targets != 0).reshape(-1)
        if negatives.numel() == 0:
            return loss_fn.full(out.reshape(-1, d), targets.reshape(-1), model.all_item_embeddings(), valid, reduction,
                                outside)
        if negatives.dim() == 3:  # (B, L, R): per-position negatives against the whole item table
            return loss_fn.per_position(out.reshape(-1, d), targets.reshape(-1), model.all_item_embeddings(),
                                        negatives.reshape(-1, negatives.shape[-1]), valid, reduction)
        return loss_fn(out.reshape(-1, d), model.item_embeddings(targets).reshape(-1, d),
                       gather_negatives(model.item_embeddings(negatives)), valid, reduction)


class SequenceLoss(nn.Module):
    """Model and loss as one module, so an optimizer (or a DeepSpeed engine) owns every trained
    parameter, a learnable temperature included, and ZeRO-3 gathers them all inside one forward.
    `universe`: the sorted ids of the items trained on (negatives come from them; a full softmax
    ranks against them only); default every id of the model's catalogue."""

    def __init__(self, model: nn.Module, loss_fn: InfoNCE, universe: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        n = model.num_items
        universe = torch.arange(1, n + 1) if universe is None else universe.to(torch.long)
        outside = torch.ones(n + 1, dtype=torch.bool)
        outside[universe] = False
        self.register_buffer("universe", universe, persistent=False)
        self.register_buffer("outside", outside, persistent=False)
        self.restricted = bool(outside[1:].any())

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                reduction: str = "mean", times: torch.Tensor | None = None) -> torch.Tensor:
        return sequence_loss(self.model, self.loss_fn, inputs, targets, negatives, reduction, times,
                             self.outside if self.restricted else None)
