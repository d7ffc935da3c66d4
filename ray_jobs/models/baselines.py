"""Training-free baselines in the same harness: popularity and the item-transition graph heuristic."""
from __future__ import annotations

import numpy as np
import torch


class Popularity:
    """Every user gets the catalogue ranked by training interactions."""

    def __init__(self, popularity: np.ndarray) -> None:
        self.scores = torch.as_tensor(popularity, dtype=torch.float32)

    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        return self.scores[None].expand(len(histories), -1)
