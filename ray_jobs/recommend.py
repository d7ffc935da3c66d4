"""The batch recommendation job: top-K for every user into the `gold/recommendations` Delta table.

    python -m ray_jobs.recommend --spec S [--model models:/NAME@champion | PATH] [--k 100]

Every user of `user_index` gets up to K items, chosen among the active catalogue items the model can
score (an HLLM scores items new since its training from their text; an ID model skips them). A
user's whole known sequence (everything up to and including the test item; for a user with fewer
than 3 interactions, who has no test row, the 1–2 items of the train row) is the model's history;
items in it are never recommended, nor are padding, inactive items or anything the model scored
-inf: where fewer than K items remain a user gets fewer rows, and the job says how many. A user with
no sequence at all gets the most popular active items. The job reports how many users each case
covered. Users are split over Ray tasks on GPUs or a cluster of several nodes (on a one-node CPU cluster
the driver scores them itself: `ray_jobs.runtime.scores_on_tasks`); the driver commits one Delta
write that replaces only the rows of the same model name and version, so a rerun is idempotent and
other models' and versions' rows stay for comparison.
"""
from __future__ import annotations

import sys
import warnings
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from jobs.allocator import ray_runtime_env
from jobs.contracts import RecommendOutcome, meta
from jobs.lake import table_path
from jobs.schema import JobSpec
from jobs.spec import absolute_paths, storage_options
from ray_jobs.catalogue import Catalogue
from ray_jobs.data import load_sequences
from ray_jobs.entrypoint import DagsterReport, job_main
from ray_jobs.registry import resolve_model
from ray_jobs.runtime import init_ray, ray_get, scores_on_tasks
from ray_jobs.scoring import load_for_catalogue, top_k


def full_histories(data) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], int]:
    """Users, their full known sequences and those sequences' timestamps: test history + test
    target, and for users without a test row (fewer than 3 interactions) their train row. Each
    timestamp list ends with the time the recommendations are for (what a model whose time bias
    reads the prediction's time takes): the data's latest event, so a rerun on the same tables
    gives the same lists. Returns also how many users are such short ones."""
    t = data.test
    seqs = {int(u): (np.append(h, y), np.append(ts, yt))
            for u, h, y, ts, yt in zip(t.users, t.histories, t.targets, t.times, t.target_times)}
    short = {int(u): (s, ts) for u, s, ts in zip(data.train_users, data.train, data.train_times)
             if int(u) not in seqs and len(s)}
    seqs.update(short)
    users = np.asarray(sorted(seqs), dtype=np.int64)
    as_of = max((int(ts.max()) for _, ts in seqs.values() if len(ts)), default=0)
    return (users, [seqs[int(u)][0] for u in users], [np.append(seqs[int(u)][1], as_of) for u in users],
            len(short))


def popular_top(popularity: np.ndarray, n_users: int, k: int, active: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The K most popular items (training interactions; ties by id; only `active` ones when given)
    for each of `n_users` users without any known item, with their share of interactions as the score."""
    order = np.lexsort((np.arange(len(popularity)), -popularity))
    order = order[(order != 0) & (True if active is None else active[order])][:k]
    share = (popularity[order] / max(int(popularity.sum()), 1)).astype(np.float32)
    return np.tile(order, (n_users, 1)), np.tile(share, (n_users, 1))


def _top_task(checkpoint: str, cache_dir: str | None, catalogue: Catalogue, item_index_version: int,
              histories: list[np.ndarray], times: list[np.ndarray], k: int, batch_size: int, use_gpu: bool):
    loaded = load_for_catalogue(checkpoint, catalogue, item_index_version, cache_dir)
    if use_gpu:
        loaded.model.to("cuda")
    ids, scores = top_k(loaded.score_function(), histories, k, batch_size, times, catalogue.active)
    return ids, scores, int((catalogue.active & ~loaded.scorable).sum())


def recommendations_table(users: np.ndarray, user_ids: dict, item_ids: list[str], top: np.ndarray, scores: np.ndarray,
                          model_name: str, model_version: str) -> pa.Table:
    """One row per (user, rank) of every recommendation that is an item with a finite score: ids,
    score and the model that produced it (a user with fewer items left gets fewer rows)."""
    n, k = top.shape
    keep = (top > 0) & np.isfinite(scores)
    rank = np.cumsum(keep, axis=1)
    user_of = np.repeat(users, k).reshape(n, k)[keep]
    rows = int(keep.sum())
    created = datetime.now(timezone.utc)
    return pa.table({
        "user_idx": pa.array(user_of.astype(np.int32)),
        "user_id": pa.array([user_ids.get(int(u)) for u in user_of], pa.string()),
        "rank": pa.array(rank[keep].astype(np.int32)),
        "item_idx": pa.array(top[keep].astype(np.int32)),
        "item_id": pa.array([item_ids[i] for i in top[keep]], pa.string()),
        "score": pa.array(scores[keep].astype(np.float32)),
        "model_name": pa.array([model_name] * rows, pa.string()),
        "model_version": pa.array([model_version] * rows, pa.string()),
        "created_at": pa.array([created] * rows, pa.timestamp("us", tz="UTC")),
    })


def write_recommendations(spec: JobSpec, table: pa.Table, model_name: str, model_version: str) -> int:
    """Replace this model's rows of this version (one commit; other models' and versions' rows
    stay); returns the table version. Only a missing table is created: any other error is raised."""
    path = table_path(spec, "recommendations")
    opts = storage_options(spec)
    try:
        DeltaTable(path, storage_options=opts)
        exists = True
    except TableNotFoundError:
        exists = False

    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    predicate = f"model_name = {quoted(model_name)} AND model_version = {quoted(model_version)}"
    write_deltalake(path, table, mode="overwrite", storage_options=opts, predicate=predicate if exists else None)
    return DeltaTable(path, storage_options=opts).version()


def run(spec: JobSpec, model: str | None = None, k: int = 100, workers: int = 2,
        tasks: bool | None = None) -> RecommendOutcome:
    """Top-`k` of every user of `user_index` into `gold/recommendations` (see the module); `tasks=None`
    decides by `scores_on_tasks` whether `workers` Ray tasks or the driver score the users."""
    import ray
    spec = absolute_paths(spec)
    resolved = resolve_model(spec, model)
    data = load_sequences(spec)
    users, histories, times, n_short = full_histories(data)
    catalogue = data.catalogue
    k = max(1, min(k, int(catalogue.active.sum())))
    init_ray(spec)
    use_gpu = spec.train.use_gpu
    if tasks if tasks is not None else scores_on_tasks(spec):
        task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0,
                          runtime_env=ray_runtime_env(spec))(_top_task)
        parts = ray_get([task.remote(resolved.path, resolved.cache_dir, catalogue, data.versions["item_index"],
                                     histories[r::workers], times[r::workers], k, spec.eval.batch_size, use_gpu)
                         for r in range(workers)])
        top = np.empty((len(users), k), dtype=np.int64)
        scores = np.empty((len(users), k), dtype=np.float32)
        for r, (ids, vals, _) in enumerate(parts):
            top[r::workers], scores[r::workers] = ids, vals
        unscorable = parts[0][2]
    else:
        top, scores, unscorable = _top_task(resolved.path, resolved.cache_dir, catalogue, data.versions["item_index"],
                                            histories, times, k, spec.eval.batch_size, False)
    opts = storage_options(spec)
    uidx = DeltaTable(table_path(spec, "user_index"), storage_options=opts, version=data.versions.get("user_index")
                      ).to_pyarrow_table(columns=["user_idx", "user_id"])
    user_ids = dict(zip(uidx["user_idx"].to_pylist(), uidx["user_id"].to_pylist()))
    cold = np.asarray(sorted(set(user_ids) - set(users.tolist())), dtype=np.int64)
    if len(cold):
        pop_top, pop_scores = popular_top(data.popularity, len(cold), k, catalogue.active)
        pad = k - pop_top.shape[1]
        if pad:
            pop_top = np.hstack([pop_top, np.zeros((len(cold), pad), np.int64)])
            pop_scores = np.hstack([pop_scores, np.full((len(cold), pad), -np.inf, np.float32)])
        users, top, scores = np.concatenate([users, cold]), np.vstack([top, pop_top]), np.vstack([scores, pop_scores])
    table = recommendations_table(users, user_ids, catalogue.item_ids, top, scores, resolved.name, resolved.version)
    short_lists = int((((top > 0) & np.isfinite(scores)).sum(1) < k).sum())
    if short_lists:
        warnings.warn(f"recommend: {short_lists} users got fewer than {k} items (fewer unseen, active items the model "
                      "can score remain for them)", RuntimeWarning)
    delta_version = write_recommendations(spec, table, resolved.name, resolved.version)
    preview = table.slice(0, min(10, table.num_rows)).select(["user_id", "rank", "item_id", "score"]).to_pylist()
    by_source = {"model": int(len(users) - len(cold) - n_short), "model_short_history": n_short,
                 "popularity": int(len(cold))}
    return RecommendOutcome(table_path(spec, "recommendations"), delta_version, int(len(users)), by_source,
                            table.num_rows, k, short_lists, unscorable, resolved.name, resolved.version, data.versions,
                            preview)


def dagster_report(spec: JobSpec, out: RecommendOutcome) -> DagsterReport:
    lines = ["| user_id | rank | item_id | score |", "|---|---:|---|---:|"]
    lines += [f"| {r['user_id']} | {r['rank']} | {r['item_id']} | {r['score']:.4f} |" for r in out.preview]
    return DagsterReport(metadata={
        "path": meta(out.table, "path"), "delta_version": out.delta_version, "users": out.users,
        "users_by_source": meta(out.users_by_source, "json"), "rows": out.rows, "k": out.k,
        "users_with_fewer_than_k": out.users_with_fewer_than_k, "unscorable_items": out.unscorable_items,
        "model_name": out.model_name, "model_version": out.model_version,
        "delta_versions_read": meta(out.versions, "json"), "preview": meta("\n".join(lines), "md")}, checks={})


def main(argv: list[str] | None = None) -> int:
    def options(ap) -> None:
        ap.add_argument("--model", "--checkpoint", dest="model",
                        help="models:/NAME@champion or a checkpoint file (default: the training run's model.pt)")
        ap.add_argument("--k", type=int, default=100)
        ap.add_argument("--workers", type=int, default=2, help="Ray tasks scoring the users, on GPUs or a cluster of "
                        "several nodes (a one-node CPU cluster scores in the driver: ray_jobs.runtime.scores_on_tasks)")
    return job_main(__doc__, options, lambda spec, a: run(spec, a.model, a.k, a.workers), argv, dagster_report)


if __name__ == "__main__":
    sys.exit(main())
