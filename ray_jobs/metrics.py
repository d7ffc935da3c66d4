"""Full-ranking evaluation: every user scored against the whole catalogue, history masked.

The catalogue a split is ranked over is given as a boolean mask of candidate items (active items,
or the k-core's: `eval.candidates`); items outside it, and items a model can't score (-inf from its
score function: an ID model and an item it never trained on), are never ranked: a target among them
is a miss.

Accuracy (HR = Recall for one held-out item, NDCG, MRR), beyond-accuracy (coverage, intra-list
diversity, tail-exposure share, exposure Gini) and slices (cold targets, short/long histories).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from jobs.contracts import EvalResult

ScoreFn = Callable[..., torch.Tensor]  # histories [, their timestamps] -> (B, num_items + 1) scores


def call_scores(score_fn: ScoreFn, histories: list[np.ndarray], times: list[np.ndarray] | None) -> torch.Tensor:
    """Scores of a batch of histories; their timestamps go along to a score function that reads them
    (`reads_time`: a model with HSTU's time bias), and nowhere else."""
    if getattr(score_fn, "reads_time", False):
        return score_fn(histories, times)
    return score_fn(histories)


def mask_scores(scores: torch.Tensor, histories: list[np.ndarray], candidates: np.ndarray | None = None) -> torch.Tensor:
    """Padding (column 0), items outside `candidates` (a boolean mask over item ids) and every item
    already in the user's history can't be recommended."""
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    if candidates is not None:
        scores[:, torch.as_tensor(~np.asarray(candidates, bool))] = float("-inf")
    rows = np.concatenate([np.full(len(h), i) for i, h in enumerate(histories)]) if histories else np.zeros(0)
    cols = np.concatenate(histories) if histories else np.zeros(0)
    if len(cols):
        scores[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = float("-inf")
    return scores


def rank_and_topk(score_fn: ScoreFn, histories: list[np.ndarray], targets: np.ndarray, k_max: int,
                  batch_size: int, times: list[np.ndarray] | None = None,
                  candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each target among the unmasked items (a target that can't be ranked — masked,
    outside `candidates`, unscorable — gets the number of columns: a miss at any K), and each user's
    top-k_max item ids (0 where fewer items could be ranked). `times`: the histories' timestamps,
    each followed by its target's (`EvalSplit.stamps`), for a score function that reads them."""
    ranks, tops = [], []
    for start in range(0, len(histories), batch_size):
        hist = histories[start:start + batch_size]
        stamps = None if times is None else times[start:start + batch_size]
        tgt = torch.as_tensor(targets[start:start + batch_size], dtype=torch.long)
        with torch.no_grad():
            scores = mask_scores(call_scores(score_fn, hist, stamps).float(), hist, candidates)
        target_scores = scores.gather(1, tgt[:, None])
        # ties count against the target: a constant model must not look good
        rank = (scores > target_scores).sum(1) + (scores == target_scores).sum(1) - 1
        ranks.append(torch.where(torch.isneginf(target_scores[:, 0]), scores.shape[1], rank).numpy())
        top = torch.topk(scores, min(k_max, scores.shape[1] - 1), dim=1)
        tops.append(torch.where(torch.isneginf(top.values), 0, top.indices).numpy())
    return np.concatenate(ranks), np.concatenate(tops)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / (ranks + 1.0)))


def coverage(top: np.ndarray, k: int, num_items: int) -> float:
    """Share of the `num_items` candidates that appear in some top-k list (0, no item, not counted)."""
    shown = np.unique(top[:, :k])
    return len(shown[shown > 0]) / max(num_items, 1)


def intra_list_diversity(top: np.ndarray, k: int, item_emb: np.ndarray) -> float:
    """1 - mean pairwise cosine within each list, averaged over lists. For unit vectors the sum of
    pairwise cosines is (|sum e|^2 - k) / 2, so no k x k matrix is built: each list's sum of unit
    vectors comes from one embedding_bag (no (users, k, d) gather), squared in float64."""
    if len(top) == 0:
        return 0.0
    e = torch.nn.functional.normalize(torch.as_tensor(item_emb, dtype=torch.float32), dim=1)
    s = torch.nn.functional.embedding_bag(torch.as_tensor(np.ascontiguousarray(top[:, :k]), dtype=torch.long), e,
                                          mode="sum").double()
    return float((1.0 - ((s * s).sum(1) - k) / (k * (k - 1))).mean())


def tail_items(popularity: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask over item ids: the least popular `share` of items 1..n (ties by id)."""
    n = len(popularity) - 1
    order = np.lexsort((np.arange(1, n + 1), popularity[1:])) + 1
    mask = np.zeros(n + 1, dtype=bool)
    mask[order[: int(round(share * n))]] = True
    return mask


def tail_share(top: np.ndarray, k: int, tail: np.ndarray) -> float:
    return float(np.mean(tail[top[:, :k]]))


def gini(counts: np.ndarray) -> float:
    """Gini of exposure counts over all items (0 = equal exposure, ->1 = all on one item)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(c), c.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * c).sum() / (n * total))


def exposure_gini(top: np.ndarray, k: int, num_items: int) -> float:
    """Gini of how often each of the `num_items` candidates is shown (those never shown count as 0)."""
    counts = np.bincount(top[:, :k].ravel())[1:]
    counts = np.sort(counts[counts > 0])
    return gini(np.concatenate([np.zeros(max(num_items - len(counts), 0)), counts]))


def accuracy(ranks: np.ndarray, ks: list[int]) -> dict:
    out = {"users": int(len(ranks)), "mrr": mrr(ranks)}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"recall@{k}"] = out[f"hr@{k}"]
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    return out


HEADLINE = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")


def headline(metrics: dict, keys: tuple[str, ...] = HEADLINE) -> dict:
    """The figures tables report, rounded to four places."""
    return {k: round(float(metrics[k]), 4) for k in keys}


def evaluate(score_fn: ScoreFn, histories: list[np.ndarray], targets: np.ndarray, num_items: int,
             popularity: np.ndarray, ks: list[int] = (5, 10, 20, 50, 200), batch_size: int = 1024,
             item_emb: np.ndarray | None = None, tail_fraction: float = 0.8, cold_item_max: int = 10,
             short_history_max: int = 20, times: list[np.ndarray] | None = None,
             candidates: np.ndarray | None = None) -> EvalResult:
    """Every metric for one split. `popularity` (train interactions per item id) defines tail
    items and cold targets; `item_emb` (item text embeddings) enables intra-list diversity;
    `times` (the histories' timestamps) goes to a score function that reads them; `candidates`
    (a boolean mask over item ids) is what is ranked (default: every item)."""
    n_candidates = num_items if candidates is None else int(np.asarray(candidates, bool)[1:].sum())
    ks = usable_ks(ks, n_candidates)
    ranks, top = rank_and_topk(score_fn, histories, targets, max(ks), batch_size, times, candidates)
    return summarize(ranks, top, np.asarray([len(h) for h in histories]), targets, n_candidates, popularity, ks,
                     item_emb, tail_fraction, cold_item_max, short_history_max)


def usable_ks(ks, num_items: int) -> list[int]:
    return sorted(k for k in ks if k < num_items)


def summarize(ranks: np.ndarray, top: np.ndarray, lengths: np.ndarray, targets: np.ndarray, num_items: int,
              popularity: np.ndarray, ks: list[int], item_emb: np.ndarray | None = None, tail_fraction: float = 0.8,
              cold_item_max: int = 10, short_history_max: int = 20) -> EvalResult:
    """Metrics from per-user target ranks and top lists (rows in user order) — what distributed
    evaluation gathers from its workers, so it reports exactly what one process would."""
    ks = usable_ks(ks, num_items)
    result = EvalResult(accuracy(ranks, ks))
    tail = tail_items(popularity, tail_fraction)
    for k in ks:
        b = result.beyond_accuracy
        b[f"coverage@{k}"] = coverage(top, k, num_items)
        b[f"tail_share@{k}"] = tail_share(top, k, tail)
        b[f"gini@{k}"] = exposure_gini(top, k, num_items)
        if item_emb is not None and k > 1:
            b[f"ild@{k}"] = intra_list_diversity(top, k, item_emb)
    slices = {"cold_targets": popularity[targets] <= cold_item_max, "warm_targets": popularity[targets] > cold_item_max,
              "short_histories": lengths <= short_history_max, "long_histories": lengths > short_history_max}
    for name, sel in slices.items():
        if sel.any():
            result.slices[name] = accuracy(ranks[sel], [k for k in ks if k in (10, 50)])
    return result
