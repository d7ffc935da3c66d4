"""List rewards: pure functions of sampled lists (B, N, K) and per-user / catalogue data.

Each term is defined by its per-position gains (B, N, K): what the item at position j adds to the
list given the items before it. The list reward (B, N) is their sum, so the partial sums are the
potentials of step-wise credit (FLAME): a prefix's reward, 0 for the empty list, the list reward at K.
- `ndcg`: NDCG@K against the user's held-out items (binary relevance, ideal DCG over min(H, K));
  position j adds rel_j / log2(j + 1) / IDCG.
- `msra`: NDCG@K against the user's next interactions graded by how far ahead they are
  (`msra_gains`: the one t steps ahead counts align.msra_discount^t).
- `diversity`: intra-list diversity, 1 - mean pairwise cosine of the items' text embeddings;
  position j adds sum_{m<j} (1 - cos(e_j, e_m)) / (K (K - 1) / 2).
- `tail_share`: share of the list's items in the long tail (a boolean mask over item ids); tail_j / K.
- `exposure_deficit`: mean over the list of max(0, 1 - n·p_i), p the running catalogue exposure
  (a distribution over the n items): 1 for an item never shown, 0 at or above the uniform share.
`combine` weights them into the scalar list reward (or the per-position gains of it).

`*_candidates` give what *every* item would add at one position j of each list (after the list's
items before j), (B, N, n + 1): the gains of the items a policy could pick there, which PARS's
token-level credit averages under the policy (`methods.prefix_credit`); at the item actually picked
they equal the gains above (tested).
"""
from __future__ import annotations

import torch


def ndcg_gains(lists: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """relevant: (B, H) item ids, 0 = padding (a user with fewer held-out items)."""
    k = lists.shape[-1]
    hits = ((lists[..., None] == relevant[:, None, None, :]) & (relevant[:, None, None, :] != 0)).any(-1).double()
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=lists.device) + 2.0)
    n_rel = (relevant != 0).sum(-1).clamp(max=k)                      # (B,)
    ideal = torch.cumsum(discount, 0)[(n_rel - 1).clamp(min=0)] * (n_rel > 0)
    return (hits * discount / ideal.clamp(min=1e-12)[:, None, None]).float()


def msra_gains(lists: torch.Tensor, relevant: torch.Tensor, discount: float) -> torch.Tensor:
    """Multi-step reward augmentation (after REG4Rec's MSRA): NDCG@K against the user's next H
    interactions in order (relevant: (B, H), the next one first, 0 = padding), the one t steps ahead
    graded discount^t, so a list is paid for the user's future actions, the nearer the more; ideal
    DCG: the grades in order at the top min(H, K) positions. discount 1 is `ndcg_gains`."""
    k, h = lists.shape[-1], relevant.shape[-1]
    grade = discount ** torch.arange(h, dtype=torch.float64, device=lists.device)            # (H,)
    match = (lists[..., None] == relevant[:, None, None, :]) & (relevant[:, None, None, :] != 0)
    gain = (match.double() * grade).amax(-1)                                                  # (B, N, K)
    position = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=lists.device) + 2.0)
    m = min(h, k)
    ideal = ((relevant[:, :m] != 0).double() * grade[:m] * position[:m]).sum(-1)              # (B,)
    return (gain * position / ideal.clamp(min=1e-12)[:, None, None]).float()


def diversity_gains(lists: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """item_emb: (n + 1, d) unit vectors. Position j's cosines to the items before it come from the
    running sum of their vectors; a list of one item scores 0."""
    k = lists.shape[-1]
    if k < 2:
        return torch.zeros(lists.shape, device=lists.device)
    e = item_emb[lists]                                                # (B, N, K, d)
    before = torch.cumsum(e, dim=-2) - e                               # sum of the vectors before j
    j = torch.arange(k, dtype=e.dtype, device=e.device)
    return (j - (e * before).sum(-1)) / (k * (k - 1) / 2)


def tail_gains(lists: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """tail: (n + 1,) bool mask of long-tail item ids."""
    return tail[lists].float() / lists.shape[-1]


def exposure_gains(lists: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
    """exposure: (n + 1,) running exposure distribution over items 1..n (index 0 unused)."""
    n = exposure.shape[0] - 1
    return (1.0 - n * exposure[lists]).clamp(min=0.0, max=1.0) / lists.shape[-1]


def _relevance(relevant: torch.Tensor, n_items: int, grade: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H) relevant ids -> (B, n + 1): each item's grade (1, or `grade` of its first place in H)."""
    out = torch.zeros((relevant.shape[0], n_items + 1), dtype=torch.float64, device=relevant.device)
    g = torch.ones(relevant.shape, dtype=torch.float64, device=relevant.device) if grade is None else \
        grade[None, :].expand(relevant.shape[0], -1)
    out.scatter_reduce_(1, relevant, g * (relevant != 0), reduce="amax")
    out[:, 0] = 0.0
    return out


def ndcg_candidates(j: int, k: int, relevant: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, 1, n + 1): what each item adds to NDCG@K at position j (`ndcg_gains`, for every item)."""
    return msra_candidates(j, k, relevant, n_items, 1.0)


def msra_candidates(j: int, k: int, relevant: torch.Tensor, n_items: int, discount: float) -> torch.Tensor:
    """(B, 1, n + 1): what each item adds to the MSRA NDCG at position j (`msra_gains`, for every item)."""
    h = relevant.shape[-1]
    grade = discount ** torch.arange(h, dtype=torch.float64, device=relevant.device)
    position = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=relevant.device) + 2.0)
    m = min(h, k)
    ideal = ((relevant[:, :m] != 0).double() * grade[:m] * position[:m]).sum(-1)
    return (_relevance(relevant, n_items, grade) * position[j] / ideal.clamp(min=1e-12)[:, None])[:, None, :]


def diversity_candidates(j: int, lists: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """(B, N, n + 1): what each item adds to the intra-list diversity after the list's first j items."""
    k = lists.shape[-1]
    if k < 2:
        return torch.zeros((*lists.shape[:2], item_emb.shape[0]), dtype=torch.float64, device=lists.device)
    before = item_emb[lists[..., :j]].double().sum(-2)                                  # (B, N, d)
    return (j - before @ item_emb.double().T) / (k * (k - 1) / 2)


def tail_candidates(k: int, tail: torch.Tensor) -> torch.Tensor:
    """(1, 1, n + 1): what each item adds to the tail share."""
    return (tail.double() / k)[None, None, :]


def exposure_candidates(k: int, exposure: torch.Tensor) -> torch.Tensor:
    """(1, 1, n + 1): what each item adds to the exposure deficit."""
    n = exposure.shape[0] - 1
    return ((1.0 - n * exposure.double()).clamp(min=0.0, max=1.0) / k)[None, None, :]


def ndcg(lists: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    return ndcg_gains(lists, relevant).sum(-1)


def diversity(lists: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    return diversity_gains(lists, item_emb).sum(-1)


def tail_share(lists: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    return tail_gains(lists, tail).sum(-1)


def exposure_deficit(lists: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
    return exposure_gains(lists, exposure).sum(-1)


def combine(weights: dict[str, float], terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_t weights[t] * terms[t] over the terms with a non-zero weight."""
    total = None
    for name, w in weights.items():
        if w:
            part = w * terms[name]
            total = part if total is None else total + part
    if total is None:
        raise ValueError("align.rewards: every reward weight is 0; give ndcg, msra, diversity, tail or exposure a weight")
    return total
