"""Full-ranking metrics against hand-computed values; masking and batch-size invariance."""
import math

import numpy as np
import pytest
import torch

from ray_jobs.metrics import (evaluate, exposure_gini, gini, hit_rate, intra_list_diversity, mask_scores, mrr, ndcg,
                              rank_and_topk, tail_items, tail_share)


def test_rank_metrics_by_hand():
    ranks = np.array([0, 1, 4, 20])
    assert hit_rate(ranks, 5) == 0.75 and hit_rate(ranks, 1) == 0.25
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 0) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 21) / 4)


def test_gini_tail_and_diversity_by_hand():
    assert gini(np.array([1, 1, 1, 1])) == 0.0
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)
    popularity = np.array([0, 5, 1, 3, 1])  # item 0 is padding
    assert tail_items(popularity, 0.5).tolist() == [False, False, True, False, True]
    top = np.array([[2, 1], [4, 3]])
    assert tail_share(top, 2, tail_items(popularity, 0.5)) == 0.5
    assert exposure_gini(top, 2, 4) == 0.0  # every item shown once
    emb = np.array([[0, 0], [1, 0], [0, 1], [1, 0], [-1, 0]], dtype=float)
    assert intra_list_diversity(np.array([[1, 2]]), 2, emb) == pytest.approx(1.0)   # orthogonal
    assert intra_list_diversity(np.array([[1, 3]]), 2, emb) == pytest.approx(0.0)   # identical
    assert intra_list_diversity(np.array([[1, 4]]), 2, emb) == pytest.approx(2.0)   # opposite
    three = np.array([[1, 2, 4]])  # cosines 0, -1, 0 -> mean -1/3
    assert intra_list_diversity(three, 3, emb) == pytest.approx(1 + 1 / 3)


def test_history_is_masked_and_ranks_are_exact():
    # 5 items; scores favour items 5 > 4 > 3 > 2 > 1
    row = np.array([9.0, 1, 2, 3, 4, 5])
    hist = [np.array([5, 4])]
    scores = mask_scores(torch.as_tensor(row[None]), hist)
    assert torch.isinf(scores[0, [0, 4, 5]]).all()
    ranks, top = rank_and_topk(lambda h: torch.as_tensor(np.stack([row] * len(h))), hist, np.array([3]), 3, 10)
    assert ranks.tolist() == [0]  # items 5 and 4 are history, so 3 is first
    assert top.tolist() == [[3, 2, 1]]


def test_ties_count_against_the_target():
    flat = lambda h: torch.zeros(len(h), 6)  # noqa: E731  a model that can't tell items apart
    ranks, _ = rank_and_topk(flat, [np.array([1])], np.array([2]), 3, 10)
    assert ranks.tolist() == [3]  # 4 candidates tied: the target is ranked last among them


def test_batch_size_does_not_change_results():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(37, 21))
    hists = [rng.choice(np.arange(1, 21), size=rng.integers(1, 6), replace=False) for _ in range(37)]
    targets = np.array([rng.choice([i for i in range(1, 21) if i not in h]) for h in hists])
    lookup = {id(h): i for i, h in enumerate(hists)}

    def score(batch):
        return torch.as_tensor(np.stack([table[lookup[id(h)]] for h in batch]), dtype=torch.float32)

    pop = rng.integers(0, 50, size=21)
    a = evaluate(score, hists, targets, 20, pop, ks=[5, 10], batch_size=1)
    b = evaluate(score, hists, targets, 20, pop, ks=[5, 10], batch_size=1000)
    assert a == b
    for k in (5, 10):  # no recommended item is in its user's history
        _, top = rank_and_topk(score, hists, targets, k, 7)
        assert all(not set(t).intersection(h) for t, h in zip(top, hists))
