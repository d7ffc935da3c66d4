"""List rewards: pure functions of sampled lists (B, N, K) and per-user / catalogue data -> (B, N).

- `ndcg`: NDCG@K against the user's held-out items (binary relevance, ideal DCG over min(H, K)).
- `diversity`: intra-list diversity, 1 - mean pairwise cosine of the items' text embeddings.
- `tail_share`: share of the list's items in the long tail (a boolean mask over item ids).
- `exposure_deficit`: mean over the list of max(0, 1 - n·p_i), p the running catalogue exposure
  (a distribution over the n items): 1 for an item never shown, 0 at or above the uniform share.
`combine` weights them into the scalar list reward.
"""
from __future__ import annotations

import torch


def ndcg(lists: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """relevant: (B, H) item ids, 0 = padding (a user with fewer held-out items)."""
    k = lists.shape[-1]
    hits = ((lists[..., None] == relevant[:, None, None, :]) & (relevant[:, None, None, :] != 0)).any(-1).double()
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=lists.device) + 2.0)
    dcg = (hits * discount).sum(-1)
    n_rel = (relevant != 0).sum(-1).clamp(max=k)                      # (B,)
    ideal = torch.cumsum(discount, 0)[(n_rel - 1).clamp(min=0)] * (n_rel > 0)
    return (dcg / ideal.clamp(min=1e-12)[:, None]).float()


def diversity(lists: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """item_emb: (n + 1, d) unit vectors. For K unit vectors the pairwise cosines sum to
    (|sum e|^2 - K) / 2, so ILD = 1 - (|sum e|^2 - K) / (K (K - 1)); a list of one item scores 0."""
    k = lists.shape[-1]
    if k < 2:
        return torch.zeros(lists.shape[:2], device=lists.device)
    s = item_emb[lists].sum(-2)
    return 1.0 - ((s * s).sum(-1) - k) / (k * (k - 1))


def tail_share(lists: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """tail: (n + 1,) bool mask of long-tail item ids."""
    return tail[lists].float().mean(-1)


def exposure_deficit(lists: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
    """exposure: (n + 1,) running exposure distribution over items 1..n (index 0 unused)."""
    n = exposure.shape[0] - 1
    return (1.0 - n * exposure[lists]).clamp(min=0.0, max=1.0).mean(-1)


def combine(weights: dict[str, float], terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_t weights[t] * terms[t] over the terms with a non-zero weight."""
    total = None
    for name, w in weights.items():
        if w:
            part = w * terms[name]
            total = part if total is None else total + part
    if total is None:
        raise ValueError("align.rewards: every reward weight is 0; give ndcg, diversity, tail or exposure a weight")
    return total
