"""The evaluation job: full-ranking metrics of a trained model, its users split over Ray tasks (on
GPUs when train.use_gpu), ranks and top lists gathered, metrics computed once from them — the same
numbers as the single-process evaluator.

    python -m ray_jobs.evaluate --spec S [--model models:/NAME@alias | PATH] [--split test] [--workers 2]
"""
from __future__ import annotations

import sys

from jobs.spec import JobSpec, absolute_paths
from ray_jobs.data import load_sequences
from ray_jobs.runtime import evaluate_distributed, init_ray, job_main, resolve_model


def run(spec: JobSpec, model: str | None = None, split: str = "test", workers: int = 2) -> dict:
    """Metrics of `model` (a registry URI, a checkpoint file, default the training run's model.pt)
    on the current gold tables; a model trained on another item catalogue is refused."""
    spec = absolute_paths(spec)
    resolved = resolve_model(spec, model)
    init_ray(spec)
    result = evaluate_distributed(spec, resolved.path, split, workers, load_sequences(spec), cache_dir=resolved.cache_dir)
    return result | {"model": resolved.label, "model_version": resolved.version}


def main(argv: list[str] | None = None) -> int:
    def options(ap) -> None:
        ap.add_argument("--model", "--checkpoint", dest="model",
                        help="models:/NAME@alias or a checkpoint file (default: the training run's model.pt)")
        ap.add_argument("--split", default="test", choices=["valid", "test"])
        ap.add_argument("--workers", type=int, default=2)
    return job_main(__doc__, options, lambda spec, a: run(spec, a.model, a.split, a.workers), argv)


if __name__ == "__main__":
    sys.exit(main())
