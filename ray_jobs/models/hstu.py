"""HSTU (Zhai et al., 2024, "Actions Speak Louder than Words"): item-ID embeddings + a stack of
Hierarchical Sequential Transduction Units.

Each unit: one projection of the layer-normed input, through SiLU, split into U, V, Q, K per head;
pointwise aggregated attention `SiLU(Q Kᵀ + rab) / n` (no softmax: every earlier position adds its
weight, so a user's activity level is not normalised away), causal and padding-masked, with a
learned relative attention bias `rab`: one weight per relative position and, with `time_buckets`,
one per bucket of the time gap between the two events (`time_bucket`: log-scaled seconds, as the
HSTU paper's ML-1M setup). Where position i measures its gaps from (`query_time`): its own event
(ts_i - ts_j), or the time of the event it predicts (ts_{i+1} - ts_j, generative-recommenders'
bias: in training the next event's timestamp, when scoring the time the recommendation is for).
U, V, Q, K are `attention_dim` wide per head (generative-recommenders' ML-1M configs: 50 on their
50-wide HSTU, 25 per head on HSTU-large's 2 heads); the attended values are layer-normed, gated
elementwise by U, projected back to the model width and added to the residual stream. Same interface as SASRec (`forward(ids) -> (B, L,
dim)`, item embeddings shared with the output side), so the same loss, loop and evaluator train
and score it, in one process and under Ray Train + DeepSpeed.

`block="original"` takes the remaining details of generative-recommenders' HSTU code: LayerNorms
without a learned scale and shift and none after the last unit, U/V/Q/K from one bias-free
projection initialised N(0, 0.02), relative biases initialised N(0, 0.02) rather than zero, and
absolute positions counted from the sequence's first item rather than from the window's right end.
(Their attention divides by the padded length, 211 on ML-1M, where ours divides by `max_len`: the
attended values are layer-normed next, which removes any constant factor, so that one is not a
difference.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jobs.schema import HSTUSpec
from ray_jobs.models.ids import IdSequenceModel, check_block


QUERY_TIMES = ("event", "target")


def time_bucket(queries: torch.Tensor, keys: torch.Tensor, buckets: int) -> torch.Tensor:
    """(B, L) query times and (B, L) key events' times, epoch seconds -> (B, L, L) bucket of the gap
    between query i and event j: floor(ln(max(|q_i - ts_j|, 1)) / 0.301), capped at buckets - 1 (same
    second -> 0, a minute -> 13, a day -> 37, a year -> 57)."""
    gap = (queries[:, :, None] - keys[:, None, :]).abs_().clamp_(min=1).double()
    return gap.log_().div_(0.301).long().clamp_(max=buckets - 1)


class HSTUBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, dropout: float, attn_dropout: float = 0.0,
                 time_buckets: int = 0, attention_dim: int = 0, original: bool = False) -> None:
        super().__init__()
        if dim % heads and not attention_dim:
            raise ValueError(f"model.dim={dim} must be a multiple of model.heads={heads} (or set model.attention_dim)")
        self.heads, self.head_dim, self.max_len = heads, attention_dim or dim // heads, max_len
        self.width = self.heads * self.head_dim  # of U, V, Q and K
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=not original)
        self.uvqk = nn.Linear(dim, 4 * self.width, bias=not original)
        self.attn_norm = nn.LayerNorm(self.width, eps=1e-6, elementwise_affine=not original)
        self.out = nn.Linear(self.width, dim)
        self.drop = nn.Dropout(dropout)
        self.attn_drop = nn.Dropout(attn_dropout)
        # rab: one learned bias per relative distance i - j in [0, max_len) (causal: j <= i), per head
        self.rel_pos = nn.Parameter(torch.zeros(heads, max_len))
        # and one per bucket of the time gap between the two events (time_bucket), per head
        self.rel_time = nn.Parameter(torch.zeros(heads, time_buckets)) if time_buckets else None

    def init_weights(self) -> None:
        """U/V/Q/K and the output projection Xavier-uniform, relative biases zero; block="original" (the
        reference code, whose U/V/Q/K projection has no bias): U/V/Q/K and both relative biases N(0, 0.02)."""
        if self.uvqk.bias is None:
            for weight in (self.uvqk.weight, self.rel_pos) + ((self.rel_time,) if self.rel_time is not None else ()):
                nn.init.normal_(weight, std=0.02)
        else:
            nn.init.xavier_uniform_(self.uvqk.weight)
        nn.init.xavier_uniform_(self.out.weight)

    def relative_bias(self, length: int, gaps: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
        """Bias of position i attending to j: rel_pos[i - j] (zero where j > i, masked anyway), (1, heads,
        L, L); plus rel_time[gaps[b, i, j]] when the blocks have a time bias, (B, heads, L, L). `first`:
        only the query rows from there on (the last one when scoring)."""
        idx = torch.arange(length, device=self.rel_pos.device)
        dist = (idx[first:, None] - idx[None, :]).clamp(min=0, max=self.max_len - 1)
        bias = self.rel_pos[:, dist][None]
        if self.rel_time is not None:
            by_time = self.rel_time[:, gaps[:, first:]].transpose(0, 1)
            bias = bias + by_time if torch.is_grad_enabled() else by_time.add_(bias)
        return bias

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, gaps: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """x: (B, L, dim); allowed: (B, 1, L, L) 1.0 where position i may read j (j <= i, j not padding);
        gaps: (B, L, L) time buckets (time_bucket), when the block has a time bias. last_only: the last
        position's output only, (B, 1, dim) — keys and values still from every position."""
        b, length, _ = x.shape
        first = length - 1 if last_only else 0
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).split(self.width, dim=-1)
        u, q = u[:, first:], q[:, first:]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # (B, H, rows, d)

        scores, bias = heads(q) @ heads(k).transpose(-1, -2), self.relative_bias(length, gaps, first)
        if torch.is_grad_enabled():
            weights = F.silu(scores + bias) / self.max_len * allowed[:, :, first:]
        else:  # scoring: the same operations in place — each (B, heads, rows, L) map is allocated once, not
            # five times (on CPU each fresh one is new pages for the kernel to fault in: half the time)
            weights = F.silu(scores.add_(bias), inplace=True).div_(self.max_len).mul_(allowed[:, :, first:])
        weights = self.attn_drop(weights)
        attended = (weights @ heads(v)).transpose(1, 2).reshape(b, length - first, self.width)
        return x[:, first:] + self.out(self.drop(self.attn_norm(attended) * u))


class HSTU(IdSequenceModel):
    """Item embeddings (scaled by sqrt(dim)) plus learned absolute positions, `blocks` HSTU units, a
    final LayerNorm (none with block="original"); the next-item query at position t is the output at t."""

    def __init__(self, num_items: int | None, max_len: int, dim: int = 50, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2, time_buckets: int = 0, query_time: str = "event",
                 attention_dim: int = 0, block: str = "pre_ln") -> None:
        check_block(block, "hstu")
        original = block == "original"
        super().__init__(num_items, max_len, dim, dropout, positions_from_start=original)
        if query_time not in QUERY_TIMES:
            raise ValueError(f"model.query_time must be one of {QUERY_TIMES}, got {query_time!r}")
        self.time_buckets, self.query_time = time_buckets, query_time
        self.reads_time = bool(time_buckets)
        self.layers = nn.ModuleList(HSTUBlock(dim, heads, max_len, dropout, time_buckets=time_buckets,
                                              attention_dim=attention_dim, original=original) for _ in range(blocks))
        self.final_norm = nn.Identity() if original else nn.LayerNorm(dim, eps=1e-6)
        self.init_truncated()
        for layer in self.layers:
            layer.init_weights()
        self.zero_padding()

    @classmethod
    def of(cls, spec: HSTUSpec, num_items: int, max_len: int) -> "HSTU":
        return cls(num_items, max_len, spec.dim, spec.blocks, spec.heads, spec.dropout, spec.time_buckets,
                   spec.query_time, spec.attention_dim, spec.block)

    def forward(self, ids: torch.Tensor, times: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """ids: (B, L) left-padded item ids -> (B, L, dim): position t predicts item t+1 (last_only: the
        last position, (B, 1, dim)). times, needed with a time bias: (B, L + 1) epoch seconds, each
        item's timestamp aligned with `ids`, then the time of the event the last position predicts
        (in training the last target's timestamp; when scoring the time the recommendation is for)."""
        return self.encode(self.item_emb(ids), ids != 0, times, last_only)

    def encode(self, vectors: torch.Tensor, real: torch.Tensor, times: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """`forward` of item vectors given as such, (B, L, dim), with the (B, L) mask of real items:
        HSTU units reading items that come from elsewhere (an HLLM's item side, `model.user_model: hstu`)."""
        b, length = real.shape
        gaps = None
        if self.time_buckets:
            if times is None or tuple(times.shape) != (b, length + 1):
                raise ValueError(f"HSTU with model.time_buckets={self.time_buckets} needs each event's timestamp "
                                 f"beside its item id followed by the time of the prediction (times of shape "
                                 f"{(b, length + 1)}), got {None if times is None else tuple(times.shape)}")
            events = times[:, :-1]
            gaps = time_bucket(times[:, 1:] if self.query_time == "target" else events, events, self.time_buckets)
        x, keep = self.embed_vectors(vectors, real)
        causal = torch.tril(torch.ones(length, length, dtype=x.dtype, device=x.device))
        allowed = (causal[None] * keep.transpose(1, 2))[:, None]  # (B, 1, L, L): key j valid and j <= i
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            only = last_only and i == last  # the last block computes the last position only
            x = layer(x, allowed, gaps, only) * (keep[:, -1:] if only else keep)
        return self.final_norm(x)

    def user_embeddings(self, ids: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """The representation at the last position (the next-item query), (B, dim)."""
        return self.forward(ids, times, last_only=True)[:, -1]
