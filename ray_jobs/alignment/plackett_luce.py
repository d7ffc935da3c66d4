"""Plackett–Luce lists over a catalogue: Gumbel top-K sampling and exact list log-probabilities.

A list y = (y_1..y_K) drawn without replacement with item weights exp(s_i) has probability
    P(y) = prod_j exp(s_{y_j}) / (sum_i exp(s_i) - sum_{m<j} exp(s_{y_m}))
and the top-K of s_i + Gumbel noise is an exact sample of it (ordered by perturbed score).
Masked items carry s = -inf: never sampled, no mass in any denominator.
"""
from __future__ import annotations

import itertools
import math

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


def list_kl(lp: torch.Tensor, lp_ref: torch.Tensor, lp_behaviour: torch.Tensor) -> torch.Tensor:
    """Per-row estimate of the whole-list KL(pi || pi_ref) from N sampled lists: lp, lp_ref, lp_behaviour
    (B, N) are each list's log-probability under the policy (with gradients), the reference, and the
    policy that sampled it. With importance weights w = pi(y) / pi_behaviour(y), self-normalised per
    row (w / mean w: a list's weight is a product of K per-pick ratios, and one list must not carry the
    estimate), the value is
        KL ~ mean_n w_n (log pi(y_n) - log pi_ref(y_n)) / mean_n w_n
    the plain on-policy average while the rollouts are fresh (w = 1) and consistent once the policy
    has moved (later optimisation epochs on the same rollouts). Its gradient is the score-function
    form  E[w · grad log pi · (d - b)],  d = log pi - log pi_ref,  with a leave-one-out baseline b
    (the mean w·d of the row's other lists): unbiased on-policy, since E_pi[grad log pi] = 0, and
    with far less variance than differentiating the value itself."""
    lp64, d = lp.double(), (lp.double() - lp_ref.detach().double()).detach()
    log_w = lp64 - lp_behaviour.detach().double()
    w = torch.exp(log_w - torch.logsumexp(log_w.detach(), -1, keepdim=True) + math.log(lp.shape[-1]))
    wd = w.detach() * d
    n = lp.shape[-1]
    baseline = (wd.sum(-1, keepdim=True) - wd) / max(n - 1, 1)
    surrogate = (w * (d - baseline)).mean(-1)
    return (wd.mean(-1) + surrogate - surrogate.detach()).to(lp.dtype)


def exact_list_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, k: int) -> float:
    """KL(P || Q) between the Plackett–Luce distributions of K-item lists of two 1-D logit vectors,
    by enumerating every ordered list of the unmasked items (tiny catalogues only: n!/(n-K)! lists)."""
    items = [i for i in range(len(p_logits)) if torch.isfinite(p_logits[i])]
    lists = torch.tensor(list(itertools.permutations(items, k)))[None]
    lp = list_log_prob(p_logits.double()[None], lists)[0]
    lq = list_log_prob(q_logits.double()[None], lists)[0]
    return float((lp.exp() * (lp - lq)).sum())
