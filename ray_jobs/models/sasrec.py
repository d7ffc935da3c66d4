"""SASRec (Kang & McAuley, 2018): item-ID embeddings + a causal self-attention stack."""
from __future__ import annotations

import torch
from torch import nn

from jobs.schema import SASRecSpec
from ray_jobs.models.ids import IdSequenceModel, check_block


def causal_padding_mask(ids: torch.Tensor, heads: int) -> torch.Tensor:
    """(B*heads, L, L) boolean attention mask, True = blocked: future positions and padding keys.
    A padded query may attend to itself, so no row is fully blocked (no NaN on left padding)."""
    b, length = ids.shape
    future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=ids.device), diagonal=1)
    pad_key = (ids == 0)[:, None, :].expand(b, length, length)
    eye = torch.eye(length, dtype=torch.bool, device=ids.device)
    mask = (future[None] | pad_key) & ~eye[None]
    return mask.repeat_interleave(heads, dim=0)


class OriginalBlock(nn.Module):
    """The block of the SASRec paper: only the queries are layer-normalised (keys and values read the
    raw stream), the residual carries the normalised queries, then a point-wise feed-forward layer
    with its own residual. generative-recommenders' SASRec baseline uses this block."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.query_norm, self.ffn_norm = nn.LayerNorm(dim, eps=1e-8), nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """last_only: compute only the last position's output (B, 1, dim) — the keys and values are
        still the whole sequence, so it equals forward(...)[:, -1:]; what scoring needs of the top block."""
        if last_only:
            q = self.query_norm(x[:, -1:])
            src_mask = src_mask[:, -1:]
        else:
            q = self.query_norm(x)
        h = self.ffn_norm(q + self.attn(q, x, x, attn_mask=src_mask, need_weights=False)[0])
        return h + self.ffn(h)


class SASRec(IdSequenceModel):
    """block="pre_ln": PyTorch's pre-norm encoder layer plus a final LayerNorm; block="original": the
    paper's block (see OriginalBlock) with its initialisation (item ids N(0, 0.02) truncated,
    positions N(0, 1/dim), Xavier-normal weight matrices) and no final norm."""

    def __init__(self, num_items: int | None, max_len: int, dim: int = 50, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2, block: str = "pre_ln") -> None:
        """`num_items` None: no item table; the item vectors come from elsewhere (`encode_vectors`)."""
        check_block(block, "sasrec")
        super().__init__(num_items, max_len, dim, dropout)
        self.heads = heads
        if block == "original":
            self.layers = nn.ModuleList(OriginalBlock(dim, heads, dropout) for _ in range(blocks))
            self.norm = nn.Identity()
            for layer in self.layers:
                for p in layer.parameters():
                    if p.dim() >= 2:
                        nn.init.xavier_normal_(p)
            self.init_truncated()
        else:
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, activation="relu",
                                           batch_first=True, norm_first=True)
                for _ in range(blocks))
            self.norm = nn.LayerNorm(dim)
            if self.item_emb is not None:
                nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        self.zero_padding()

    @classmethod
    def of(cls, spec: SASRecSpec, num_items: int, max_len: int) -> "SASRec":
        return cls(num_items, max_len, spec.dim, spec.blocks, spec.heads, spec.dropout, spec.block)

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """ids: (B, L) left-padded item ids -> (B, L, dim): position t predicts item t+1. last_only:
        only the last position, (B, 1, dim) (with the original block the top block computes just it)."""
        return self.encode_vectors(self.item_emb(ids), ids, last_only)

    def encode_vectors(self, vectors: torch.Tensor, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`forward` over item vectors given as such (B, L, dim), with the (B, L) ids (0 = padding)
        that say which positions are real."""
        x, keep = self.embed_vectors(vectors, ids != 0)
        mask = causal_padding_mask(ids, self.heads)
        # the original top block can compute the last row alone (its keys/values are the lower stream)
        short = last_only and len(self.layers) > 0 and isinstance(self.layers[-1], OriginalBlock)
        for layer in self.layers[:-1] if short else self.layers:
            x = layer(x, src_mask=mask) * keep
        if short:
            x = self.layers[-1](x, src_mask=mask, last_only=True) * keep[:, -1:]
        x = self.norm(x)
        return x[:, -1:] if last_only else x
