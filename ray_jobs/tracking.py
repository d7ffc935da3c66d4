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
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from jobs.contracts import EvalResult, Tag, final_metric, mlflow_metric
from jobs.provenance import commit
from jobs.secrets import flat_doc, mask_uri, public_doc, redact
from jobs.schema import JobSpec
from jobs.spec import dump_spec, tracking_uri
from ray_jobs.catalogue import Catalogue
from ray_jobs.entrypoint import on_stop, stop_requested
from ray_jobs.loop import Reporter
from ray_jobs.serving import Recommender, log_recommender


def flatten(doc: dict) -> dict[str, str]:
    """MLflow params: dotted keys, lists as JSON, everything else as text."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in flat_doc(doc).items()}


def start_run(spec: JobSpec, run_name: str, kind: str, extra_params: dict | None = None,
              artifacts: dict[str, str] | None = None, resumes: str | None = None) -> str:
    """Create (not activate) a run with the spec as params and tags; returns its id. `artifacts`
    maps artifact file names to text content (spec, DeepSpeed config). `resumes`: the run that wrote
    the checkpoint this one resumes from (a job stopped or lost, started again under its name); the
    two are linked by tags, and that run, if it was left RUNNING (its driver died), is ended KILLED.
    (A new run rather than the old one continued: the resumed job may run longer settings, and a
    run's params can't change.)"""
    uri = tracking_uri(spec)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec.tracking.experiment,
                                                                    artifact_location=artifact_location(uri))
    tags = {Tag.KIND: kind, Tag.SPEC: spec.name, Tag.COMMIT: commit() or "unknown", "mlflow.runName": run_name}
    if spec.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = spec.tracking.parent_run_id
    if spec.tracking.dagster_run_id:
        tags[Tag.DAGSTER_RUN] = spec.tracking.dagster_run_id
    if spec.tracking.dagster_asset:
        tags[Tag.DAGSTER_ASSET] = spec.tracking.dagster_asset
    if resumes:
        tags[Tag.RESUMES] = resumes
    run = client.create_run(exp_id, tags=tags, run_name=run_name)
    _open_runs[run.info.run_id] = uri
    with failed_on_error(spec, run.info.run_id):  # a run whose set-up fails is ended, never left RUNNING
        if resumes:
            link_resumed(client, resumes, run.info.run_id)
        params = flatten(public_doc(spec))
        params.update({k: str(v) for k, v in (extra_params or {}).items()})
        items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        for name, text in {"spec.yaml": dump_spec(spec), **(artifacts or {})}.items():
            client.log_text(run.info.run_id, text, name)
    return run.info.run_id


def link_resumed(client: MlflowClient, previous: str, run_id: str) -> None:
    """Tag the run a resume continues from (`Tag.RESUMED_BY`) and end it KILLED when its job left it
    RUNNING. A run the store no longer has, or has deleted, is let be; a link that can't be written
    is warned about, never the job's failure."""
    from mlflow.exceptions import MlflowException
    try:
        info = client.get_run(previous).info
        if info.lifecycle_stage != "active":
            return
        client.set_tag(previous, Tag.RESUMED_BY, run_id)
        if info.status == "RUNNING":
            client.set_terminated(previous, status="KILLED")
    except MlflowException as exc:
        warnings.warn(f"MLflow run {previous}, which this run {run_id} resumes, could not be linked: {redact(exc)}",
                      RuntimeWarning)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (`<db folder>/mlruns`): MLflow's default,
    `./mlruns` in the working directory, is a temporary copy of the project for a submitted job.
    A tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlruns").as_uri()
    return None


_open_runs: dict[str, str] = {}  # run id -> tracking URI of the runs this process started and has not ended


def end_open_runs(status: str = "KILLED") -> None:
    """End every run this process started and has not ended (the job is being stopped)."""
    for run_id, uri in list(_open_runs.items()):
        MlflowClient(uri).set_terminated(run_id, status=status)
        _open_runs.pop(run_id, None)


on_stop(end_open_runs)


@contextmanager
def failed_on_error(spec: JobSpec, run_id: str):
    """End the run when the block raises (else it would stay RUNNING forever) — KILLED when the job was
    stopped (SIGTERM: a Ray job stop or a cancelled Dagster run, however the stop unwinds; Ctrl-C),
    FAILED otherwise — and re-raise."""
    try:
        yield
    except BaseException as exc:
        if run_id not in _open_runs and stop_requested():
            raise  # ended KILLED already, when the stop came
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) or stop_requested() else "FAILED"
        _open_runs.pop(run_id, None)
        try:
            MlflowClient(tracking_uri(spec)).set_terminated(run_id, status=status)
        except Exception as unreachable:  # the tracking server is the failure: the error in hand is the news
            warnings.warn(f"MLflow run {run_id} could not be marked {status}: {redact(unreachable)}", RuntimeWarning)
        raise


class MetricLogger(Reporter):
    """Buffered metric logging to one run by id (rank 0 of a Ray Train worker group), with the
    node's CPU / memory / GPU utilisation as MLflow `system/*` metrics.

    A tracking server outage does not fail training (which would spend the worker-failure budget):
    a flush that fails keeps its metrics, warns once, and is retried at the next flush (no sooner
    than `retry_after` seconds) and, at the end, `close` retries for up to `final_wait` seconds. What
    still can't be sent is reported in a warning; the driver's final publishing then fails the run
    if the server is still away. MLflow's own blocking retries are cut to one for this logger."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 50, system_metrics_every: float | None = None,
                 retry_after: float = 30.0, final_wait: float = 120.0, max_buffer: int = 1_000_000) -> None:
        # for this logger's life only (`close` takes them back): a driver's own MLflow calls keep theirs
        self.env = {k: v for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")) if k not in os.environ}
        os.environ.update(self.env)
        self.client, self.run_id, self.flush_every = MlflowClient(uri), run_id, flush_every
        self.retry_after, self.final_wait, self.max_buffer = retry_after, final_wait, max_buffer
        self.buffer: list = []
        self.failing_since: float | None = None
        self.next_try = 0.0
        self.dropped = 0
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        if system_metrics_every is None:
            system_metrics_every = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 5))
        self.system = SystemMetricsMonitor(run_id, sampling_interval=system_metrics_every, tracking_uri=uri,
                                           resume_logging=True)
        self.system.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.buffer += [mlflow.entities.Metric(mlflow_metric(k), float(v), now, step) for k, v in metrics.items() if v == v]
        if len(self.buffer) > self.max_buffer:  # a very long outage: keep the newest
            self.dropped += len(self.buffer) - self.max_buffer
            self.buffer = self.buffer[-self.max_buffer:]
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def epoch(self, record: dict, monitor: str) -> None:
        self.flush()

    def flush(self) -> bool:
        """Send the buffer; False (metrics kept) when the tracking server can't be reached."""
        if not self.buffer or time.monotonic() < self.next_try:
            return not self.buffer
        try:
            while self.buffer:
                self.client.log_batch(self.run_id, metrics=self.buffer[:900])
                self.buffer = self.buffer[900:]
        except Exception as exc:  # an outage: MlflowException, requests' ConnectionError, timeouts
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                warnings.warn(f"MLflow tracking unreachable ({type(exc).__name__}: {redact(str(exc)).splitlines()[0][:200]}); "
                              f"keeping metrics and retrying every {self.retry_after:.0f} s", RuntimeWarning)
            self.next_try = time.monotonic() + self.retry_after
            return False
        if self.failing_since is not None:
            warnings.warn(f"MLflow tracking back after {time.monotonic() - self.failing_since:.0f} s; buffered metrics sent",
                          RuntimeWarning)
            self.failing_since = None
        return True

    def close(self) -> None:
        deadline = time.monotonic() + self.final_wait
        self.next_try = 0.0
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0)))
            self.next_try = 0.0
        if self.buffer or self.dropped:
            warnings.warn(f"MLflow tracking: {len(self.buffer) + self.dropped} metrics of run {self.run_id} could not "
                          f"be logged", RuntimeWarning)
        self.system.finish()
        for k in self.env:
            os.environ.pop(k, None)


def _load_pyfunc(data_path: str):
    """MLflow's pyfunc entry point of models registered with `loader_module: ray_jobs.tracking`
    (before the loader moved to `ray_jobs.serving`): they load as they always did."""
    return Recommender(data_path)


def publish(spec: JobSpec, run_id: str, model_path: str, metrics: dict[str, float], documents: dict[str, object],
            plots: dict[str, Callable[[str], str]], tags: dict[str, object], register: bool,
            catalogue: Catalogue | None = None) -> tuple[int | None, dict]:
    """A finished run's results into its MLflow run: final metrics, JSON documents, plots (each drawn
    by its function into `plots/` beside the model file, and kept there), tags; then the model
    registered. Returns (registered version or None, plot name -> file)."""
    mlflow.set_tracking_uri(tracking_uri(spec))
    plot_dir = os.path.join(os.path.dirname(model_path), "plots")
    os.makedirs(plot_dir, exist_ok=True)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({mlflow_metric(k): v for k, v in metrics.items()})
        for name, doc in documents.items():
            mlflow.log_dict(doc, name)
        files = {name: draw(os.path.join(plot_dir, name)) for name, draw in plots.items()}
        for path in files.values():
            mlflow.log_artifact(path, "plots")
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
    version = log_recommender(spec, run_id, model_path, catalogue) if register else None
    _open_runs.pop(run_id, None)  # ended FINISHED by the blocks above
    return version, files


def run_link(spec: JobSpec, run_id: str) -> str:
    """Where to look at a run: the tracking server's page for it, or the store and run id."""
    uri = tracking_uri(spec)
    if uri.startswith(("http://", "https://")):
        exp = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"{mask_uri(uri).rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"{mask_uri(uri)} run {run_id} (mlflow ui --backend-store-uri {mask_uri(uri)})"


def final_metrics(role: str, split: str, result: EvalResult) -> dict[str, float]:
    """Every float of an evaluation's accuracy and beyond-accuracy parts under its MLflow name
    (`contracts.final_metric`: `final_test/ndcg_at_10`)."""
    return {final_metric(role, split, k): v for k, v in result.flat().items() if isinstance(v, float)}


def plot_metrics_vs_k(results: dict[str, EvalResult], path: str) -> str:
    """HR@K and NDCG@K curves, one line per split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for split, r in results.items():
        ks = sorted(int(k.split("@")[1]) for k in r.metrics if k.startswith("hr@"))
        for ax, metric in zip(axes, ("hr", "ndcg")):
            ax.plot(ks, [r.metrics[f"{metric}@{k}"] for k in ks], marker="o", label=split)
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


def plot_alignment_curves(histories: dict[str, list[dict]], path: str, evals: dict[str, list[dict]] | None = None,
                          smooth: int = 10) -> str:
    """Per step, one line per method (moving average): mean rollout reward, target-weight entropy
    (Best-of-N methods), effective gradient norm; and validation NDCG@10 at each evaluation when
    `evals` is given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("reward_mean", "mean list reward (rollouts)"), ("weight_entropy", "target-weight entropy (nats)"),
            ("effective_grad_norm", "effective gradient norm (d policy loss / d logits)")]
    fig, axes = plt.subplots(1, len(keys) + bool(evals), figsize=(4.2 * (len(keys) + bool(evals)), 3.6))
    for method, history in histories.items():
        steps = np.asarray([h["step"] for h in history])
        for ax, (key, _) in zip(axes, keys):
            y = np.asarray([np.nan if h.get(key) is None else h[key] for h in history], dtype=float)
            if np.isnan(y).all():
                continue
            w = max(1, min(smooth, len(y)))
            ax.plot(steps[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), label=method)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title, fontsize=9)
    if evals:
        ax = axes[-1]
        for method, points in evals.items():
            ax.plot([e["step"] for e in points], [e["ndcg@10"] for e in points], marker="o", label=method)
        ax.set_title("validation NDCG@10", fontsize=9)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
