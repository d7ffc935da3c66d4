"""The training job: the spec's recommender trained by the one loop (`ray_jobs.loop`), on Ray Train
workers each running a DeepSpeed engine, or in this process.

    python -m ray_jobs.train --spec S [--set k=v] [--run-name NAME] [--no-register]
    ray job submit --working-dir . -- python -m ray_jobs.train --spec S
    llmrec train --local --spec S            (one process: `train_local`)

On Ray each worker reads the gold Delta tables itself (delta-rs, at the versions the driver
pinned), takes every world-th row of each global batch and its share of the step's negative pool
(all-gathered in the loss). Checkpoints go through `ray.train.report`; rerunning with the same run
name resumes from the latest, and `FailureConfig` restarts a lost worker group from it. The driver
writes `<train.storage_path>/<run>/model.pt`, evaluates it on valid and test, logs everything to
MLflow and registers the model (alias `challenger`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from jobs.contracts import Check, ModelRecord, TrainOutcome, TrainWorkerConfig, markdown_table, meta
from jobs.schema import JobSpec
from jobs.spec import absolute_paths, tracking_uri
from ray_jobs import tracking
from ray_jobs.checkpoint import read_model, save_model
from ray_jobs.data import SeqData, load_sequences
from ray_jobs.distributed import deepspeed_config
from ray_jobs.entrypoint import DagsterReport, job_main, markdown_image, run_options
from ray_jobs.loop import LocalBackend, Reporter, known_items, run_epochs, training_state, warm_start
from ray_jobs.models import build_model
from ray_jobs.models.baselines import Popularity
from ray_jobs.models.llm import minilm_item_embeddings
from ray_jobs.registry import check_storage_path, model_file
from ray_jobs.runtime import (DeepSpeedBackend, check_previous_run, evaluate_distributed, final_model, fit, init_ray,
                              worker_context)
from ray_jobs.scoring import evaluate_split
from ray_jobs.tokenizer import fit_tokenizer


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    epochs_run: int
    steps: int
    seconds: float
    stopped: str
    checkpoint: str          # the model the run ships (best.pt)
    history: list[dict]


def local_dir(spec: JobSpec) -> str:
    """Where a single-process run keeps its checkpoints: `<train.checkpoint_dir>/<name>/`."""
    return os.path.join(spec.train.checkpoint_dir, spec.name)


def train_local(spec: JobSpec, data: SeqData | None = None, resume: bool = True, reporter: Reporter = Reporter(),
                stop_after_epoch: int | None = None) -> TrainResult:
    """Train in this process, resuming from `<checkpoint_dir>/<name>/last.pt` unless `resume` is
    False; `stop_after_epoch` ends this call early, as an interruption would."""
    data = data or load_sequences(spec)
    start = warm_start(spec, data)
    if spec.model.kind == "generative" and start.path is None:
        fit_tokenizer(spec, data)
    state = training_state(spec, data, torch.device("cpu"), start.path)
    backend = LocalBackend(state, local_dir(spec))
    if resume:
        backend.restore()
    run_epochs(state, backend, data, reporter, stop_after_epoch)
    return TrainResult(state.best_metric, state.best_epoch, state.epoch, state.step, state.seconds, state.stopped,
                       backend.best, state.history)


def train_worker(config: dict) -> None:
    """One Ray Train worker: the loop over a DeepSpeed engine; rank 0 logs to MLflow."""
    cfg = TrainWorkerConfig.from_dict(config)
    spec = JobSpec.model_validate(cfg.spec)
    ctx = worker_context(spec, cfg.pid_dir)
    data = load_sequences(spec, cfg.versions, shard=(ctx.rank, ctx.world))  # this worker's users only
    state = training_state(spec, data, ctx.device, cfg.init_file)
    state.run_id = cfg.run_id
    known = known_items(read_model(cfg.init_file)) if cfg.init_file else None
    backend = DeepSpeedBackend(state, cfg.deepspeed, ctx.rank, ctx.world, ctx.device,
                               lambda: build_model(spec, data.item_text, known, data.versions))
    backend.restore()
    reporter = tracking.MetricLogger(tracking_uri(spec), cfg.run_id) if ctx.rank == 0 and cfg.run_id else Reporter()
    run_epochs(state, backend, data, reporter)


def run(spec: JobSpec, run_name: str | None = None, pid_dir: str | None = None, register: bool = True) -> TrainOutcome:
    """Train on Ray, write `<storage>/<run>/model.pt`, evaluate it, log it to MLflow and register it."""
    run_name = run_name or spec.name
    spec = absolute_paths(spec)
    check_storage_path(spec)
    previous = check_previous_run(spec, run_name, "train")  # a rerun of the name with other settings: refused first
    init_ray(spec)
    data = load_sequences(spec)  # the driver pins the versions; workers read them themselves
    start = warm_start(spec, data)
    ds_cfg = deepspeed_config(spec, spec.train.workers)
    run_id = tracking.start_run(spec, run_name, "train",
                                {**{f"delta_version.{k}": v for k, v in data.versions.items()}, "run_name": run_name},
                                {"deepspeed.json": json.dumps(ds_cfg, indent=2)}, resumes=previous)
    with tracking.failed_on_error(spec, run_id):
        documents = {}
        if spec.model.kind == "generative" and start.path is None:  # once, before the workers read its files
            documents["tokenizer.json"] = fit_tokenizer(spec, data, tracking.MetricLogger(tracking_uri(spec), run_id))
        config = TrainWorkerConfig(spec.model_dump(mode="json"), data.versions, ds_cfg, run_id, pid_dir, start.path)
        checkpoint = fit(spec, train_worker, config.to_dict(), run_name, "training")
        return finish(spec, run_name, run_id, checkpoint, data, start.tag, register, documents)


def finish(spec: JobSpec, run_name: str, run_id: str, checkpoint, data: SeqData, started: str,
           register: bool, documents: dict | None = None) -> TrainOutcome:
    """Driver side after fit: model.pt, evaluation on valid and test beside popularity, MLflow, registry
    (`documents`: more JSON documents for the run, e.g. the tokenizer stage's report)."""
    ckpt = final_model(checkpoint)
    out_file = save_model(model_file(spec, run_name), ckpt)
    p = ckpt.progress
    item_emb = minilm_item_embeddings(spec.model, data.item_text)  # for ILD
    results = evaluate_distributed(spec, out_file, ("valid", "test"), spec.train.workers, data, item_emb)
    popular = {split: evaluate_split(spec, Popularity(data.popularity).score, data, split, item_emb)
               for split in ("valid", "test")}
    metrics = {}
    for split in ("valid", "test"):
        metrics |= tracking.final_metrics("final", split, results[split])
        metrics |= tracking.final_metrics("popularity", split, popular[split])
    version, plots = tracking.publish(
        spec, run_id, out_file, metrics,
        documents={"evaluation.json": {split: r.to_dict() for split, r in results.items()}, **(documents or {})},
        plots={"metrics_vs_k.png": lambda path: tracking.plot_metrics_vs_k(results, path),
               "training_curves.png": lambda path: tracking.plot_training_curves(p.history, path)},
        tags={"best_epoch": p.best_epoch, "stopped": p.stopped, "restarts": p.restarts, "warm_start": started},
        register=register, catalogue=data.catalogue)
    model = ModelRecord(out_file, spec.registered_model_name(), version, data.versions, run_id)
    return TrainOutcome(run_name, run_id, model, p.best_epoch, p.epoch, p.step, p.restarts, p.stopped, p.seconds, started,
                        results["valid"].metrics, results["test"].metrics, popular["valid"].metrics, plots)


def dagster_report(spec: JobSpec, out: TrainOutcome) -> DagsterReport:
    """The trained_model asset's metadata, and its check: validation NDCG@10 above popularity's."""
    table = markdown_table({"popularity (valid)": out.popularity_valid, "trained (valid)": out.valid,
                            "trained (test)": out.test})
    return DagsterReport(
        metadata={**out.model.to_metadata(), "mlflow_run": tracking.run_link(spec, out.run_id),
                  "stopped": out.stopped, "epochs": out.epochs_run, "best_epoch": out.best_epoch,
                  "warm_start": out.warm_start, "train_seconds": round(out.seconds, 1),
                  "valid_ndcg@10": out.valid["ndcg@10"], "test_ndcg@10": out.test["ndcg@10"],
                  "metrics": meta(table, "md"),
                  "training_curve": markdown_image(out.plots["training_curves.png"], "training curve"),
                  "metrics_vs_k": markdown_image(out.plots["metrics_vs_k.png"], "metrics vs K")},
        checks={Check.BEATS_POPULARITY: (out.gain_over_popularity > spec.checks.min_gain_over_popularity, {
            "valid_ndcg@10": out.valid["ndcg@10"], "popularity_valid_ndcg@10": out.popularity_valid["ndcg@10"],
            "required_gain": spec.checks.min_gain_over_popularity})})


def main(argv: list[str] | None = None) -> int:
    options = run_options("the spec name")
    return job_main(__doc__, options, lambda spec, a: run(spec, a.run_name, register=not a.no_register), argv,
                    dagster_report)


if __name__ == "__main__":
    sys.exit(main())
