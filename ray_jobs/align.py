"""List-wise alignment job: a Ray Train TorchTrainer whose workers each run a DeepSpeed engine over
the policy (a trained model's catalogue scores), sample Plackett–Luce lists, score them with the
spec's rewards and train the method's weighted list likelihood + beta·KL to the frozen start.

    python -m ray_jobs.align --spec S [--set align.method=blade] [--run-name NAME]
    ray job submit --working-dir . -- python -m ray_jobs.align --spec S

The starting model (`align.init`: a checkpoint file or models:/NAME@alias; default the training
run's model.pt) fixes the architecture: the spec's `model` section and `data.max_seq_len` are
taken from it. Checkpoints (DeepSpeed shards, the policy weights, the aligner's state: running
exposure, reference rewards, BLADE posteriors) go through `ray.train.report`; the same run name
resumes. The driver writes `<train.storage_path>/<run>/model.pt`, evaluates the start and the
aligned model on valid and test (with intra-list diversity), logs both to MLflow with the step
curves and registers the aligned model (alias `challenger`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.spec import JobSpec, absolute_paths, load_spec, tracking_uri

STEP_KEYS = ("reward_mean", "reward_std", "reward_max", "kl", "effective_grad_norm", "weight_entropy",
             "sampled_log_ratio", "flat_groups", "policy_loss", "reward_ndcg", "reward_diversity", "reward_tail",
             "reward_exposure")
EVAL_KEYS = ("hr@10", "ndcg@10", "mrr")
BEYOND_KEYS = ("coverage@10", "ild@10", "tail_share@10", "gini@10")


def default_run_name(spec: JobSpec) -> str:
    return f"{spec.name}-align-{spec.align.method}"


def resolve_init(spec: JobSpec) -> tuple[str, str | None, str]:
    """(checkpoint file, item-cache folder or None, label) of the starting model."""
    init = spec.align.init
    if init and init.startswith("models:/"):
        import mlflow
        mlflow.set_tracking_uri(tracking_uri(spec))
        mlflow.set_registry_uri(tracking_uri(spec))
        local = mlflow.artifacts.download_artifacts(artifact_uri=init, dst_path=tempfile.mkdtemp(prefix="llmrec-init-"))
        files = {f: os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs}
        if "model.pt" not in files:
            raise FileNotFoundError(f"align.init={init}: no model.pt checkpoint inside the registered model")
        caches = [p for f, p in files.items() if f.startswith("items-") and f.endswith(".pt")]
        return files["model.pt"], (os.path.dirname(caches[0]) if caches else None), init
    from ray_jobs.train import model_file
    path = init or model_file(spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"align.init: no starting model at {path}; train first (llmrec train) or set "
                                "align.init to a checkpoint file or models:/NAME@alias")
    return os.path.abspath(path), None, os.path.abspath(path)


def with_init_model(spec: JobSpec, ckpt: dict, label: str, cache_dir: str | None) -> JobSpec:
    """The alignment spec with the starting model's architecture (model section, max_seq_len)."""
    init = JobSpec.model_validate(ckpt["spec"])
    # a checkpoint from `llmrec train --local` may hold a relative cache folder: resolve it here,
    # where it was written, not in a Ray worker's working directory
    model = init.model.model_copy(update={"cache_dir": cache_dir or os.path.abspath(init.model.cache_dir)})
    if model.kind not in ("sasrec", "hllm"):
        raise ValueError(f"align.init={label}: model.kind={model.kind!r} has no trainable scores to align")
    return spec.model_copy(update={"model": model,
                                   "data": spec.data.model_copy(update={"max_seq_len": init.data.max_seq_len})})


def align_loop_per_worker(cfg: dict) -> None:
    """One Ray Train worker: DeepSpeed engine over the policy, the shared Aligner step."""
    spec = JobSpec.model_validate(cfg["spec"])
    a, t = spec.align, spec.train
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from ray_jobs.alignment.loop import AlignData, Aligner, PolicyScores
    from ray_jobs.data import load_sequences
    from ray_jobs.metrics import tail_items
    from ray_jobs.models.hllm import minilm_item_embeddings
    from ray_jobs.train import _full_state, _gather_eval, prepare_deepspeed
    from ray_jobs.trainer import load_trained

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.get("pid_dir"):
        Path(cfg["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    data = load_sequences(spec, cfg["versions"])
    torch.manual_seed(a.seed)
    policy, _ = load_trained(cfg["init"], cache_dir=cfg["cache_dir"])
    reference, _ = load_trained(cfg["init"], cache_dir=cfg["cache_dir"])
    module = PolicyScores(policy).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=t.use_gpu or None)
    ds_cfg = cfg["deepspeed"]
    zero3 = ds_cfg.get("zero_optimization", {}).get("stage") == 3
    prepare_deepspeed(t.use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg, dist_init_required=False)
    engine.eval()  # no dropout: rollouts and the trained log-probabilities come from one deterministic policy
    item_emb = minilm_item_embeddings(spec.model, data.item_text, data.versions["item_index"])
    tail = torch.from_numpy(tail_items(data.popularity, spec.eval.tail_share))
    adata = AlignData.build(data.train, data.num_items, a.holdout, a.list_size)
    aligner = Aligner(a, adata, data.num_items, spec.data.max_seq_len, torch.from_numpy(item_emb), tail,
                      reference, rank, world)
    state = {"step": 0, "history": [], "evals": [], "seconds": 0.0, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state")
            state = client["state"]
            state["restarts"] += 1
            aligner.load_state_dict(client["aligner"])
    else:
        aligner.init_reference(a.seed)
    logger = None
    if rank == 0 and cfg.get("run_id"):
        from ray_jobs.tracking import MetricLogger
        logger = MetricLogger(cfg["tracking_uri"], cfg["run_id"])

    def evaluate(step: int) -> dict:
        r = _gather_eval(spec, engine, data, "valid", rank, world, zero3, item_emb)
        record = {"step": step} | {k: r["metrics"][k] for k in EVAL_KEYS} | {k: r["beyond_accuracy"][k] for k in BEYOND_KEYS}
        state["evals"].append(record)
        if logger:
            logger.log({f"valid/{k}": v for k, v in record.items() if k != "step"}, step)
        return record

    def report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="state", client_state={"state": state, "aligner": aligner.state_dict()})
            full = _full_state(engine, zero3)
            if rank == 0:
                torch.save(full, os.path.join(d, "policy.pt"))
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    if not state["evals"] and a.eval_every:
        evaluate(0)
    start = time.perf_counter() - state["seconds"]
    for step in range(state["step"], a.steps):
        t_step = time.perf_counter()
        loss, m = aligner.step(engine, step, a.seed)
        engine.backward(loss)
        engine.step()
        state["step"] = step + 1
        m.update(step=step + 1, seconds_per_step=time.perf_counter() - t_step)
        state["history"].append(m)
        if logger:
            logger.log({f"align/{k}": v for k, v in m.items() if k != "step"}, step + 1)
        last = step + 1 == a.steps
        if last or (a.eval_every and (step + 1) % a.eval_every == 0):
            evaluate(step + 1)
        state["seconds"] = time.perf_counter() - start
        if last or (a.checkpoint_every and (step + 1) % a.checkpoint_every == 0):
            if logger:
                logger.flush()
            report({"step": step + 1, "reward_mean": m["reward_mean"], "kl": m["kl"]})
    if logger:
        logger.close()


def run(spec: JobSpec, run_name: str | None = None, pid_dir: str | None = None, register: bool = True) -> dict:
    """Align on Ray, write `<storage>/<run>/model.pt`, evaluate start vs aligned, log and register."""
    from ray_jobs import tracking
    from ray_jobs.data import load_sequences
    from ray_jobs.models.hllm import minilm_item_embeddings
    from ray_jobs.train import check_storage_path, deepspeed_config, fit, init_ray
    spec = absolute_paths(spec)
    run_name = run_name or default_run_name(spec)
    t = spec.train
    check_storage_path(spec)
    if spec.align.users_per_step < t.workers:
        raise ValueError(f"align.users_per_step={spec.align.users_per_step} is smaller than train.workers={t.workers}: "
                         "every worker needs at least one user per step")
    init_file, cache_dir, label = resolve_init(spec)
    ckpt = torch.load(init_file, map_location="cpu", weights_only=False)
    spec = with_init_model(spec, ckpt, label, cache_dir)
    cache_dir = spec.model.cache_dir
    init_ray(spec)
    data = load_sequences(spec)
    ckpt_items = len(ckpt.pop("item_text")) - 1
    del ckpt
    if ckpt_items != data.num_items:
        raise ValueError(f"align.init={label}: the model was trained on {ckpt_items} items but {spec.data.name} "
                         f"has {data.num_items}; align on the dataset the model was trained on")
    # computed (and cached) here, so the workers read it from the cache and finish() reuses it
    item_emb = minilm_item_embeddings(spec.model, data.item_text, data.versions["item_index"])
    ds_cfg = deepspeed_config(spec.model_copy(update={"train": t.model_copy(update={"batch_size": spec.align.users_per_step})}),
                              t.workers)
    uri = tracking_uri(spec)
    run_id = tracking.start_run(spec, run_name, "align",
                                {**{f"delta_version.{k}": v for k, v in data.versions.items()}, "run_name": run_name,
                                 "align.init_model": label}, {"deepspeed.json": json.dumps(ds_cfg, indent=2)})
    checkpoint = fit(spec, align_loop_per_worker,
                     {"spec": spec.model_dump(mode="json"), "versions": data.versions, "deepspeed": ds_cfg,
                      "init": init_file, "cache_dir": cache_dir, "run_id": run_id, "tracking_uri": uri,
                      "pid_dir": pid_dir}, run_name, "alignment")
    return finish(spec, run_name, run_id, checkpoint, data, item_emb, init_file, cache_dir, label, register)


def finish(spec: JobSpec, run_name: str, run_id: str, checkpoint, data, item_emb: np.ndarray, init_file: str,
           cache_dir: str | None, label: str, register: bool) -> dict:
    import mlflow

    from ray_jobs import tracking
    from ray_jobs.evaluate import evaluate_distributed
    from ray_jobs.train import _client_state, item_cache_file, run_dir
    with checkpoint.as_directory() as d:
        weights = torch.load(os.path.join(d, "policy.pt"), map_location="cpu")
        client = _client_state(d)
    out_file = os.path.join(run_dir(spec, run_name), "model.pt")
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    torch.save({"model": weights, "spec": spec.model_dump(mode="json"), "item_text": data.item_text,
                "versions": data.versions, "state": {k: v for k, v in client.items() if k != "history"},
                "align": {"method": spec.align.method, "init": label}}, out_file + ".tmp")
    os.replace(out_file + ".tmp", out_file)
    workers = max(1, spec.train.workers)
    results = {}
    for name, path in (("base", init_file), ("aligned", out_file)):
        for split in ("valid", "test"):
            results[f"{name}_{split}"] = evaluate_distributed(spec, path, split, workers, data, item_emb, cache_dir)
    uri = tracking_uri(spec)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        for key, r in results.items():
            flat = r["metrics"] | r["beyond_accuracy"]
            mlflow.log_metrics({f"{'final' if key.startswith('aligned') else 'base'}_{key.split('_')[1]}/"
                                f"{tracking.metric_key(k)}": v for k, v in flat.items() if isinstance(v, float)})
        mlflow.log_dict({"steps": client["history"], "evals": client["evals"]}, "alignment_curves.json")
        mlflow.log_dict(results, "evaluation.json")
        mlflow.log_artifact(plot_alignment_curves({spec.align.method: client["history"]},
                                                  os.path.join(tmp, "alignment_curves.png")), "plots")
        mlflow.set_tags({"llmrec.align.method": spec.align.method, "llmrec.align.init": label,
                         "restarts": client.get("restarts", 0)})
    version = None
    if register:
        cache = item_cache_file(spec, data.versions)
        version = tracking.log_recommender(spec, run_id, out_file, cache)
    summary = lambda r: r["metrics"] | r["beyond_accuracy"]  # noqa: E731
    return {"run_name": run_name, "run_id": run_id, "model_file": out_file, "model_name": tracking.model_name(spec),
            "model_version": version, "method": spec.align.method, "steps": client["step"],
            "restarts": client.get("restarts", 0), "seconds": client["seconds"],
            "first_step": client["history"][0] if client["history"] else None,
            "last_step": client["history"][-1] if client["history"] else None,
            "evals": client["evals"], **{k: summary(r) for k, r in results.items()}}


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
            ys = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], ys, label=method)
    axes[0].set_title("mean list reward (rollouts)")
    axes[1].set_title("effective gradient norm (d policy loss / d logits)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--run-name", help="Ray Train run name (default: <spec>-align-<method>); the same name resumes")
    ap.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, args.overrides)
    out = run(spec, args.run_name, register=not args.no_register)
    print(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
