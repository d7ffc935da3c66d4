"""MLflow tracking and registry: runs, per-step metrics from rank 0, the recommender pyfunc, aliases.

Layout of a training run (experiment `tracking.experiment`):
- params: the resolved spec, flattened (`train.lr`, `model.dim`, ...), and the Delta versions read
- tags: git commit, spec name, `dagster.run_id` and `mlflow.parentRunId` when given
- metrics: per step `train/loss`, `train/lr`, `train/seq_per_s`, `train/tokens_per_s`; per epoch
  `valid/hr_at_10`, `valid/ndcg_at_10`, ...; at the end `final_test/...` and `final_valid/...` at every K; `system/*` (CPU, memory, GPU of rank 0's node)
- artifacts: `spec.yaml`, `deepspeed.json`, `plots/metrics_vs_k.png`, `plots/training_curves.png`,
  `model/` (the pyfunc, with checkpoint, spec and item-embedding cache inside)
- registry: model `tracking.model_name` (default: the spec name), new version aliased `challenger`
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
import subprocess
import time
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from jobs.spec import JobSpec, dump_spec, tracking_uri
from ray_jobs.checkpoint import load_model, read_model
from ray_jobs.loop import Reporter
from ray_jobs.models.hllm import cache_file
from ray_jobs.scoring import scorer, top_k

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def model_name(spec: JobSpec) -> str:
    return spec.registered_model_name()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(doc: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def start_run(spec: JobSpec, run_name: str, kind: str, extra_params: dict | None = None,
              artifacts: dict[str, str] | None = None) -> str:
    """Create (not activate) a run with the spec as params and tags; returns its id. `artifacts`
    maps artifact file names to text content (spec, DeepSpeed config)."""
    uri = tracking_uri(spec)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec.tracking.experiment,
                                                                    artifact_location=artifact_location(uri))
    tags = {"llmrec.kind": kind, "llmrec.spec": spec.name, "git.commit": git_commit(), "mlflow.runName": run_name}
    if spec.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = spec.tracking.parent_run_id
    if spec.tracking.dagster_run_id:
        tags["dagster.run_id"] = spec.tracking.dagster_run_id
    if spec.tracking.dagster_asset:
        tags["dagster.asset_key"] = spec.tracking.dagster_asset
    run = client.create_run(exp_id, tags=tags, run_name=run_name)
    params = flatten(spec.model_dump(mode="json"))
    params.update({k: str(v) for k, v in (extra_params or {}).items()})
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    for name, text in {"spec.yaml": dump_spec(spec), **(artifacts or {})}.items():
        client.log_text(run.info.run_id, text, name)
    return run.info.run_id


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (`<db folder>/mlruns`): MLflow's default,
    `./mlruns` in the working directory, is a temporary copy of the project for a submitted job.
    A tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlruns").as_uri()
    return None


@contextmanager
def failed_on_error(spec: JobSpec, run_id: str):
    """Mark the run FAILED when the block raises (else it would stay RUNNING forever), and re-raise."""
    try:
        yield
    except BaseException:
        MlflowClient(tracking_uri(spec)).set_terminated(run_id, status="FAILED")
        raise


def metric_key(name: str) -> str:
    """MLflow metric names allow no '@': hr@10 -> hr_at_10."""
    return name.replace("@", "_at_")


class MetricLogger(Reporter):
    """Buffered metric logging to one run by id (rank 0 of a Ray Train worker group), with the
    node's CPU / memory / GPU utilisation as MLflow `system/*` metrics."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 50, system_metrics_every: float | None = None) -> None:
        self.client, self.run_id, self.flush_every = MlflowClient(uri), run_id, flush_every
        self.buffer: list = []
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        if system_metrics_every is None:
            system_metrics_every = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 5))
        self.system = SystemMetricsMonitor(run_id, sampling_interval=system_metrics_every, tracking_uri=uri,
                                           resume_logging=True)
        self.system.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.buffer += [mlflow.entities.Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if v == v]
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def epoch(self, record: dict, monitor: str) -> None:
        self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 900):
            self.client.log_batch(self.run_id, metrics=self.buffer[i:i + 900])
        self.buffer = []

    def close(self) -> None:
        self.flush()
        self.system.finish()


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """pyfunc: item-id histories -> top-K item ids with scores, history masked.

    Input: a DataFrame with a `history` column (lists of item ids, oldest first) or a list of
    lists. Params: `k` (default 10). Output: a DataFrame with `item_ids` and `scores` lists.
    The weights are read as data (`checkpoint.load_model`), never unpickled as code."""

    def load_context(self, context) -> None:
        cache = context.artifacts.get("item_cache")
        self.model, ckpt = load_model(context.artifacts["checkpoint"], cache_dir=os.path.dirname(cache) if cache else None)
        self.score = scorer(self.model, ckpt.spec.data.max_seq_len)
        self.num_items = ckpt.num_items

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        histories = list(model_input["history"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        histories = [np.asarray([i for i in h if 0 < int(i) <= self.num_items], dtype=np.int64) for h in histories]
        ids, scores = top_k(self.score, histories, min(k, self.num_items), batch_size=1024)
        return pd.DataFrame({"item_ids": [r.tolist() for r in ids], "scores": [r.tolist() for r in scores]})


def log_recommender(spec: JobSpec, run_id: str, checkpoint_file: str, alias: str = "challenger") -> int:
    """Log the pyfunc (checkpoint, and a cached-mode HLLM's item-embedding cache, inside; our code
    with it) to the run, register it under the spec's model name, point `alias` at the new version."""
    uri = tracking_uri(spec)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    ckpt = read_model(checkpoint_file)
    artifacts = {"checkpoint": checkpoint_file}
    item_cache = cache_file(ckpt.spec.model, ckpt.versions.get("item_index"))
    if item_cache:
        artifacts["item_cache"] = item_cache
    example = pd.DataFrame({"history": [[1, 2, 3]]})
    signature = mlflow.models.infer_signature(example, pd.DataFrame({"item_ids": [[4, 5]], "scores": [[0.9, 0.8]]}),
                                              params={"k": 10})
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=RecommenderModel(), artifacts=artifacts,
            code_paths=[str(PROJECT_ROOT / "jobs"), str(PROJECT_ROOT / "ray_jobs")],
            signature=signature, registered_model_name=model_name(spec))
    version = int(info.registered_model_version)
    MlflowClient(uri).set_registered_model_alias(model_name(spec), alias, version)
    return version


def publish(spec: JobSpec, run_id: str, model_path: str, metrics: dict[str, float], documents: dict[str, object],
            plots: dict[str, Callable[[str], str]], tags: dict[str, object], register: bool) -> tuple[int | None, dict]:
    """A finished run's results into its MLflow run: final metrics, JSON documents, plots (each drawn
    by its function into `plots/` beside the model file, and kept there), tags; then the model
    registered. Returns (registered version or None, plot name -> file)."""
    mlflow.set_tracking_uri(tracking_uri(spec))
    plot_dir = os.path.join(os.path.dirname(model_path), "plots")
    os.makedirs(plot_dir, exist_ok=True)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})
        for name, doc in documents.items():
            mlflow.log_dict(doc, name)
        files = {name: draw(os.path.join(plot_dir, name)) for name, draw in plots.items()}
        for path in files.values():
            mlflow.log_artifact(path, "plots")
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
    return (log_recommender(spec, run_id, model_path) if register else None), files


def run_link(spec: JobSpec, run_id: str) -> str:
    """Where to look at a run: the tracking server's page for it, or the store and run id."""
    uri = tracking_uri(spec)
    if uri.startswith(("http://", "https://")):
        exp = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"{uri} run {run_id} (mlflow ui --backend-store-uri {uri})"


def final_metrics(prefix: str, result: dict) -> dict[str, float]:
    """`prefix/metric` for every float in an evaluation result's accuracy and beyond-accuracy parts."""
    flat = result["metrics"] | result.get("beyond_accuracy", {})
    return {f"{prefix}/{k}": v for k, v in flat.items() if isinstance(v, float)}


def plot_metrics_vs_k(results: dict[str, dict], path: str) -> str:
    """HR@K and NDCG@K curves, one line per split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for split, r in results.items():
        ks = sorted(int(k.split("@")[1]) for k in r["metrics"] if k.startswith("hr@"))
        for ax, metric in zip(axes, ("hr", "ndcg")):
            ax.plot(ks, [r["metrics"][f"{metric}@{k}"] for k in ks], marker="o", label=split)
            ax.set_xscale("log")
            ax.set_xlabel("K")
            ax.set_title(f"{metric.upper()}@K")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(history: list[dict], path: str) -> str:
    """Training loss and validation NDCG@10 by epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    a.set_title("train loss")
    a.set_xlabel("epoch")
    valid = [h for h in history if "valid_ndcg@10" in h]
    b.plot([h["epoch"] for h in valid], [h["valid_ndcg@10"] for h in valid], marker="o")
    b.set_title("valid NDCG@10")
    b.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_alignment_curves(histories: dict[str, list[dict]], path: str, smooth: int = 10) -> str:
    """Mean reward and effective gradient norm per step, one line per method (moving average)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, history in histories.items():
        steps = np.asarray([h["step"] for h in history])
        for ax, key in zip(axes, ("reward_mean", "effective_grad_norm")):
            y = np.asarray([h[key] for h in history], dtype=float)
            w = max(1, min(smooth, len(y)))
            ax.plot(steps[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), label=method)
    axes[0].set_title("mean list reward (rollouts)")
    axes[1].set_title("effective gradient norm (d policy loss / d logits)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
