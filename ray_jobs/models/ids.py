"""What the item-ID sequence models (SASRec, HSTU) share: item embeddings (id 0 = padding, also the
output side's item vectors), learned positions counted from the right end of a `max_len` window (or
from each sequence's first item), input dropout, and the scoring surface the trainer and evaluator use."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


BLOCKS = ("pre_ln", "original")  # model.block: our block, or the one of the model's reference code


def check_block(block: str, kind: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"model.block must be one of {BLOCKS} for {kind}, got {block!r}")


class IdSequenceModel(nn.Module):
    """The item-ID part of a `SequenceRecommender` (`ray_jobs.models`)."""
    reads_time = False
    query_time = "event"
    reads_catalogue = False
    decodes_items = False

    def __init__(self, num_items: int | None, max_len: int, dim: int, dropout: float,
                 positions_from_start: bool = False) -> None:
        """`num_items` None: no item-ID table — the items' vectors come from elsewhere (`embed_vectors`)."""
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.positions_from_start = positions_from_start
        self.item_emb = None if num_items is None else nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)

    def init_truncated(self) -> None:
        """Item ids N(0, 0.02) and positions N(0, 1/dim), both truncated at 2 std (SASRec paper, HSTU)."""
        dim = self.pos_emb.embedding_dim
        if self.item_emb is not None:
            nn.init.trunc_normal_(self.item_emb.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.pos_emb.weight, std=dim ** -0.5, a=-2 * dim ** -0.5, b=2 * dim ** -0.5)

    def zero_padding(self) -> None:
        if self.item_emb is not None:
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) left-padded ids -> the input stream (B, L, dim) and the (B, L, 1) mask of real items.
        Positions count from the right end of a max_len window (the last item is always max_len - 1) or,
        with positions_from_start, from each sequence's first item (0, 1, ...; generative-recommenders'
        right-padded layout). Either way a batch trimmed of its leading all-padding columns (see
        scoring.scorer) gets the same positions as the full window."""
        return self.embed_vectors(self.item_emb(ids), ids != 0)

    def embed_vectors(self, vectors: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`embed` of item vectors given as such, (B, L, dim), with the (B, L) mask of real items: the
        input stream of a model whose items come from elsewhere (an HLLM's item side)."""
        length = real.shape[1]
        if self.positions_from_start:
            pos = (real.cumsum(1) - 1).clamp_(min=0)  # (B, L); padding reads position 0 and is zeroed below
        else:
            pos = torch.arange(self.max_len - length, self.max_len, device=real.device)[None]
        x = vectors * (vectors.shape[-1] ** 0.5) + self.pos_emb(pos)
        keep = real.unsqueeze(-1).to(x.dtype)
        return self.drop(x) * keep, keep

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item_emb(ids)

    def all_item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def user_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The representation at the last position (the next-item query), (B, dim)."""
        return self.forward(ids, last_only=True)[:, -1]

    def one_item_pass(self, *ids: torch.Tensor) -> AbstractContextManager:
        """Item lookups are table reads: nothing to share."""
        return nullcontext()
