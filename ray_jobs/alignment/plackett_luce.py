"""Plackett–Luce lists over a catalogue: Gumbel top-K sampling and exact list log-probabilities.

A list y = (y_1..y_K) drawn without replacement with item weights exp(s_i) has probability
    P(y) = prod_j exp(s_{y_j}) / (sum_i exp(s_i) - sum_{m<j} exp(s_{y_m}))
and the top-K of s_i + Gumbel noise is an exact sample of it (ordered by perturbed score).
Masked items carry s = -inf: never sampled, no mass in any denominator.
"""
from __future__ import annotations

import torch


def gumbel_topk(logits: torch.Tensor, k: int, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n) logits -> (B, samples, k) item lists, each an exact Plackett–Luce draw."""
    b, n = logits.shape
    u = torch.rand((b, samples, n), generator=generator, device=logits.device if generator is None else "cpu")
    g = -torch.log(-torch.log(u.to(logits.device).clamp(1e-20, 1 - 1e-7)))
    return torch.topk(logits.detach()[:, None, :] + g, k, dim=-1).indices


def _picks(logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Exact log P(y_j | y_1..y_{j-1}) of every pick under Plackett–Luce; logits (B, n), lists
    (B, N, K) -> (B, N, K). Their sum along the list is log P(list).

    The denominator at position j is the mass of the items not yet picked: the items outside the
    list plus the list's items j..K. Both are summed directly in log space (logsumexp over the
    catalogue with the list masked, and a reverse log-cumsum-exp over the list), never as a
    difference of sums, so a policy that puts nearly all mass on one item stays exact."""
    b, n_lists, k = lists.shape
    x = logits.double()
    chosen = x.gather(1, lists.reshape(b, -1)).reshape(b, n_lists, k)        # (B, N, K)
    rest = x[:, None, :].expand(b, n_lists, x.shape[1]).scatter(-1, lists, float("-inf"))
    lse_rest = torch.logsumexp(rest, dim=-1)                                   # (B, N)
    tail = torch.logcumsumexp(chosen.flip(-1), dim=-1).flip(-1)                # log sum_{m >= j} exp(s_m)
    denom = torch.logaddexp(tail, lse_rest[..., None])
    return chosen - denom


def pick_log_probs(logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    return _picks(logits, lists).to(logits.dtype)


def list_log_prob(logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Exact log P(list) under Plackett–Luce; logits (B, n), lists (B, N, K) -> (B, N)."""
    return _picks(logits, lists).sum(-1).to(logits.dtype)


def masked_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(policy) || softmax(reference)) over the unmasked items (-inf in both):
    the first-pick distributions, which determine the whole Plackett–Luce list distribution."""
    finite = torch.isfinite(policy_logits)
    zero = torch.zeros((), dtype=policy_logits.dtype)
    # masked entries are replaced before any arithmetic, so no -inf - -inf reaches the backward pass
    lp = torch.where(finite, torch.log_softmax(policy_logits, dim=-1), zero)
    lr = torch.where(finite, torch.log_softmax(ref_logits, dim=-1), zero)
    p = torch.where(finite, lp.exp(), zero)
    return (p * (lp - lr)).sum(-1)
