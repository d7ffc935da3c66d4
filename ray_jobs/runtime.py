"""The Ray layer under the four jobs: joining or starting Ray, the Ray Train `TorchTrainer` with its
workers' context, the loop's backend on a Ray Train worker (a DeepSpeed engine, checkpoints through
`ray.train.report`), and full-ranking evaluation spread over Ray tasks."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from jobs.allocator import allocator_env, ray_runtime_env
from jobs.contracts import EvalResult, RunProgress
from jobs.files import write_atomic
from jobs.rayjob import local_token_auth
from jobs.schema import JobSpec
from jobs.spec import absolute_paths
from ray_jobs.checkpoint import ModelCheckpoint, read_model, safe_deepspeed_loads, save_model
from ray_jobs.data import SeqData, load_sequences
from ray_jobs.distributed import Collectives, collective_device, prepare_deepspeed, process_group_backend
from ray_jobs.entrypoint import USER_ERRORS, reinstall_stop_handler
from ray_jobs.loop import (CATALOGUE_FILE, Backend, TrainState, check_folder_doc, check_run_folder, frozen_weights,
                           run_folder_doc, weights_of)
from ray_jobs.scoring import load_for_catalogue, merge_shards, rank_shard


# ----------------------------------------------------------------------------- Ray

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
        start_local_ray(spec.cluster.num_cpus,
                        {"DS_ACCELERATOR": "cuda" if spec.train.use_gpu else "cpu", **allocator_env(spec)})
    reinstall_stop_handler()


# Ray Train's preemption watcher, off where Ray runs on this machine alone (start_local_ray and
# infra/local/ray-up.sh): a process per run that can only ever watch this machine
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_local_ray(num_cpus: int | None, env_vars: dict[str, str], attempts: int = 3) -> None:
    """A local Ray instance. On a loaded machine its processes sometimes miss a start-up deadline:
    the GCS server binds its port after Ray's wait ("Timed out waiting for file .../gcs_server_port_…",
    `RAY_gcs_server_port_wait_time_s`, 30 s) or the raylet "timed out during startup". Such a start is
    torn down — with the processes it started, which `ray.shutdown` does not know of when the start
    failed before Ray recorded its node — and retried. It runs without the dashboard; its workers
    start with `worker_setup.quiet_state_api_pollers`, and without Ray Train's preemption watcher (an
    actor, so a process, per run, watching for nodes a one-machine instance cannot lose)."""
    import psutil
    import ray
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False,
                     runtime_env={"env_vars": {**LOCAL_RAY_ENV, **env_vars},
                                  "worker_process_setup_hook": "ray_jobs.worker_setup.quiet_state_api_pollers"})
            return
        except Exception as exc:  # ray raises a bare Exception or RuntimeError for these
            ray.shutdown()
            started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for p in started:
                p.kill()
            psutil.wait_procs(started, timeout=10)
            missed = any(m in str(exc) for m in ("timed out during startup", "Timed out waiting for file"))
            if not missed or attempt == attempts:
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


# ----------------------------------------------------------------------------- Ray Train

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, what it resumes from


def check_previous_run(spec: JobSpec, run_name: str, stage: str) -> str | None:
    """Before any worker starts: the newest checkpoint a run of this name left in `train.storage_path`
    (what Ray Train would resume from) must have been written with this run's settings
    (`loop.check_resumable`; the workers check it again before reading a shard). Returns the MLflow
    run that wrote it (None: no checkpoint, or one from before checkpoints recorded it)."""
    folder = Path(absolute_paths(spec).train.storage_path) / run_name
    snapshot = folder / RAY_SNAPSHOT
    try:
        latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        doc = json.loads((folder / latest / CATALOGUE_FILE).read_text()) if latest else {}
    except (OSError, ValueError):  # no run yet, or a record being written: the workers check again
        return None
    if "spec" in doc:
        check_folder_doc(doc, spec, stage, str(folder / latest))
    return doc.get("mlflow_run_id")


def keep_run_progress(spec: JobSpec, run_name: str, out: Path, attempts: int = 5) -> dict | None:
    """A run's newest checkpoint in `train.storage_path` (Ray Train's folder: the DeepSpeed state,
    the weights the run ships so far, the catalogue; not DeepSpeed's own scripts), with a snapshot
    listing it alone, copied to `out/<run_name>` (replaced whole, never left half-written): a run that
    outlasts the machine it began on resumes on another from it (`restore_run_progress`). Safe beside
    the running job: a snapshot caught mid-write or a checkpoint deleted while copied is read again.
    Returns the kept checkpoint's metrics, or None when the run has no checkpoint yet."""
    import shutil
    folder = Path(absolute_paths(spec).train.storage_path) / run_name
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    for attempt in range(attempts):
        try:
            doc = json.loads((folder / RAY_SNAPSHOT).read_text())
            latest = doc.get("latest_checkpoint_result")
            if not latest:
                return None
            names = [r["checkpoint_dir_name"] for r in doc["checkpoint_results"]]
            at = names.index(latest["checkpoint_dir_name"])
            doc.update(checkpoint_results=[latest], checkpoint_report_indices=[doc["checkpoint_report_indices"][at]],
                       pending_training_results=[], pending_validation_specs=[])
            shutil.copytree(folder / latest["checkpoint_dir_name"], tmp / run_name / latest["checkpoint_dir_name"],
                            ignore=shutil.ignore_patterns("*.py"))
            (tmp / run_name / RAY_SNAPSHOT).write_text(json.dumps(doc))
        except (OSError, ValueError):  # no run; the snapshot being rewritten; a checkpoint deleted while copied
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / RAY_SNAPSHOT).exists():
                return None
            if attempt == attempts - 1:
                raise
        else:
            shutil.rmtree(old, ignore_errors=True)
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return latest["metrics"]
        time.sleep(1.0)
    return None


def restore_run_progress(spec: JobSpec, run_name: str, kept: Path) -> bool:
    """Progress kept by `keep_run_progress` into `train.storage_path`, where the run of that name
    resumes from it — unless the storage already holds a checkpoint of the run (its own newest wins).
    Refused, naming both, when it was kept under another Ray version (Ray Train would not read it)."""
    import shutil

    import ray
    folder = Path(absolute_paths(spec).train.storage_path) / run_name
    snapshot = kept / run_name / RAY_SNAPSHOT
    if not snapshot.exists() or (folder / RAY_SNAPSHOT).exists():
        return False
    saved = json.loads(snapshot.read_text()).get("ray_version")
    if saved != ray.__version__:
        raise ValueError(f"{kept}: progress of {run_name} kept under Ray {saved}; this is Ray {ray.__version__}, "
                         f"whose Ray Train cannot resume it (install Ray {saved}, or remove {kept} to start over)")
    tmp = folder.with_name(folder.name + ".restoring")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(kept / run_name, tmp)
    shutil.rmtree(folder, ignore_errors=True)  # a run cut before its first checkpoint left its folder
    tmp.rename(folder)
    return True


def fit(spec: JobSpec, worker: Callable[[dict], None], worker_config: dict, run_name: str, what: str):
    """Run `worker` on `train.workers` Ray Train workers (the spec's GPUs, CPUs, failure budget,
    storage) and return the last reported checkpoint; `what` names the run in errors. (The jobs call
    `check_previous_run` before their own set-up.)"""
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
            worker_runtime_env=ray_runtime_env(spec, **({} if t.use_gpu else {
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, int(t.cpus_per_worker)))}))))
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


# ----------------------------------------------------------------------------- evaluation on Ray tasks

def _rank_task(checkpoint: str, spec_doc: dict, versions: dict, splits: list[str], rank: int, world: int,
               cache_dir: str | None, use_gpu: bool):
    spec = JobSpec.model_validate(spec_doc)
    data = load_sequences(spec, versions, shard=(rank, world))
    loaded = load_for_catalogue(checkpoint, data.catalogue, versions.get("item_index"), cache_dir)
    if use_gpu:
        loaded.model.to("cuda")
    score = loaded.score_function()
    return {split: rank_shard(spec, score, data, split) for split in splits}, loaded.scorable


def scores_on_tasks(spec: JobSpec) -> bool:
    """Whether a scoring job (evaluation, batch recommendation) spreads its users over Ray tasks: on
    GPUs or on a cluster of several nodes yes; on a one-node CPU cluster the driver, which already
    holds the data, scores them itself — tasks there would share its cores and start a process each
    to import torch, load the model and read the tables again."""
    import ray
    return spec.train.use_gpu or not ray.is_initialized() or len([n for n in ray.nodes() if n["Alive"]]) > 1


def evaluate_distributed(spec: JobSpec, checkpoint: str, splits: Sequence[str], workers: int,
                         data: SeqData | None = None, item_emb: np.ndarray | None = None,
                         cache_dir: str | None = None, tasks: bool | None = None) -> dict[str, EvalResult]:
    """Full-ranking metrics of a checkpoint on each of `splits`, on the data's catalogue (the one it
    was trained on or a later one that extends it), its users in `workers` shards, each on a Ray task
    (which reads the gold tables itself at the pinned versions and loads the model once for every
    split, on a GPU when train.use_gpu; `cache_dir` points a cached-mode HLLM at its item-embedding
    cache). `tasks=None` decides by `scores_on_tasks`."""
    import ray
    data = data or load_sequences(spec)
    if tasks if tasks is not None else scores_on_tasks(spec):
        task = ray.remote(num_cpus=1, num_gpus=1 if spec.train.use_gpu else 0,
                          runtime_env=ray_runtime_env(spec))(_rank_task)
        parts = ray_get([task.remote(checkpoint, spec.model_dump(mode="json"), data.versions, list(splits), r,
                                     workers, cache_dir, spec.train.use_gpu) for r in range(workers)])
    else:
        loaded = load_for_catalogue(checkpoint, data.catalogue, data.versions.get("item_index"), cache_dir)
        score = loaded.score_function()
        users = {split: data.split(split).users for split in splits}
        parts = [({split: rank_shard(spec, score, data, split, np.flatnonzero(users[split] % workers == r))
                   for split in splits}, loaded.scorable) for r in range(workers)]
    results = {}
    for split in splits:
        result = merge_shards(spec, data, split, [p[0][split] for p in parts], item_emb, parts[0][1])
        result.split, result.versions, result.workers = split, data.versions, workers
        results[split] = result
    return results


class DeepSpeedBackend(Backend):
    """A Ray Train worker: a DeepSpeed engine over the state's module (ZeRO stage and precision from
    the config), collectives on the process group's device, checkpoints through `ray.train.report`:
    DeepSpeed's shards from every rank plus rank 0's `model.pt` (the weights the run ships)."""

    def __init__(self, state: TrainState, ds_config: dict, rank: int, world: int, device: torch.device,
                 rebuild: Callable[[], nn.Module]) -> None:
        super().__init__(state, device)
        import deepspeed
        import torch.distributed as dist
        self.rank, self.world, self.rebuild = rank, world, rebuild
        prepare_deepspeed(device.type == "cuda")
        self.bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
        self.frozen = frozen_weights(state.model) if self.bf16 else {}  # before the engine casts them
        self.engine, _, _, _ = deepspeed.initialize(model=state.module, optimizer=state.optimizer,
                                                    lr_scheduler=state.scheduler, config=ds_config,
                                                    dist_init_required=False)
        safe_deepspeed_loads(self.engine)
        self.zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
        self.comm = Collectives(collective_device(dist.get_backend(), device))

    def forward(self, *args):
        return self.engine(*args)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights in fp32. Every rank calls this (the loops decide on all-reduced figures):
        under ZeRO-3 the parameters are gathered from all of them, and in bf16 each trained parameter
        is read from the optimizer's fp32 master copy (assembled from every rank's partition) and every
        frozen weight from its copy taken before the engine cast it — the bf16 module holds the same
        weights rounded to three significant digits."""
        if not self.zero3:
            weights = weights_of(self.state.model)
        else:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                weights = weights_of(self.state.model)
        if self.bf16:
            from deepspeed.utils import safe_get_full_fp32_param
            for name, param in self.state.model.named_parameters():
                master = safe_get_full_fp32_param(param) if param.requires_grad else None
                if master is not None:
                    weights[name] = master.detach().float().cpu().clone()
            weights.update(self.frozen)
        return weights

    def scoring_model(self) -> nn.Module:
        """ZeRO-3 re-partitions parameters after each submodule's forward: score a gathered copy."""
        if not self.zero3:
            return self.state.model
        model = self.rebuild()
        model.load_state_dict(self.full_weights())
        return model.to(self.device)

    def save(self, metrics: dict) -> None:
        import tempfile

        import ray.train
        s = self.state
        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag="state", client_state={
                "progress": s.progress().to_dict(), "stateful": {k: v.state_dict() for k, v in s.stateful.items()}})
            if self.rank == 0:
                write_atomic(os.path.join(d, CATALOGUE_FILE), lambda tmp: Path(tmp).write_text(json.dumps(
                    run_folder_doc(s))))
                if s.model_weights is not None:
                    save_model(os.path.join(d, "model.pt"), s.model_checkpoint(s.model_weights))
            self.comm.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def restore(self) -> bool:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return False
        s = self.state
        with checkpoint.as_directory() as d:
            check_run_folder(d, s, f"resuming from {checkpoint.path}")  # every rank, before any shard
            _, client = self.engine.load_checkpoint(d, tag="state")
            s.restore_progress(RunProgress.from_dict(client["progress"]))
            for k, v in s.stateful.items():
                v.load_state_dict(client["stateful"][k])
            if self.rank == 0 and os.path.exists(os.path.join(d, "model.pt")):
                ckpt = read_model(os.path.join(d, "model.pt"))
                ckpt.require_same_catalogue(s.catalogue, s.versions.get("item_index"), f"resuming from {checkpoint.path}")
                s.model_weights = ckpt.weights
        s.restarts += 1
        return True
