"""Distributed training job: a Ray Train TorchTrainer whose workers each run a DeepSpeed engine over
the same model, loss and batches as the single-process trainer; MLflow from rank 0 and the driver.

    python -m ray_jobs.train --spec S [--set k=v] [--run-name NAME]
    ray job submit --working-dir . -- python -m ray_jobs.train --spec S

Each worker reads the gold Delta tables itself (delta-rs, at the versions the driver pinned), takes
every world-th row of each global batch and its share of the step's negative pool (all-gathered in
the loss), and scales its summed loss so DeepSpeed's gradient average equals the single-process
gradient of the global batch. Checkpoints (DeepSpeed `save_checkpoint` on every rank, plus the best
model's weights from rank 0) go through `ray.train.report`; rerunning with the same run name resumes
from the latest one, and `FailureConfig` restarts a lost worker group from it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.spec import JobSpec, absolute_paths, load_spec, tracking_uri

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "jobs" / "deepspeed"


def run_dir(spec: JobSpec, run_name: str | None = None) -> str:
    return os.path.join(absolute_paths(spec).train.storage_path, run_name or spec.name)


def model_file(spec: JobSpec, run_name: str | None = None) -> str:
    """The trained model (checkpoint dict of the best epoch) the driver writes after a run."""
    return os.path.join(run_dir(spec, run_name), "model.pt")


def deepspeed_config(spec: JobSpec, world: int) -> dict:
    """The spec's DeepSpeed JSON with batch sizes and clipping from the spec; bf16 only on GPU.
    The optimizer and schedule are the trainer's (AdamW, warmup + cosine), never the JSON's."""
    name = spec.train.deepspeed
    path = DEEPSPEED_DIR / f"{name}.json" if name in ("zero1", "zero2", "zero3") else Path(name)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed={name!r}: no such config ({path})")
    cfg = json.loads(path.read_text())
    micro = max(1, spec.train.batch_size // world)
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro * world,
               gradient_clipping=spec.train.grad_clip)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    if not spec.train.use_gpu:
        cfg["bf16"] = {"enabled": False}
        cfg.pop("fp16", None)
    return cfg


def _gather_eval(spec, engine, data, split: str, rank: int, world: int, zero3: bool, item_emb=None) -> dict:
    """Distributed full-ranking evaluation (`merge`'s result), identical on every rank (so early
    stopping agrees); `item_emb` adds intra-list diversity."""
    import torch.distributed as dist

    from ray_jobs.evaluate import merge, rank_rows, shard_rows
    from ray_jobs.trainer import build_model, scorer
    rows = shard_rows(len(data.split(split).targets), rank, world)
    model = engine.module.model
    if zero3:  # ZeRO-3 re-partitions parameters after each submodule's forward: score a gathered copy
        model = build_model(spec, data.item_text, data.versions.get("item_index"))
        model.load_state_dict(_full_state(engine, zero3))
    part = rank_rows(spec, scorer(model, spec.data.max_seq_len), data, split, rows)
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return merge(spec, data, split, parts, item_emb)


def _full_state(engine, zero3: bool) -> dict:
    """The model's full fp32 state dict (ZeRO-3 parameters gathered first)."""
    import deepspeed
    gathered = deepspeed.zero.GatheredParameters(list(engine.module.parameters())) if zero3 else contextlib.nullcontext()
    with gathered:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.model.state_dict().items()}


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


def train_loop_per_worker(cfg: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine over the spec's model; see the module docstring."""
    spec = JobSpec.model_validate(cfg["spec"])
    t = spec.train
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from ray_jobs.data import load_sequences, train_batches, training_windows
    from ray_jobs.losses import InfoNCE
    from ray_jobs.trainer import VALID_METRIC, SequenceLoss, build_model, draw_negatives, lr_factor

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.get("pid_dir"):  # lets an operator (or a test) find and signal the worker processes
        Path(cfg["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    data = load_sequences(spec, cfg["versions"])
    torch.manual_seed(t.seed)
    model = build_model(spec, data.item_text, data.versions.get("item_index"))
    module = SequenceLoss(model, InfoNCE(t.temperature, t.learnable_temperature, t.negative_mask_cosine)).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay,
                                  fused=t.use_gpu or None)
    windows = training_windows(data.fit_sequences(t.fit_on), spec.data.max_seq_len, t.windows)
    if not windows:
        raise ValueError(f"spec {spec.name}: no training sequence has two or more items")
    steps_per_epoch = math.ceil(len(windows) / t.batch_size)
    total = t.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, total, t.min_lr_ratio))
    ds_cfg = cfg["deepspeed"]
    zero3 = ds_cfg.get("zero_optimization", {}).get("stage") == 3
    prepare_deepspeed(t.use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
                                           dist_init_required=False)
    monitor = "valid" if t.fit_on == "train" else "test"
    state = {"epoch": 0, "step": 0, "batch": 0, "best_metric": -1.0, "best_epoch": 0, "bad_evals": 0,
             "history": [], "seconds": 0.0, "restarts": 0}
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state")
            state = client["state"]
            state["restarts"] += 1
            if rank == 0 and os.path.exists(os.path.join(d, "best_model.pt")):
                best_state = torch.load(os.path.join(d, "best_model.pt"), map_location="cpu")
    logger = None
    if rank == 0 and cfg.get("run_id"):
        from ray_jobs.tracking import MetricLogger
        logger = MetricLogger(cfg["tracking_uri"], cfg["run_id"])

    def report(metrics: dict) -> None:
        """Checkpoint on every rank (DeepSpeed shards + rank 0's best weights) and report."""
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="state", client_state={"state": state})
            if rank == 0 and best_state is not None:
                torch.save(best_state, os.path.join(d, "best_model.pt"))
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    start = time.perf_counter() - state["seconds"]
    stopped = "epochs"
    for epoch in range(state["epoch"] + 1, t.epochs + 1):
        engine.train()
        rng = np.random.default_rng((t.seed, epoch))
        torch.manual_seed(t.seed * 7919 + epoch + 104_729 * rank)
        t_epoch, rows, tokens, losses = time.perf_counter(), 0, 0, []
        for b, (inputs, targets) in enumerate(train_batches(windows, spec.data.max_seq_len, t.batch_size, rng, rank, world, t.length_buckets)):
            if b < state["batch"]:  # resumed mid-epoch: these batches were trained before the checkpoint
                continue
            t_step = time.perf_counter()
            inputs, targets = inputs.to(device), targets.to(device)
            negatives = draw_negatives(t, data.num_items, targets, state["step"], rank, world).to(device)
            counts = torch.stack([(targets != 0).sum(), (inputs[:, -1] != 0).sum()]).float().cpu()
            dist.all_reduce(counts)
            loss_sum = engine(inputs, targets, negatives, "sum")
            engine.backward(loss_sum * world / counts[0].clamp(min=1))
            engine.step()
            state["step"] += 1
            state["batch"] = b + 1
            mean_loss = loss_sum.detach().float().cpu().reshape(1)
            dist.all_reduce(mean_loss)
            losses.append(float(mean_loss) / max(1.0, float(counts[0])))
            rows += int(counts[1])
            tokens += int(counts[0])
            if logger:
                dt = max(1e-9, time.perf_counter() - t_step)
                logger.log({"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0],
                            "train/seq_per_s": float(counts[1]) / dt, "train/tokens_per_s": float(counts[0]) / dt},
                           state["step"])
            if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and state["batch"] < steps_per_epoch:
                state["seconds"] = time.perf_counter() - start
                report({"step": state["step"], "epoch": epoch - 1, "loss": losses[-1]})
        state.update(epoch=epoch, batch=0)
        elapsed = max(1e-9, time.perf_counter() - t_epoch)
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record = {"epoch": epoch, "step": state["step"], "loss": float(np.mean(losses)) if losses else float("nan"),
                  "seq_per_s": rows / elapsed, "tokens_per_s": tokens / elapsed, "lr": scheduler.get_last_lr()[0],
                  "peak_rss_gib": float(peak)}
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            scores = _gather_eval(spec, engine, data, monitor, rank, world, zero3)["metrics"]
            record.update({f"{monitor}_{k}": scores[k] for k in ("hr@10", "ndcg@10", "hr@50", "mrr")})
            if monitor == "test" or scores[VALID_METRIC] > state["best_metric"]:
                state.update(best_metric=scores[VALID_METRIC], best_epoch=epoch, bad_evals=0)
                full = _full_state(engine, zero3)
                best_state = full if rank == 0 else None
            else:
                state["bad_evals"] += 1
        state["seconds"] = time.perf_counter() - start
        record["seconds"] = state["seconds"]
        state["history"].append(record)
        if logger:
            logger.log({f"{monitor}/{k.split('_', 1)[1]}": v for k, v in record.items() if k.startswith(monitor + "_")}
                       | {"epoch/loss": record["loss"], "epoch/seq_per_s": record["seq_per_s"]}, state["step"])
            logger.flush()
        if state["bad_evals"] >= t.patience:
            stopped = "early_stopping"
        elif t.max_minutes and state["seconds"] > t.max_minutes * 60:
            stopped = "time_budget"
        state["stopped"] = stopped
        report({k: v for k, v in record.items() if isinstance(v, (int, float))} | {"best_metric": state["best_metric"]})
        if stopped != "epochs":
            break
    if logger:
        logger.close()


def init_ray(spec: JobSpec) -> None:
    """Join the spec's Ray cluster, the one this process was submitted to, or start a local one."""
    import ray
    if ray.is_initialized():
        return
    address = spec.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        start_local_ray(spec.cluster.num_cpus, {"DS_ACCELERATOR": "cuda" if spec.train.use_gpu else "cpu"})


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


def check_storage_path(spec: JobSpec) -> None:
    """Fail before training, not after it: the final model.pt is written and read with local file I/O."""
    if "://" in spec.train.storage_path:
        raise ValueError(f"train.storage_path={spec.train.storage_path!r}: the final model.pt is written and read "
                         "with local file I/O; use a path every node mounts (NFS, a FUSE-mounted bucket)")


def fit(spec: JobSpec, loop, loop_config: dict, run_name: str, what: str):
    """Run `loop` on `train.workers` Ray Train workers (the spec's GPUs, CPUs, failure budget,
    storage) and return the last reported checkpoint; `what` names the run in errors."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    t = spec.train
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=t.storage_path,  # absolute (callers pass absolute_paths(spec))
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # torch threads = the worker's CPU share, so workers don't oversubscribe the node
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, int(t.cpus_per_worker)))}}
            if not t.use_gpu else None))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{what} run {run_name} failed: {result.error}")
    return result.checkpoint


def run(spec: JobSpec, run_name: str | None = None, pid_dir: str | None = None, register: bool = True) -> dict:
    """Train on Ray, write `<storage>/<run>/model.pt`, log it to MLflow and register it."""
    from ray_jobs import tracking
    from ray_jobs.data import load_sequences
    run_name = run_name or spec.name
    spec = absolute_paths(spec)
    t = spec.train
    check_storage_path(spec)
    init_ray(spec)
    data = load_sequences(spec)  # the driver pins the versions; workers read them themselves
    ds_cfg = deepspeed_config(spec, t.workers)
    uri = tracking_uri(spec)
    run_id = tracking.start_run(spec, run_name, "train",
                                {**{f"delta_version.{k}": v for k, v in data.versions.items()}, "run_name": run_name},
                                {"deepspeed.json": json.dumps(ds_cfg, indent=2)})
    checkpoint = fit(spec, train_loop_per_worker,
                     {"spec": spec.model_dump(mode="json"), "versions": data.versions, "deepspeed": ds_cfg,
                      "run_id": run_id, "tracking_uri": uri, "pid_dir": pid_dir}, run_name, "training")
    return finish(spec, run_name, run_id, checkpoint, data, register)


def finish(spec: JobSpec, run_name: str, run_id: str, checkpoint, data, register: bool) -> dict:
    """Driver side after fit: the best model as a checkpoint dict, final evaluation, MLflow model."""
    import mlflow

    from ray_jobs import tracking
    from ray_jobs.evaluate import evaluate_distributed
    with checkpoint.as_directory() as d:
        best = torch.load(os.path.join(d, "best_model.pt"), map_location="cpu")
        client = _client_state(d)
    out_file = model_file(spec, run_name)
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    torch.save({"model": best, "spec": spec.model_dump(mode="json"), "item_text": data.item_text,
                "versions": data.versions, "state": client}, out_file + ".tmp")
    os.replace(out_file + ".tmp", out_file)
    workers = max(1, spec.train.workers)
    results = {split: evaluate_distributed(spec, out_file, split, workers, data) for split in ("valid", "test")}
    uri = tracking_uri(spec)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        for split, r in results.items():
            mlflow.log_metrics({f"final_{split}/{tracking.metric_key(k)}": v for k, v in r["metrics"].items()
                                if isinstance(v, float)})
        mlflow.log_dict(results, "evaluation.json")
        mlflow.log_artifact(tracking.plot_metrics_vs_k(results, os.path.join(tmp, "metrics_vs_k.png")), "plots")
        mlflow.log_artifact(tracking.plot_training_curves(client["history"], os.path.join(tmp, "training_curves.png")), "plots")
        mlflow.set_tags({"best_epoch": client["best_epoch"], "stopped": client.get("stopped", "epochs"),
                         "restarts": client.get("restarts", 0)})
    version = None
    if register:
        version = tracking.log_recommender(spec, run_id, out_file, item_cache_file(spec, data.versions))
    return {"run_name": run_name, "run_id": run_id, "model_file": out_file, "model_name": tracking.model_name(spec),
            "model_version": version, "best_epoch": client["best_epoch"], "epochs_run": client["epoch"],
            "steps": client["step"], "restarts": client.get("restarts", 0), "stopped": client.get("stopped", "epochs"),
            "valid": results["valid"]["metrics"], "test": results["test"]["metrics"]}


def item_cache_file(spec: JobSpec, versions: dict) -> str | None:
    """A cached-mode HLLM's item-embedding artifact (shipped inside the registered model)."""
    if spec.model.kind != "hllm" or spec.model.mode != "cached":
        return None
    from ray_jobs.models.hllm import cache_key
    path = os.path.join(spec.model.cache_dir, cache_key(spec.model, versions.get("item_index")) + ".pt")
    return path if os.path.exists(path) else None


def _client_state(checkpoint_dir: str) -> dict:
    """The trainer state saved with the DeepSpeed checkpoint (client_state['state'])."""
    for name in sorted(os.listdir(os.path.join(checkpoint_dir, "state"))):
        if name.endswith("model_states.pt"):
            ckpt = torch.load(os.path.join(checkpoint_dir, "state", name), map_location="cpu", weights_only=False)
            if "state" in ckpt:
                return ckpt["state"]
    raise FileNotFoundError(f"no trainer state in DeepSpeed checkpoint {checkpoint_dir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--run-name", help="Ray Train run name (default: the spec name); the same name resumes")
    ap.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, args.overrides)
    out = run(spec, args.run_name, register=not args.no_register)
    print(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
