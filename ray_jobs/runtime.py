"""The Ray layer under the four jobs: joining or starting Ray, the Ray Train `TorchTrainer`, the
DeepSpeed config, run paths, collectives on the device the process group handles, distributed
full-ranking evaluation on Ray tasks, `models:/` resolution, and the `python -m ray_jobs.<job>`
entry point every job uses.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from jobs.spec import JobSpec, SpecError, absolute_paths, load_spec, tracking_uri
from ray_jobs.checkpoint import ModelCheckpoint, read_model
from ray_jobs.data import SeqData, load_sequences
from ray_jobs.scoring import load_for_catalogue, merge_shards, rank_shard

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "jobs" / "deepspeed"
USER_ERRORS = (SpecError, FileNotFoundError, ValueError)  # CatalogueMismatch, SourceError, UnsafeFile are ValueErrors


# ----------------------------------------------------------------------------- process

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc give every freed block of `threshold` bytes or more straight back to the OS (a
    fixed mmap threshold). By default glibc raises that threshold to the largest block freed so far
    (up to 32 MiB): from then on a training step's many 1-32 MiB activations come from the heap,
    and what the heap fragments keeps counting as resident — HLLM's peak RSS on ML-1M grew by
    0.3-0.4 GiB an epoch that way. Training and alignment call this first (in every Ray worker
    too). Returns whether it took effect (False where libc is not glibc)."""
    import ctypes
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- Ray

def local_token_auth() -> bool:
    """Token authentication for a Ray this process starts itself: Ray 2.60's GCS, raylet and agents
    listen on every interface whatever the node address, so a local Ray is only private if it asks
    for a token. A fresh random token goes into this process's environment (inherited by the Ray
    processes it starts, never written anywhere); Ray reads the mode when it is imported, so this
    must run first. Returns whether the mode is (now) token; an explicit RAY_AUTH_MODE is kept."""
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return os.environ.get("RAY_AUTH_MODE") == "token"


def init_ray(spec: JobSpec) -> None:
    """Join the spec's Ray cluster, the one this process was submitted to, or start a local one
    (with token authentication: `local_token_auth`)."""
    address = spec.cluster.address or os.environ.get("RAY_ADDRESS")
    if not address:
        local_token_auth()
    import ray
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        start_local_ray(spec.cluster.num_cpus, {"DS_ACCELERATOR": "cuda" if spec.train.use_gpu else "cpu"})
    if _stop_installed:
        stop_on_sigterm()  # ray.init puts its own SIGTERM handler (a bare exit) in place of the job's


def start_local_ray(num_cpus: int | None, env_vars: dict[str, str], attempts: int = 3) -> None:
    """A local Ray instance. On a loaded machine its raylet sometimes misses the start-up deadline
    ("node timed out during startup"); that start is torn down and retried."""
    import ray
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars})
            return
        except Exception as exc:  # ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise


def ray_get(refs):
    """`ray.get`, with a user error raised inside a task (a bad spec, a mismatched checkpoint)
    re-raised as itself, so the command line reports it in one line."""
    import ray
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, USER_ERRORS):
            raise exc.cause from None
        raise


# ----------------------------------------------------------------------------- run paths

def run_dir(spec: JobSpec, run_name: str) -> str:
    return os.path.join(absolute_paths(spec).train.storage_path, run_name)


def model_file(spec: JobSpec, run_name: str | None = None) -> str:
    """The model a Ray run ships: `<train.storage_path>/<run>/model.pt`."""
    return os.path.join(run_dir(spec, run_name or spec.name), "model.pt")


def check_storage_path(spec: JobSpec) -> None:
    """Fail before training, not after it: the final model.pt is written and read with local file I/O."""
    if "://" in spec.train.storage_path:
        raise ValueError(f"train.storage_path={spec.train.storage_path!r}: the final model.pt is written and read "
                         "with local file I/O; use a path every node mounts (NFS, a FUSE-mounted bucket)")


# ----------------------------------------------------------------------------- Ray Train + DeepSpeed

def deepspeed_config(spec: JobSpec, world: int, batch_size: int | None = None) -> dict:
    """The spec's DeepSpeed JSON with the global batch (`batch_size`, default train.batch_size)
    split over `world` workers and clipping from the spec; bf16 only on GPU. The optimizer and
    schedule are the loop's (AdamW, warmup + cosine), never the JSON's."""
    name = spec.train.deepspeed
    path = DEEPSPEED_DIR / f"{name}.json" if name in ("zero1", "zero2", "zero3") else Path(name)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed={name!r}: no such config ({path})")
    cfg = json.loads(path.read_text())
    micro = max(1, (batch_size or spec.train.batch_size) // world)
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro * world,
               gradient_clipping=spec.train.grad_clip)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    if not spec.train.use_gpu:
        cfg["bf16"] = {"enabled": False}
        cfg.pop("fp16", None)
    return cfg


def prepare_deepspeed(use_gpu: bool, max_lock_age_s: float = 300.0) -> None:
    """Call in a worker before `deepspeed.initialize`.

    Stale build locks: torch C++-extension builds (DeepSpeed's JIT ops) run under a `lock` file; a
    process killed mid-build leaves it behind and every later worker waits on it forever. A lock
    older than `max_lock_age_s` (a build takes well under a minute) is removed.

    On CPU, DeepSpeed is kept off its shared-memory communication op. Training reduces gradients
    through torch.distributed (gloo) either way; the op only serves inference all-reduce, yet
    DeepSpeed JIT-compiles it (g++, ~40 s) and initialises /dev/shm buffers in every engine, which
    needs a large /dev/shm and AVX2/AVX-512 (without them one rank faults and its peers wait on
    the shared flags forever)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("*/*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_lock_age_s:
                lock.unlink()
        except FileNotFoundError:
            pass
    if not use_gpu:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def process_group_backend(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def fit(spec: JobSpec, worker: Callable[[dict], None], worker_config: dict, run_name: str, what: str):
    """Run `worker` on `train.workers` Ray Train workers (the spec's GPUs, CPUs, failure budget,
    storage) and return the last reported checkpoint; `what` names the run in errors."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    t = spec.train
    trainer = TorchTrainer(
        worker, train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend=process_group_backend(t.use_gpu)),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=absolute_paths(spec).train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # torch threads = the worker's CPU share, so workers don't oversubscribe the node
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, int(t.cpus_per_worker)))}}
            if not t.use_gpu else None))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:  # Ray Train V2 raises when the worker group fails for good
        raise RuntimeError(f"{what} run {run_name} failed: {exc}") from exc
    if result.error:
        raise RuntimeError(f"{what} run {run_name} failed: {result.error}")
    return result.checkpoint


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device


def worker_context(spec: JobSpec, pid_dir: str | None = None) -> WorkerContext:
    """This Ray Train worker's rank, world size and device; with `pid_dir`, its pid is written there
    (`rank<N>.pid`), so an operator or a test can find and signal the worker processes."""
    import ray.train
    import ray.train.torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.train.use_gpu else "cpu")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if pid_dir:
        Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    device = ray.train.torch.get_device() if spec.train.use_gpu else torch.device("cpu")
    return WorkerContext(rank, world, device)


def final_model(checkpoint) -> ModelCheckpoint:
    """The model a run ships, from its last reported Ray Train checkpoint (rank 0 writes `model.pt`)."""
    with checkpoint.as_directory() as d:
        path = os.path.join(d, "model.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"Ray Train checkpoint {checkpoint.path} holds no model.pt")
        return read_model(path)


# ----------------------------------------------------------------------------- collectives

def collective_device(backend: str, device: torch.device) -> torch.device:
    """The device a process group's collectives take tensors on: CUDA under NCCL (it handles
    nothing else), the CPU under gloo."""
    if "nccl" in backend:
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Collectives:
    """Sums, maxima, object gathers and barriers across the worker group, each run on the device
    the process group handles (`collective_device`); a tensor comes back on the device it was
    given on. Without a process group (one process) every call is the identity."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.active else (0, 1)
        self.device = device or (collective_device(dist.get_backend(), torch.device("cpu")) if self.active
                                 else torch.device("cpu"))

    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if not self.active:
            return x
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y, op=op)
        return y.to(x.device)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.SUM)

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.MAX)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


# ----------------------------------------------------------------------------- evaluation on Ray tasks

def _rank_task(checkpoint: str, spec_doc: dict, versions: dict, split: str, rank: int, world: int,
               cache_dir: str | None, use_gpu: bool):
    spec = JobSpec.model_validate(spec_doc)
    data = load_sequences(spec, versions, shard=(rank, world))
    loaded = load_for_catalogue(checkpoint, data.catalogue, versions.get("item_index"), cache_dir)
    if use_gpu:
        loaded.model.to("cuda")
    return rank_shard(spec, loaded.score_function(), data, split), loaded.scorable


def evaluate_distributed(spec: JobSpec, checkpoint: str, split: str, workers: int, data: SeqData | None = None,
                         item_emb: np.ndarray | None = None, cache_dir: str | None = None) -> dict:
    """Full-ranking metrics of a checkpoint on the data's catalogue (the one it was trained on or a
    later one that extends it), its users spread over `workers` Ray tasks (each reads the gold
    tables itself at the pinned versions, loads the model, on a GPU when train.use_gpu; `cache_dir`
    points a cached-mode HLLM at its item-embedding cache)."""
    import ray
    data = data or load_sequences(spec)
    task = ray.remote(num_cpus=1, num_gpus=1 if spec.train.use_gpu else 0)(_rank_task)
    parts = ray_get([task.remote(checkpoint, spec.model_dump(mode="json"), data.versions, split, r, workers,
                                 cache_dir, spec.train.use_gpu) for r in range(workers)])
    result = merge_shards(spec, data, split, [p[0] for p in parts], item_emb, parts[0][1])
    result.update(split=split, versions=data.versions, workers=workers)
    return result


# ----------------------------------------------------------------------------- models from the registry

@dataclass
class ResolvedModel:
    path: str                # a local model.pt
    cache_dir: str | None    # a cached-mode HLLM's shipped item-embedding folder, if any
    label: str               # what the user named: a models:/ URI or the file
    name: str                # registered model name (or the spec's)
    version: str             # registry version, or file:<path>


_downloads: list[str] = []  # registry downloads of this process, removed when it exits


def _remove_downloads() -> None:
    import shutil
    for folder in _downloads:
        shutil.rmtree(folder, ignore_errors=True)


def resolve_model(spec: JobSpec, ref: str | None = None) -> ResolvedModel:
    """A model to load, from `models:/NAME@alias` or `models:/NAME/VERSION`, a checkpoint file, or by
    default the training run's `model.pt`. An alias is resolved to its version first and that version
    is downloaded (an alias moved meanwhile can't mix two versions), into
    `<train.storage_path>/_registry/` (every node of a cluster mounts it: workers read the file too);
    the download is removed when this process exits."""
    if ref and ref.startswith("models:/"):
        import atexit

        import mlflow
        uri = tracking_uri(spec)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        name, _, alias = ref.removeprefix("models:/").partition("@")
        if alias:
            version = str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        else:
            name, _, version = name.partition("/")
        folder = os.path.join(absolute_paths(spec).train.storage_path, "_registry")
        os.makedirs(folder, exist_ok=True)
        target = tempfile.mkdtemp(prefix="model-", dir=folder)
        if not _downloads:
            atexit.register(_remove_downloads)
        _downloads.append(target)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=target)
        files = {f: os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs}
        if "model.pt" not in files:
            raise FileNotFoundError(f"{ref}: no model.pt checkpoint inside the registered model")
        data = os.path.dirname(files["model.pt"])
        shipped_cache = any(e.startswith("items-") for e in os.listdir(data))
        return ResolvedModel(files["model.pt"], data if shipped_cache else None, ref, name, version)
    path = os.path.abspath(ref or model_file(spec))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained model at {path}: train first (llmrec train) or name a checkpoint "
                                "file or models:/NAME@alias")
    return ResolvedModel(path, None, path, spec.tracking.model_name or spec.name, f"file:{path}")


# ----------------------------------------------------------------------------- entry point

def run_options(default_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """The options of a job that runs on Ray Train and registers a model."""
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--run-name", help=f"Ray Train run name (default: {default_name}); the same name resumes")
        ap.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    return add


@dataclass
class DagsterReport:
    """What a job tells the Dagster asset that launched it (through Dagster Pipes): materialization
    metadata and the results of the asset's checks (name -> (passed, metadata))."""
    metadata: dict
    checks: dict[str, tuple[bool, dict]]


def json_metadata(value) -> dict:
    """A dict or list as Dagster JSON metadata (Pipes takes only scalars bare)."""
    return {"raw_value": value, "type": "json"}


def markdown_image(path: str, title: str) -> dict:
    """A PNG as Dagster markdown metadata (inline, so the UI shows it without file access)."""
    import base64
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"raw_value": f"![{title}](data:image/png;base64,{data})", "type": "md"}


class JobStopped(KeyboardInterrupt):
    """The job was asked to stop (SIGTERM: `ray job stop`, a cancelled Dagster run); a KeyboardInterrupt
    so that nothing on the way out mistakes it for an error of the job, and every run it had open is
    ended as KILLED (`tracking.failed_on_error`)."""


_stop_hooks: list[Callable[[], None]] = []
_stopped: list[int] = []
_stop_installed: list[bool] = []


def on_stop(hook: Callable[[], None]) -> None:
    """Run `hook` as soon as the job is asked to stop (before anything unwinds: Ray sends SIGKILL a few
    seconds after SIGTERM, so what must be recorded is recorded first)."""
    _stop_hooks.append(hook)


def stop_requested() -> bool:
    return bool(_stopped)


def stop_on_sigterm() -> None:
    """On SIGTERM: run the stop hooks (the open MLflow runs are ended KILLED), then raise `JobStopped`
    in this (main) thread."""
    import signal

    def stop(signum, frame):
        _stopped.append(signum)
        for hook in list(_stop_hooks):
            try:
                hook()
            except Exception as exc:  # a hook that fails must not keep the job from stopping
                print(f"on stop: {type(exc).__name__}", file=sys.stderr)
        raise JobStopped(f"stopped by signal {signum}")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        _stop_installed.append(True)


def job_main(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[JobSpec, argparse.Namespace], dict], argv: list[str] | None = None,
             report: Callable[[JobSpec, dict], DagsterReport] | None = None) -> int:
    """`python -m ray_jobs.<job> --spec S [--set k=v ...] [job options]`: run the job, print its
    result as JSON; a user mistake (bad spec, missing model, mismatched data) is one line on
    stderr and exit code 2; anything else a traceback and exit 1 — both redacted (`jobs.secrets`), as
    is every log record and warning of the job; SIGTERM stops the job with its MLflow runs marked
    KILLED (exit 143). Launched by Dagster Pipes (`DAGSTER_PIPES_CONTEXT` set), the MLflow run is
    tagged with the Dagster run and asset, and `report` turns the result into the asset's
    materialization metadata and check results."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    from jobs.secrets import install_redaction, redact, redacted_exception
    install_redaction()
    stop_on_sigterm()
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    ap.add_argument("--spec", required=True, help="spec YAML (path, or a name under jobs/specs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
        if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
            out = run(spec, args)
        else:
            with open_dagster_pipes() as pipes:
                asset = pipes.asset_keys[0] if pipes.is_asset_step else None
                spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
                    update={"dagster_run_id": pipes.run_id, "dagster_asset": asset})})
                out = run(spec, args)
                if report is not None:
                    r = report(spec, out)
                    pipes.report_asset_materialization(metadata=r.metadata)
                    for name, (passed, meta) in r.checks.items():
                        pipes.report_asset_check(check_name=name, passed=passed, metadata=meta)
    except USER_ERRORS as exc:
        print(f"error: {redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)}",
              file=sys.stderr)
        return 2
    except JobStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 143
    except Exception as exc:
        print(redacted_exception(exc), file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=float))
    return 0
