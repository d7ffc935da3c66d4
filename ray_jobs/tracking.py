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
import shutil
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from jobs.secrets import flat_doc, mask_uri, public_doc, redact
from jobs.spec import JobSpec, dump_spec, tracking_uri
from ray_jobs.catalogue import Catalogue
from ray_jobs.checkpoint import read_model
from ray_jobs.loop import Reporter
from ray_jobs.models import reads_request_time
from ray_jobs.models.hllm import item_cache
from ray_jobs.runtime import on_stop, stop_requested
from ray_jobs.scoring import load_for_catalogue, top_k

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def model_name(spec: JobSpec) -> str:
    return spec.registered_model_name()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(doc: dict) -> dict[str, str]:
    """MLflow params: dotted keys, lists as JSON, everything else as text."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in flat_doc(doc).items()}


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
    _open_runs[run.info.run_id] = uri
    with failed_on_error(spec, run.info.run_id):  # a run whose set-up fails is ended, never left RUNNING
        params = flatten(public_doc(spec))
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


def metric_key(name: str) -> str:
    """MLflow metric names allow no '@': hr@10 -> hr_at_10."""
    return name.replace("@", "_at_")


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
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
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
        self.buffer += [mlflow.entities.Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if v == v]
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


class Recommender:
    """The registered model's pyfunc, in the source's own item ids: histories of item ids -> top-K
    item ids with scores, history items masked.

    Input: a DataFrame with a `history` column (lists of the source's item ids, oldest first; numbers
    are read as their text) or a list of lists; for a model that reads timestamps (HSTU with a time
    bias) also a `timestamps` column (epoch seconds of each history item) and, where its bias
    measures gaps from the predicted event's time (`model.query_time: target`), a `request_time`
    column (epoch seconds the recommendations are for; optional otherwise). History items the
    catalogue does not know are skipped and counted. Params: `k` (default 10). Output: a DataFrame
    with `item_ids` (source ids), `scores` and `unknown_history_items`; never an inactive item,
    padding or a -inf score (fewer than k items where fewer remain).

    The registered model holds data only: `MLmodel` names this installed module as the pyfunc
    loader (`loader_module`), and `data/` holds `model.pt` (weights read with
    `torch.load(weights_only=True)`), `catalogue.parquet` (the item index it serves: index, source
    id, text, active) and, for a cached-mode HLLM, the item embeddings of that catalogue
    (safetensors). No pickle and no code travel with it, so loading it needs llmrec installed and
    runs nothing from the registry (`llmrec verify-model` checks a registered model for that)."""

    def __init__(self, data_path: str) -> None:
        files = {f: os.path.join(data_path, f) for f in os.listdir(data_path)}
        if "model.pt" not in files:
            raise FileNotFoundError(f"{data_path}: no model.pt in the registered model's data")
        ckpt = read_model(files["model.pt"])
        if CATALOGUE_FILE in files:
            self.catalogue = read_catalogue_file(files[CATALOGUE_FILE])
        else:  # registered before catalogues were shipped: the model's own, known by index only
            ids = ckpt.item_ids or [str(i) if i else "" for i in range(ckpt.num_items + 1)]
            self.catalogue = Catalogue(ids, ckpt.item_text)
        loaded = load_for_catalogue(files["model.pt"], self.catalogue, cache_dir=data_path, label="registered model")
        self.model, self.score = loaded.model, loaded.score_function()
        self.index = self.catalogue.index_of()
        self.num_items = self.catalogue.num_items

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        frame = isinstance(model_input, pd.DataFrame)
        raw = [list(np.asarray(h, dtype=object).reshape(-1)) for h in (model_input["history"] if frame else model_input)]
        known = [[self.index.get(str(i)) for i in h] for h in raw]
        keep = [np.asarray([x is not None for x in h], dtype=bool) for h in known]
        histories = [np.asarray([x for x in h if x is not None], dtype=np.int64) for h in known]
        unknown = [int((~m).sum()) for m in keep]
        times = None
        if self.score.reads_time:
            if not frame or "timestamps" not in model_input:
                raise ValueError("this model reads event timestamps: the input needs a `timestamps` column "
                                 "(epoch seconds of each history item) beside `history`")
            times = [np.asarray(t, dtype=np.int64).reshape(-1) for t in model_input["timestamps"]]
            if any(len(t) != len(h) for t, h in zip(times, raw)):
                raise ValueError("input: each row's `timestamps` must have one entry per `history` item")
            if "request_time" in model_input:
                asked = [int(x) for x in model_input["request_time"]]
            elif reads_request_time(self.model):
                raise ValueError("this model's time bias reads the time the recommendations are for: the input "
                                 "needs a `request_time` column (epoch seconds) beside `history` and `timestamps`")
            else:  # read by nothing: the model measures gaps from each event
                asked = [int(t.max()) if len(t) else 0 for t in times]
            times = [np.append(t[m], q) for t, m, q in zip(times, keep, asked)]
        ids, scores = top_k(self.score, histories, min(k, self.num_items), batch_size=1024, times=times,
                            candidates=self.catalogue.active)
        rows = [[(self.catalogue.item_ids[i], float(v)) for i, v in zip(r, sc) if i > 0 and np.isfinite(v)]
                for r, sc in zip(ids, scores)]
        return pd.DataFrame({"item_ids": [[i for i, _ in r] for r in rows], "scores": [[v for _, v in r] for r in rows],
                             "unknown_history_items": unknown})


CATALOGUE_FILE = "catalogue.parquet"


def write_catalogue_file(catalogue: Catalogue, path: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = range(1, catalogue.num_items + 1)
    pq.write_table(pa.table({"item_idx": pa.array(list(rows), pa.int32()),
                             "item_id": [catalogue.item_ids[i] for i in rows],
                             "text": [catalogue.item_text[i] for i in rows],
                             "active": pa.array(catalogue.active[1:].tolist(), pa.bool_()),
                             "kcore": pa.array(catalogue.kcore[1:].tolist(), pa.bool_())}), path)
    return path


def read_catalogue_file(path: str) -> Catalogue:
    import pyarrow.parquet as pq
    t = pq.read_table(path).to_pylist()
    n = max((r["item_idx"] for r in t), default=0)
    ids, text = [""] * (n + 1), [""] * (n + 1)
    active, kcore = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    for r in t:
        i = r["item_idx"]
        ids[i], text[i], active[i], kcore[i] = r["item_id"], r["text"], r["active"], r["kcore"]
    return Catalogue(ids, text, active, kcore)


def _load_pyfunc(data_path: str) -> Recommender:
    """MLflow's pyfunc entry point for `loader_module="ray_jobs.tracking"`."""
    return Recommender(data_path)


def log_recommender(spec: JobSpec, run_id: str, checkpoint_file: str, catalogue: Catalogue | None = None,
                    alias: str = "challenger") -> int:
    """Log the pyfunc (the checkpoint, the catalogue it serves — by default the one it was trained on —
    and a cached-mode HLLM's item embeddings of it, as its data; `Recommender` as its installed
    loader) to the run, register it under the spec's model name, point `alias` at the new version."""
    import tempfile
    uri = tracking_uri(spec)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    ckpt = read_model(checkpoint_file)
    if catalogue is None:
        ids = ckpt.item_ids or [str(i) if i else "" for i in range(ckpt.num_items + 1)]
        catalogue = Catalogue(ids, ckpt.item_text, kcore=ckpt.catalogue.seen_mask())
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema
    outputs = mlflow.models.infer_signature(
        pd.DataFrame({"history": [["1"]]}),
        pd.DataFrame({"item_ids": [["4", "5"]], "scores": [[0.9, 0.8]], "unknown_history_items": [0]}), params={"k": 10})
    # item ids as the source names them: text, or numbers read as their text (MovieLens' integer ids)
    signature = mlflow.models.ModelSignature(Schema([ColSpec(Array(AnyType()), "history")]), outputs.outputs,
                                             outputs.params)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        shutil.copyfile(checkpoint_file, os.path.join(data, "model.pt"))
        write_catalogue_file(catalogue, os.path.join(data, CATALOGUE_FILE))
        m = ckpt.spec.model
        if m.kind == "hllm" and m.mode == "cached":  # the catalogue's embeddings, computed where the cache is
            ckpt.build(catalogue=catalogue)  # embeds what the cache lacks: items newer than the model
            item_cache(m).export(catalogue.item_text, data)
        info = mlflow.pyfunc.log_model(
            name="model", loader_module="ray_jobs.tracking", data_path=data, signature=signature,
            pip_requirements=[f"mlflow=={mlflow.__version__}"], registered_model_name=model_name(spec))
    version = int(info.registered_model_version)
    MlflowClient(uri).set_registered_model_alias(model_name(spec), alias, version)
    return version


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
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})
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
