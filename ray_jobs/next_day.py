"""Next-day evaluation: a model that served day d+1 (trained on data up to day d) judged on what users
did on day d+1.

Every user active on the day is a query; their history is everything they did before the day (by
event time, after the spec's value filter and de-duplication, without the k-core: what the product
knows of them); the targets are all the items of their day that they had not interacted with before.
Multi-item metrics: Recall@K (share of the day's items in the top K), NDCG@K (several relevant
items, ideal DCG over min(K, targets)), HR@K (at least one). Slices: targets that are new items
(first seen on or after the model's training day d) and new users (first interaction on or after d).
A user with no history gets the most popular items, as `recommend` serves them. Candidates are the
active catalogue items; an ID model cannot score items it never trained on (their count is reported).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone

import numpy as np
import pyarrow.compute as pc

from jobs.contracts import NextDayResult
from jobs.lake import open_table, table_path
from jobs.schema import JobSpec
from jobs.spec import storage_options
from ray_jobs.data import read_catalogue
from ray_jobs.metrics import ScoreFn, call_scores, mask_scores

DAY = 86400
KS = (10, 20, 50)


def day_start(day: str) -> int:
    return int(datetime.combine(date.fromisoformat(day), datetime.min.time(), timezone.utc).timestamp())


@dataclass
class NextDay:
    """The queries of one day: per user their history (item ids, oldest first, and timestamps), the
    day's new items as targets, and what the slices need."""
    day: str
    users: np.ndarray
    histories: list[np.ndarray]
    times: list[np.ndarray]
    targets: list[np.ndarray]
    new_user: np.ndarray       # first interaction on or after the training day
    new_item: np.ndarray       # (num_items + 1,) bool: first seen on or after the training day
    popularity: np.ndarray     # interactions per item before the day (the fallback's ranking)
    num_items: int

    def __len__(self) -> int:
        return len(self.users)


def load_next_day(spec: JobSpec, versions: dict[str, int], day: str, trained_through: str | None = None) -> NextDay:
    """The queries of `day` from the published tables at `versions` (they must include the day's
    interactions). `trained_through`: the last day the judged models trained on (default: the day
    before): items and users first seen on or after it are the new ones."""
    start = day_start(day)
    since = day_start(trained_through) if trained_through else start - DAY
    opts = storage_options(spec)
    silver = open_table(table_path(spec, "interactions"), versions["interactions"], opts, "interactions")
    rows = silver.to_pyarrow_table(columns=["user_id", "item_id", "ts", "value"])
    rows = rows.filter(pc.less(rows["ts"], start + DAY))
    if spec.data.min_value is not None:
        rows = rows.filter(pc.greater_equal(rows["value"], spec.data.min_value))
    catalogue = read_catalogue(spec, versions["item_index"])
    users = open_table(table_path(spec, "user_index"), versions["user_index"], opts, "user_index") \
        .to_pyarrow_table(columns=["user_idx", "user_id"])
    item_of = {iid: i for i, iid in enumerate(catalogue.item_ids) if i}
    user_of = dict(zip(users["user_id"].to_pylist(), users["user_idx"].to_pylist()))
    u = np.asarray([user_of.get(x, 0) for x in rows["user_id"].to_pylist()], dtype=np.int64)
    i = np.asarray([item_of.get(x, 0) for x in rows["item_id"].to_pylist()], dtype=np.int64)
    ts = rows["ts"].to_numpy(zero_copy_only=False).astype(np.int64)
    known = (u > 0) & (i > 0)
    u, i, ts = u[known], i[known], ts[known]
    order = np.lexsort((i, ts, u))
    u, i, ts = u[order], i[order], ts[order]
    n = catalogue.num_items
    first_seen = np.full(n + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_seen, i, ts)
    before = ts < start
    popularity = np.bincount(i[before], minlength=n + 1)
    popularity[0] = 0
    out_users, hist, times, targets, new_user = [], [], [], [], []
    bounds = np.flatnonzero(np.diff(u)) + 1
    for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(u)]])):
        if not (ts[a:b] >= start).any():
            continue
        past = before[a:b]
        h_items, h_ts = i[a:b][past], ts[a:b][past]
        seen = set(h_items.tolist())
        day_items = [x for x in dict.fromkeys(i[a:b][~past].tolist()) if x not in seen]
        if not day_items:
            continue
        out_users.append(int(u[a]))
        hist.append(h_items)
        times.append(h_ts)
        targets.append(np.asarray(day_items, dtype=np.int64))
        new_user.append(ts[a] >= since)
    new_item = first_seen >= since
    new_item[0] = False  # padding (0) fills short lists: never a new item
    return NextDay(day, np.asarray(out_users, dtype=np.int64), hist, times, targets, np.asarray(new_user, bool),
                   new_item, popularity, n)


def rank_lists(score: ScoreFn, q: NextDay, candidates: np.ndarray, k: int, batch_size: int = 512,
               max_len: int | None = None) -> np.ndarray:
    """(users, k) top items for each query: the model's for users with a history (scored as of the
    day's start), the most popular candidates for the others; 0 where fewer than k items remain."""
    top = np.zeros((len(q), k), dtype=np.int64)
    with_history = [j for j in range(len(q)) if len(q.histories[j])]
    for s in range(0, len(with_history), batch_size):
        rows = with_history[s:s + batch_size]
        hist = [q.histories[j][-max_len:] if max_len else q.histories[j] for j in rows]
        stamps = [np.append(q.times[j][-len(h):], day_start(q.day)) for j, h in zip(rows, hist)]
        scores = mask_scores(call_scores(score, hist, stamps).float(), hist, candidates)
        best = scores.topk(min(k, scores.shape[1]), dim=1)
        ids = np.where(np.isneginf(best.values.numpy()), 0, best.indices.numpy())
        top[rows, :ids.shape[1]] = ids
    cold = [j for j in range(len(q)) if not len(q.histories[j])]
    if cold:
        order = np.lexsort((np.arange(len(q.popularity)), -q.popularity))
        order = order[(order > 0) & candidates[order]][:k]
        top[cold, :len(order)] = order
    return top


def list_metrics(top: np.ndarray, targets: list[np.ndarray], ks=KS) -> dict[str, float]:
    """Recall@K, NDCG@K (several relevant items) and HR@K of ranked lists against target sets."""
    out: dict[str, float] = {"users": int(len(targets))}
    if not len(targets):
        return out
    for k in ks:
        recall, ndcg, hit = [], [], []
        discount = 1.0 / np.log2(np.arange(2, k + 2))
        for row, t in zip(top[:, :k], targets):
            rel = np.isin(row, t) & (row > 0)
            recall.append(rel.sum() / len(t))
            ndcg.append(float((rel * discount[:len(row)]).sum() / discount[:min(k, len(t))].sum()))
            hit.append(float(rel.any()))
        out[f"recall@{k}"], out[f"ndcg@{k}"], out[f"hr@{k}"] = (float(np.mean(x)) for x in (recall, ndcg, hit))
    return out


def evaluate_next_day(score: ScoreFn, q: NextDay, candidates: np.ndarray, scorable: np.ndarray | None = None,
                      max_len: int | None = None, ks=KS) -> NextDayResult:
    """Next-day metrics of one model: overall, for the targets that are new items (each user's new
    items only, users who had any), for new users; the share of hits that are new items; how many
    candidates the model could not score."""
    top = rank_lists(score, q, candidates, max(ks), max_len=max_len)
    result = NextDayResult(q.day, list_metrics(top, q.targets, ks))
    fresh = [(j, t[q.new_item[t]]) for j, t in enumerate(q.targets) if q.new_item[t].any()]
    if fresh:
        rows = [j for j, _ in fresh]
        result.slices["new_items"] = list_metrics(top[rows], [t for _, t in fresh], ks)
    if q.new_user.any():
        rows = np.flatnonzero(q.new_user)
        result.slices["new_users"] = list_metrics(top[rows], [q.targets[j] for j in rows], ks)
    hits = [(row[np.isin(row, t)]) for row, t in zip(top[:, :10], q.targets)]
    hit_items = np.concatenate(hits) if hits else np.zeros(0, np.int64)
    m = result.metrics
    m["new_item_hit_share@10"] = float(q.new_item[hit_items].mean()) if len(hit_items) else 0.0
    m["new_items_recommended@10"] = int(len(np.unique(top[:, :10][q.new_item[top[:, :10]]])))
    m["candidates"] = int(candidates.sum())
    m["unscorable_items"] = 0 if scorable is None else int((candidates & ~scorable).sum())
    m["new_items_in_targets"] = int(sum(q.new_item[t].sum() for t in q.targets))
    return result
