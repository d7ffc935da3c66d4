"""Batch recommendations: top-K for every user into the `gold/recommendations` Delta table.

    python -m ray_jobs.recommend --spec S [--model models:/NAME@champion | --checkpoint PATH] [--k 100]

Each user's whole known sequence (everything up to and including the test item) is the history;
items in it are never recommended. Users are split over Ray tasks; the driver commits one Delta
write that replaces only the rows of the same model version, so a rerun is idempotent and other
versions' rows stay for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from jobs.lake import table_path
from jobs.spec import JobSpec, absolute_paths, load_spec, tracking_uri
from ray_jobs.data import load_sequences


def full_histories(data) -> tuple[np.ndarray, list[np.ndarray]]:
    """Users and their full sequences (test history + test target)."""
    t = data.test
    return t.users, [np.append(h, y) for h, y in zip(t.histories, t.targets)]


def _top_task(checkpoint: str, histories: list[np.ndarray], k: int, batch_size: int):
    import torch

    from ray_jobs.metrics import mask_scores
    from ray_jobs.trainer import load_trained, scorer
    model, ckpt = load_trained(checkpoint)
    score = scorer(model, ckpt["spec"]["data"]["max_seq_len"])
    ids, vals = [], []
    for i in range(0, len(histories), batch_size):
        h = histories[i:i + batch_size]
        top = torch.topk(mask_scores(score(h).float(), h), k, dim=1)
        ids.append(top.indices.numpy())
        vals.append(top.values.numpy())
    return np.concatenate(ids), np.concatenate(vals)


def recommendations_table(users: np.ndarray, user_ids: dict, item_ids: list[str], top: np.ndarray, scores: np.ndarray,
                          model_name: str, model_version: str) -> pa.Table:
    """One row per (user, rank): ids, score and the model that produced it."""
    n, k = top.shape
    created = datetime.now(timezone.utc)
    return pa.table({
        "user_idx": pa.array(np.repeat(users, k).astype(np.int32)),
        "user_id": pa.array([user_ids.get(int(u)) for u in np.repeat(users, k)], pa.string()),
        "rank": pa.array(np.tile(np.arange(1, k + 1), n).astype(np.int32)),
        "item_idx": pa.array(top.ravel().astype(np.int32)),
        "item_id": pa.array([item_ids[i] for i in top.ravel()], pa.string()),
        "score": pa.array(scores.ravel().astype(np.float32)),
        "model_name": pa.array([model_name] * (n * k), pa.string()),
        "model_version": pa.array([model_version] * (n * k), pa.string()),
        "created_at": pa.array([created] * (n * k), pa.timestamp("us", tz="UTC")),
    })


def write_recommendations(spec: JobSpec, table: pa.Table, model_version: str) -> int:
    """Replace this model version's rows (one commit); returns the table version."""
    from deltalake import DeltaTable, write_deltalake
    path = table_path(spec, "recommendations")
    opts = spec.lake.storage_options or None
    try:
        DeltaTable(path, storage_options=opts)
        exists = True
    except Exception:  # delta-rs: TableNotFoundError
        exists = False
    safe = model_version.replace("'", "''")
    write_deltalake(path, table, mode="overwrite", storage_options=opts,
                    predicate=f"model_version = '{safe}'" if exists else None)
    return DeltaTable(path, storage_options=opts).version()


def resolve_model(spec: JobSpec, model_uri: str | None, checkpoint: str | None) -> tuple[str, str, str]:
    """(checkpoint file, model name, version tag) from a registry URI, a file, or the run's model.pt."""
    if model_uri:
        import mlflow
        mlflow.set_tracking_uri(tracking_uri(spec))
        mlflow.set_registry_uri(tracking_uri(spec))
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tempfile.mkdtemp(prefix="llmrec-model-"))
        path = os.path.join(local, "artifacts", "model.pt")
        if not os.path.exists(path):
            found = [os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs if f == "model.pt"]
            if not found:
                raise FileNotFoundError(f"model {model_uri}: no model.pt checkpoint inside")
            path = found[0]
        name, _, ref = model_uri.removeprefix("models:/").partition("@")
        client = mlflow.MlflowClient()
        version = client.get_model_version_by_alias(name, ref).version if ref else model_uri.rsplit("/", 1)[-1]
        return path, name, str(version)
    from ray_jobs.train import model_file
    path = checkpoint or model_file(spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained model at {path}: train first or pass --checkpoint / --model")
    return path, spec.tracking.model_name or spec.name, f"file:{os.path.abspath(path)}"


def run(spec: JobSpec, model_uri: str | None = None, checkpoint: str | None = None, k: int = 100,
        workers: int = 2) -> dict:
    import ray

    from deltalake import DeltaTable

    from ray_jobs.train import init_ray
    spec = absolute_paths(spec)
    path, name, version = resolve_model(spec, model_uri, checkpoint)
    data = load_sequences(spec)
    users, histories = full_histories(data)
    k = min(k, data.num_items - 1)
    init_ray(spec)
    task = ray.remote(num_cpus=1)(_top_task)
    parts = ray.get([task.remote(path, histories[r::workers], k, spec.eval.batch_size) for r in range(workers)])
    top = np.empty((len(users), k), dtype=np.int64)
    scores = np.empty((len(users), k), dtype=np.float32)
    for r, (ids, vals) in enumerate(parts):
        top[r::workers], scores[r::workers] = ids, vals
    uidx = DeltaTable(table_path(spec, "user_index"), storage_options=spec.lake.storage_options or None,
                      version=None).to_pyarrow_table(columns=["user_idx", "user_id"])
    user_ids = dict(zip(uidx["user_idx"].to_pylist(), uidx["user_id"].to_pylist()))
    iidx = DeltaTable(table_path(spec, "item_index"), storage_options=spec.lake.storage_options or None,
                      version=data.versions["item_index"]).to_pyarrow_table(columns=["item_idx", "item_id"])
    item_ids = [""] * (data.num_items + 1)
    for i, iid in zip(iidx["item_idx"].to_pylist(), iidx["item_id"].to_pylist()):
        item_ids[i] = iid
    table = recommendations_table(users, user_ids, item_ids, top, scores, name, version)
    delta_version = write_recommendations(spec, table, version)
    return {"table": table_path(spec, "recommendations"), "delta_version": delta_version, "users": int(len(users)),
            "k": k, "model_name": name, "model_version": version}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--model", help="registry URI, e.g. models:/NAME@champion (default: the run's model.pt)")
    ap.add_argument("--checkpoint", help="a model checkpoint file instead of the registry")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    out = run(load_spec(args.spec, args.overrides), args.model, args.checkpoint, args.k, args.workers)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
