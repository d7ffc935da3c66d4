"""SASRec (Kang & McAuley, 2018): item-ID embeddings + a causal self-attention stack."""
from __future__ import annotations

import torch
from torch import nn


def causal_padding_mask(ids: torch.Tensor, heads: int) -> torch.Tensor:
    """(B*heads, L, L) boolean attention mask, True = blocked: future positions and padding keys.
    A padded query may attend to itself, so no row is fully blocked (no NaN on left padding)."""
    b, length = ids.shape
    future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=ids.device), diagonal=1)
    pad_key = (ids == 0)[:, None, :].expand(b, length, length)
    eye = torch.eye(length, dtype=torch.bool, device=ids.device)
    mask = (future[None] | pad_key) & ~eye[None]
    return mask.repeat_interleave(heads, dim=0)


class SASRec(nn.Module):
    def __init__(self, num_items: int, max_len: int, dim: int = 50, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.num_items, self.max_len, self.heads = num_items, max_len, heads
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, activation="relu",
                                       batch_first=True, norm_first=True)
            for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item_emb(ids)

    def all_item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) left-padded item ids -> (B, L, dim): position t predicts item t+1."""
        length = ids.shape[1]
        # positions count from the right end of a max_len window, so a batch trimmed of its leading
        # all-padding columns (see trainer.scorer) gets the same positions as the full window
        pos = torch.arange(self.max_len - length, self.max_len, device=ids.device)
        x = self.item_emb(ids) * (self.item_emb.embedding_dim ** 0.5) + self.pos_emb(pos)[None]
        keep = (ids != 0).unsqueeze(-1).to(x.dtype)
        x = self.drop(x) * keep
        mask = causal_padding_mask(ids, self.heads)
        for layer in self.layers:
            x = layer(x, src_mask=mask) * keep
        return self.norm(x)

    def user_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The representation at the last position (the next-item query), (B, dim)."""
        return self.forward(ids)[:, -1]
