"""Popularity and the transition-graph heuristic on hand-made sequences."""
import numpy as np

from ray_jobs.models.baselines import Popularity, TransitionGraph

TRAIN = [np.array([1, 2, 3]), np.array([2, 4]), np.array([5, 6]), np.array([5, 6])]
EMB = np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1], [0.8, 0.6], [-1, 0], [1, 0.05]], dtype=float)
POP = np.bincount(np.concatenate(TRAIN), minlength=7)  # [0, 1, 2, 1, 1, 2, 2]


def test_popularity_ranks_by_train_counts():
    s = Popularity(POP).score([np.array([1]), np.array([2, 3])])
    assert s.shape == (2, 7) and s[0].tolist() == POP.tolist()


def test_graph_candidates_within_hops_ranked_by_text_similarity():
    one_hop = TransitionGraph(TRAIN, 6, EMB, POP, hops=1, last_items=1).score([np.array([1])])[0]
    # from item 1 one hop reaches only 2; everything else falls back below it, by popularity
    assert one_hop.argmax().item() == 2 and (one_hop[[3, 4, 5, 6]] < -1.5).all()
    assert one_hop[5] > one_hop[3] and one_hop[6] > one_hop[4]  # popularity 2 > 1 among fallbacks
    two_hops = TransitionGraph(TRAIN, 6, EMB, POP, hops=2, last_items=1).score([np.array([1])])[0]
    # 1 -> 2 -> {3, 4}: candidates 2, 3, 4 ordered by cosine to item 1: 2 (0.99) > 4 (0.8) > 3 (0.0)
    order = [int(i) for i in np.argsort(-two_hops.numpy()) if i in (2, 3, 4)]
    assert order == [2, 4, 3] and two_hops[[2, 3, 4]].min() > two_hops[[5, 6]].max()


def test_graph_uses_the_last_items_together():
    g = TransitionGraph(TRAIN, 6, EMB, POP, hops=1, last_items=2)
    s = g.score([np.array([3, 1, 5])])[0]  # seeds 1 and 5 -> candidates 2 and 6
    assert set(np.argsort(-s.numpy())[:2].tolist()) == {2, 6}
