"""Distributed full-ranking evaluation: users split over Ray tasks (or Train workers), ranks and top
lists gathered, metrics computed once from them — the same numbers as the single-process evaluator.

    python -m ray_jobs.evaluate --spec S [--checkpoint PATH] [--split test] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jobs.spec import JobSpec, load_spec
from ray_jobs.data import SeqData, load_sequences
from ray_jobs.metrics import rank_and_topk, summarize, usable_ks


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    return np.arange(rank, n, world)


def rank_rows(spec: JobSpec, score, data: SeqData, split: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, target ranks, top-k_max lists) for the given users of a split."""
    s = data.split(split)
    k_max = max(usable_ks(spec.eval.ks, data.num_items))
    ranks, top = rank_and_topk(score, [s.histories[i] for i in rows], s.targets[rows], k_max, spec.eval.batch_size)
    return rows, ranks, top


def merge(spec: JobSpec, data: SeqData, split: str, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
          item_emb: np.ndarray | None = None) -> dict:
    """Metrics of a split from every shard's (rows, ranks, top), put back in user order."""
    s = data.split(split)
    rows = np.concatenate([p[0] for p in parts])
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(rows[order], np.arange(len(s.targets))):
        raise ValueError(f"evaluation shards of split {split} do not cover its {len(s.targets)} users exactly once")
    ranks = np.concatenate([p[1] for p in parts])[order]
    top = np.concatenate([p[2] for p in parts])[order]
    e = spec.eval
    return summarize(ranks, top, np.asarray([len(h) for h in s.histories]), s.targets, data.num_items, data.popularity,
                     e.ks, item_emb, e.tail_share, e.cold_item_max, e.short_history_max)


def _rank_task(checkpoint: str, spec_doc: dict, versions: dict, split: str, rank: int, world: int,
               cache_dir: str | None = None):
    from ray_jobs.trainer import load_trained, scorer
    spec = JobSpec.model_validate(spec_doc)
    data = load_sequences(spec, versions)
    model, _ = load_trained(checkpoint, cache_dir=cache_dir)
    rows = shard_rows(len(data.split(split).targets), rank, world)
    return rank_rows(spec, scorer(model, spec.data.max_seq_len), data, split, rows)


def evaluate_distributed(spec: JobSpec, checkpoint: str, split: str, workers: int, data: SeqData | None = None,
                         item_emb: np.ndarray | None = None, cache_dir: str | None = None) -> dict:
    """Full-ranking metrics of a checkpoint, its users spread over `workers` Ray tasks (each reads
    the gold tables itself at the pinned versions and loads the model; `cache_dir` points a
    cached-mode HLLM at its item-embedding cache)."""
    import ray
    data = data or load_sequences(spec)
    task = ray.remote(num_cpus=1)(_rank_task)
    parts = ray.get([task.remote(checkpoint, spec.model_dump(mode="json"), data.versions, split, r, workers,
                                 cache_dir) for r in range(workers)])
    result = merge(spec, data, split, parts, item_emb)
    result.update(split=split, versions=data.versions, workers=workers)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--checkpoint", help="model checkpoint (default: the run's registered model file)")
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, args.overrides)
    from ray_jobs.train import init_ray, model_file
    init_ray(spec)
    result = evaluate_distributed(spec, args.checkpoint or model_file(spec), args.split, args.workers)
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
