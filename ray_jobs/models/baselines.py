"""Training-free baselines in the same harness: popularity and the item-transition graph heuristic."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class Popularity:
    """Every user gets the catalogue ranked by training interactions."""

    def __init__(self, popularity: np.ndarray) -> None:
        self.scores = torch.as_tensor(popularity, dtype=torch.float32)

    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        return self.scores[None].expand(len(histories), -1)


class TransitionGraph:
    """Item-transition graph heuristic (no training): candidates are the items reachable within
    `hops` transitions from the user's last `last_items` items in the training sequences, ranked
    by cosine between their text embedding and the mean text embedding of those last items; every
    other item follows, ordered by popularity."""

    def __init__(self, train: list[np.ndarray], num_items: int, item_emb: np.ndarray, popularity: np.ndarray,
                 hops: int = 2, last_items: int = 2) -> None:
        src = np.concatenate([s[:-1] for s in train if len(s) > 1] or [np.zeros(0, np.int64)])
        dst = np.concatenate([s[1:] for s in train if len(s) > 1] or [np.zeros(0, np.int64)])
        n = num_items + 1
        self.adj = sp.csr_matrix((np.ones(len(src), dtype=np.float32), (src, dst)), shape=(n, n))
        self.adj.data[:] = 1.0  # reachability, not counts
        self.emb = item_emb / np.maximum(np.linalg.norm(item_emb, axis=1, keepdims=True), 1e-12)
        pop = popularity.astype(np.float64)
        self.fallback = -3.0 + pop / max(pop.max(), 1.0)  # in [-3, -2]: below any candidate (cosine >= -1)
        self.hops, self.last_items, self.n = hops, last_items, n

    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        rows = np.concatenate([np.full(min(len(h), self.last_items), i) for i, h in enumerate(histories)])
        seeds = np.concatenate([h[-self.last_items:] for h in histories])
        s = sp.csr_matrix((np.ones(len(seeds), dtype=np.float32), (rows, seeds)), shape=(len(histories), self.n))
        reach, frontier = sp.csr_matrix((len(histories), self.n), dtype=np.float32), s
        for _ in range(self.hops):
            frontier = frontier @ self.adj
            reach = reach + frontier
        query = np.asarray(s @ self.emb) / np.maximum(np.asarray(s.sum(1)), 1.0)
        sim = query @ self.emb.T
        candidate = np.asarray((reach > 0).todense())
        scores = np.where(candidate, sim, self.fallback[None, :])
        return torch.as_tensor(scores, dtype=torch.float32)
