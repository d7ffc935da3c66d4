"""The evaluation job: full-ranking metrics of trained models, users split over Ray tasks (on GPUs
when train.use_gpu), ranks and top lists gathered, metrics computed once from them — the same
numbers as the single-process evaluator. Several models are compared on the same data version.

    python -m ray_jobs.evaluate --spec S [--model models:/NAME@alias | PATH ...] [--split valid --split test] [--workers 2]
"""
from __future__ import annotations

import sys

from jobs.spec import JobSpec, absolute_paths
from ray_jobs.data import load_sequences
from ray_jobs.metrics import markdown_table
from ray_jobs.models.hllm import minilm_item_embeddings
from ray_jobs.runtime import DagsterReport, evaluate_distributed, init_ray, job_main, json_metadata, resolve_model


def run(spec: JobSpec, models: list[str] | None = None, splits: tuple[str, ...] = ("test",), workers: int = 2) -> dict:
    """Metrics of each model (a registry URI, a checkpoint file; default the training run's model.pt)
    on each split of the current read set of the gold tables; a model trained on another item
    catalogue is refused. Returns {"versions", "models": [{"model", "name", "version", <split>: metrics}]}."""
    spec = absolute_paths(spec)
    resolved = [resolve_model(spec, m) for m in (models or [None])]
    init_ray(spec)
    data = load_sequences(spec)
    item_emb = minilm_item_embeddings(spec.model, data.item_text)
    rows = []
    for r in resolved:
        row = {"model": r.label, "name": r.name, "version": r.version}
        for split in splits:
            result = evaluate_distributed(spec, r.path, split, workers, data, item_emb, r.cache_dir)
            row[split] = result["metrics"] | result["beyond_accuracy"]
        rows.append(row)
    return {"versions": data.versions, "splits": list(splits), "models": rows}


def dagster_report(spec: JobSpec, out: dict) -> DagsterReport:
    table = markdown_table({f"{r['model']} ({split})": {"metrics": r[split], "beyond_accuracy": r[split]}
                            for r in out["models"] for split in out["splits"]})
    return DagsterReport(metadata={"metrics": {"raw_value": table, "type": "md"}, "results": json_metadata(out["models"]),
                                   "delta_versions": json_metadata(out["versions"])}, checks={})


def main(argv: list[str] | None = None) -> int:
    def options(ap) -> None:
        ap.add_argument("--model", "--checkpoint", dest="models", action="append",
                        help="models:/NAME@alias or a checkpoint file, repeatable (default: the training run's model.pt)")
        ap.add_argument("--split", dest="splits", action="append", choices=["valid", "test"],
                        help="repeatable (default: test)")
        ap.add_argument("--workers", type=int, default=2)
    return job_main(__doc__, options, lambda spec, a: run(spec, a.models, tuple(a.splits or ["test"]), a.workers),
                    argv, dagster_report)


if __name__ == "__main__":
    sys.exit(main())
