"""The list-wise alignment job: Ray Train workers, each a DeepSpeed engine over the policy (a trained
model's catalogue scores), sample Plackett–Luce lists, score them with the spec's rewards and train
the method's weighted list likelihood + beta·KL to the frozen start, through the same state,
backend, checkpoints and budget as training (`ray_jobs.loop.run_steps`).

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

import dataclasses
import json
import os
import sys
from datetime import datetime, timezone

import numpy as np
import torch

from jobs.contracts import AlignOutcome, AlignWorkerConfig, Check, ModelRecord, Tag, markdown_table, meta
from jobs.schema import AlignSpec, GateSpec, JobSpec, TrainSpec
from jobs.spec import absolute_paths, tracking_uri
from ray_jobs import tracking
from ray_jobs.alignment.aligner import AlignData, Aligner
from ray_jobs.checkpoint import ModelCheckpoint, read_model, save_model
from ray_jobs.data import SeqData, load_sequences
from ray_jobs.distributed import deepspeed_config
from ray_jobs.entrypoint import DagsterReport, job_main, markdown_image, run_options
from ray_jobs.loop import Reporter, StepPlan, alignment_state, run_steps
from ray_jobs.metrics import tail_items
from ray_jobs.models import TRAINABLE
from ray_jobs.models.llm import minilm_item_embeddings, weights_padding
from ray_jobs.next_day import day_start, load_next_day
from ray_jobs.registry import ResolvedModel, check_storage_path, resolve_model, run_dir
from ray_jobs.runtime import (DeepSpeedBackend, check_previous_run, evaluate_distributed, final_model, fit, init_ray,
                              worker_context)
from ray_jobs.scoring import scorable_items

EVAL_KEYS = ("hr@10", "ndcg@10", "mrr")
BEYOND_KEYS = ("coverage@10", "ild@10", "tail_share@10", "gini@10")


def gate_step(gate: GateSpec, evals: list[dict]) -> int | None:
    """align.ship=gate: the evaluated step (after the start) whose weights ship. Its validation
    figures are judged as the champion gate judges a candidate, against the start model's (the step-0
    record): among the steps meeting every `gate.constraints` condition, the best on `gate.metric`;
    without constraints, or when no step meets them, the best step on `gate.metric` (ties: the later)."""
    start = next((e for e in evals if e["step"] == 0), None)
    steps = [e for e in evals if e["step"] > 0]
    if not steps:
        return None
    passing = [e for e in steps if start is not None and all(c.meets(e[c.metric], start[c.metric])
                                                             for c in gate.constraints)]
    return max(passing or steps, key=lambda e: (e[gate.metric], e["step"]))["step"]


def check_ship(spec: JobSpec) -> None:
    """align.ship=gate reads the gate's figures from the validation records of the run."""
    if spec.align.ship != "gate":
        return
    known = EVAL_KEYS + BEYOND_KEYS
    for what, metric in [("gate.metric", spec.gate.metric)] + [("gate.constraints", c.metric)
                                                               for c in spec.gate.constraints]:
        if metric not in known:
            raise ValueError(f"align.ship=gate: {what} names {metric!r}, which the alignment run does not "
                             f"evaluate (its validation figures: {', '.join(known)})")


def default_run_name(spec: JobSpec) -> str:
    return f"{spec.name}-align-{spec.align.method}"


def with_init_model(spec: JobSpec, init: ModelCheckpoint, label: str, cache_dir: str | None) -> JobSpec:
    """The alignment spec with the starting model's architecture (model section, max_seq_len)."""
    # a checkpoint from `llmrec train --local` may hold a relative cache folder: resolve it here,
    # where it was written, not in a Ray worker's working directory
    update = {"cache_dir": cache_dir or os.path.abspath(init.spec.model.cache_dir)}
    if weights_padding(init.spec.model) is None:  # the padding only sets the MiniLM space: the spec's, as evaluation's
        update["item_text_padding"] = spec.model.item_text_padding
    model = init.spec.model.model_copy(update=update)
    if model.kind not in TRAINABLE:
        raise ValueError(f"align.init={label}: model.kind={model.kind!r} has no trainable scores to align")
    if spec.align.method == "pars" and model.kind != "generative":
        raise ValueError(f"align.init={label}: align.method=pars credits the semantic tokens of a generative model's "
                         f"items, and model.kind={model.kind!r} has none")
    return spec.model_copy(update={"model": model,
                                   "data": spec.data.model_copy(update={"max_seq_len": init.spec.data.max_seq_len})})


def prefix_groups(model, method: str) -> torch.Tensor | None:
    """The token prefixes align.method=pars credits: a generative policy's (None for other methods)."""
    if method != "pars":
        return None
    return model.prefix_groups() if hasattr(model, "prefix_groups") else None


def align_worker(config: dict) -> None:
    """One Ray Train worker: the step loop over a DeepSpeed engine on the policy; rank 0 logs to MLflow."""
    cfg = AlignWorkerConfig.from_dict(config)
    spec = JobSpec.model_validate(cfg.spec)
    a = spec.align
    ctx = worker_context(spec, cfg.pid_dir)
    data = load_sequences(spec, cfg.versions)
    init = read_model(cfg.init)
    torch.manual_seed(a.seed)

    def start_model():  # on this data's catalogue, which extends the start model's
        return init.build(cfg.cache_dir, data.catalogue)
    listed = data.catalogue.kcore & scorable_items(init.spec.model.kind, init.catalogue.seen_mask(), data.num_items)
    state = alignment_state(spec, start_model(), data, ctx.device, listed)
    state.run_id = cfg.run_id
    backend = DeepSpeedBackend(state, cfg.deepspeed, ctx.rank, ctx.world, ctx.device, start_model)
    backend.train(False)  # no dropout: rollouts and the trained log-probabilities come from one policy
    item_emb = minilm_item_embeddings(spec.model, data.item_text)
    reads_time = state.model.reads_time  # a time-reading start model (HSTU's time bias)
    aligner = Aligner(a, align_data(spec, data, cfg.versions, reads_time), data.num_items,
                      spec.data.max_seq_len, torch.from_numpy(item_emb),
                      torch.from_numpy(tail_items(data.popularity, spec.eval.tail_share)),
                      start_model(), backend.comm, ctx.device, backend.dtype, listed, prefix_groups(state.model, a.method))
    state.stateful["aligner"] = aligner
    if not backend.restore():
        aligner.init_reference(a.seed)
    reporter = tracking.MetricLogger(tracking_uri(spec), cfg.run_id) if ctx.rank == 0 and cfg.run_id else Reporter()

    def step(i: int):
        loss, stats = aligner.step(backend.forward, i, a.seed)
        return loss, stats.as_dict()

    def evaluate(i: int) -> dict:
        r = backend.evaluate(data, "valid", item_emb).flat()
        return {"step": i} | {k: r[k] for k in EVAL_KEYS + BEYOND_KEYS}

    ship = (lambda evals: gate_step(spec.gate, evals)) if a.ship == "gate" else None
    run_steps(state, backend, StepPlan(a.steps, a.eval_every, a.checkpoint_every, a.max_minutes, ship), step,
              evaluate, reporter)


NEXT_DAY_TABLES = ("interactions", "item_index", "user_index")


def align_data(spec: JobSpec, data: SeqData, versions: dict[str, int], reads_time: bool) -> AlignData:
    """The users aligned and their reward's relevant items: each user's last `align.holdout`
    training items, or with `align.reward_day` that day's new items after the history before it —
    less each user's validation and test targets in `data`: the figures the aligned model is judged
    on (and gated by) are never its rewards."""
    a = spec.align
    if a.reward_day is None:
        return AlignData.build(data.train, data.num_items, a.holdout, a.list_size,
                               data.train_times if reads_time else None)
    missing = [t for t in NEXT_DAY_TABLES if t not in versions]
    if missing:
        raise ValueError(f"align.reward_day={a.reward_day}: the pinned versions name no {', '.join(missing)} "
                         "(the day's interactions are read from the tables an ETL run published together)")
    q = load_next_day(spec, versions, a.reward_day)
    judged: dict[int, set[int]] = {}
    for split in (data.valid, data.test):
        for u, t in zip(split.users.tolist(), split.targets.tolist()):
            judged.setdefault(u, set()).add(t)
    targets = [np.asarray([x for x in t.tolist() if x not in judged.get(int(u), ())], dtype=np.int64)
               for u, t in zip(q.users, q.targets)]
    keep = [i for i, t in enumerate(targets) if len(t)]
    if not keep:
        raise ValueError(f"align.reward_day={a.reward_day}: no user has new items on that day in the interactions "
                         f"table (version {versions['interactions']}) besides their validation and test targets")
    return AlignData.of_day(q.users[keep], [q.histories[i] for i in keep], [targets[i] for i in keep], q.num_items,
                            a.list_size, [q.times[i] for i in keep] if reads_time else None, day_start(a.reward_day))


def check_trained_before(spec: JobSpec, init: ModelCheckpoint, label: str) -> None:
    """With `align.reward_day`, the start model must not have seen the day: every event of the data it
    was trained from (its tables at the versions it records) is older than the day's start. No
    setting lifts this (`align.allow_seen_rewards` is about the holdout)."""
    a = spec.align
    missing = [t for t in ("sequences", "item_index") if t not in init.versions]
    if missing:
        raise ValueError(f"align.init={label} records no version of {', '.join(missing)}, so whether it saw "
                         f"align.reward_day={a.reward_day} cannot be checked")
    data = load_sequences(spec, init.versions)
    times = [t for t in data.train_times if len(t)] + [x.target_times for x in (data.valid, data.test)
                                                        if len(x.target_times)]
    last = max((int(t.max()) for t in times), default=None)
    if last is None:
        raise ValueError(f"align.init={label}: its data has no timestamps, so whether it saw "
                         f"align.reward_day={a.reward_day} cannot be checked")
    if last >= day_start(a.reward_day):
        seen = datetime.fromtimestamp(last, timezone.utc).strftime("%Y-%m-%d %H:%M")
        raise ValueError(f"align.init={label} has seen its reward day: its data runs to {seen} UTC, on or after "
                         f"align.reward_day={a.reward_day}, so the NDCG reward would measure memorisation. Align a "
                         "model trained through the day before (the champion of that night)")


def check_rewards_unseen(a: AlignSpec, start: TrainSpec, label: str, aligned: bool = False) -> None:
    """The NDCG reward is each user's last `align.holdout` training items; a start model that has seen
    them is refused unless `align.allow_seen_rewards` says so: one trained on them (its
    train.withhold smaller), one started from other weights (`train.init_from`: they may have), or
    an aligned model (it was rewarded on them). `train.warm_start_from_champion` alone is only
    Dagster's request: the asset sets `init_from` when there is a champion to start from."""
    if a.allow_seen_rewards:
        return
    why = (f"its train.withhold={start.withhold} < align.holdout={a.holdout}" if start.withhold < a.holdout else
           f"it was warm-started from {start.init_from}" if start.init_from else
           "it is an aligned model, rewarded on them" if aligned else None)
    if why:
        raise ValueError(f"align.init={label} has seen its reward items: {why}, so the NDCG reward would measure "
                         f"memorisation. Align a model trained from scratch with train.withhold={a.holdout} "
                         "(or set align.allow_seen_rewards=true)")


def alignment_start(spec: JobSpec) -> tuple[JobSpec, ResolvedModel, ModelCheckpoint]:
    """The start model `align.init` names (its rewards checked unseen unless a reward day is set) and
    the spec of the run from it: the start's architecture, and `align.init` pinned — the registry
    version an alias named, or the file with its digest — so a resume after the alias moved or the
    file was rewritten aligns against another reference policy and is refused as another setting."""
    start = resolve_model(spec, spec.align.init)
    init = read_model(start.path)
    if spec.align.reward_day is None:
        check_rewards_unseen(spec.align, init.spec.train, start.label, aligned="align" in init.extra)
    spec = with_init_model(spec, init, start.label, start.cache_dir)
    return spec.model_copy(update={"align": spec.align.model_copy(update={"init": start.pinned})}), start, init


def run(spec: JobSpec, run_name: str | None = None, pid_dir: str | None = None, register: bool = True) -> AlignOutcome:
    """Align on Ray, write `<storage>/<run>/model.pt`, evaluate start vs aligned, log and register."""
    spec = absolute_paths(spec)
    run_name = run_name or default_run_name(spec)
    t = spec.train
    check_storage_path(spec)
    check_ship(spec)
    if spec.align.users_per_step < t.workers:
        raise ValueError(f"align.users_per_step={spec.align.users_per_step} is smaller than train.workers={t.workers}: "
                         "every worker needs at least one user per step")
    spec, start, init = alignment_start(spec)
    previous = check_previous_run(spec, run_name, "align")  # a rerun of the name with other settings: refused first
    if spec.align.reward_day is not None:
        check_trained_before(spec, init, start.label)
    cache_dir = spec.model.cache_dir
    init_ray(spec)
    data = load_sequences(spec)
    init.check_data(data, f"align.init={start.label}")
    del init
    if spec.align.reward_day is not None:  # the day has users for every worker: said before any worker starts
        users = len(align_data(spec, data, data.versions, reads_time=False).users)
        if users < t.workers:
            raise ValueError(f"align.reward_day={spec.align.reward_day}: {users} users to align, fewer than "
                             f"train.workers={t.workers}")
    # computed (and cached) here, so the workers read it from the cache and the evaluation reuses it
    item_emb = minilm_item_embeddings(spec.model, data.item_text)
    ds_cfg = deepspeed_config(spec, t.workers, spec.align.users_per_step)
    run_id = tracking.start_run(spec, run_name, "align",
                                {**{f"delta_version.{k}": v for k, v in data.versions.items()}, "run_name": run_name,
                                 "align.init_model": start.label}, {"deepspeed.json": json.dumps(ds_cfg, indent=2)},
                                resumes=previous)
    with tracking.failed_on_error(spec, run_id):
        config = AlignWorkerConfig(spec.model_dump(mode="json"), data.versions, ds_cfg, start.path, cache_dir, run_id,
                                   pid_dir)
        checkpoint = fit(spec, align_worker, config.to_dict(), run_name, "alignment")
        return finish(spec, run_name, run_id, checkpoint, data, item_emb, start, cache_dir, register)


def kl_after(history: list[dict], step: int) -> float | None:
    """The whole-list KL of the weights after `step`'s update. A step record's `kl` is that of the policy
    that sampled the step's rollouts, the weights before its update, so it is the next step's record
    (None after the run's last step)."""
    return next((h.get("kl") for h in history if h["step"] == step + 1), None)


def finish(spec: JobSpec, run_name: str, run_id: str, checkpoint, data, item_emb, start, cache_dir: str | None,
           register: bool) -> AlignOutcome:
    """Driver side after fit: model.pt, start vs aligned on valid and test, MLflow, registry."""
    t = spec.train
    aligned = final_model(checkpoint)
    p = aligned.progress
    aligned.extra = {"align": {"method": spec.align.method, "init": start.label}}
    aligned.progress = dataclasses.replace(p, history=[])  # the step records go to MLflow, not into the model
    out_file = save_model(os.path.join(run_dir(spec, run_name), "model.pt"), aligned)
    results = {f"{name}_{split}": r for name, path in (("base", start.path), ("aligned", out_file))
               for split, r in evaluate_distributed(spec, path, ("valid", "test"), t.workers, data, item_emb,
                                                    cache_dir).items()}
    metrics = {}
    for key, r in results.items():
        name, split = key.split("_")
        metrics.update(tracking.final_metrics("final" if name == "aligned" else "base", split, r))
    version, plots = tracking.publish(
        spec, run_id, out_file, metrics,
        documents={"alignment_curves.json": {"steps": p.history, "evals": p.evals},
                   "evaluation.json": {k: r.to_dict() for k, r in results.items()}},
        plots={"alignment_curves.png": lambda path: tracking.plot_alignment_curves(
            {spec.align.method: p.history}, path, {spec.align.method: p.evals})},
        tags={Tag.ALIGN_METHOD: spec.align.method, Tag.ALIGN_INIT: start.label, "restarts": p.restarts,
              "stopped": p.stopped, "shipped_step": p.shipped_step},
        register=register, catalogue=data.catalogue)
    model = ModelRecord(out_file, spec.registered_model_name(), version, data.versions, run_id)
    shipped = next((h for h in p.history if h["step"] == p.shipped_step), None)
    return AlignOutcome(run_name, run_id, model, spec.align.method, start.label, p.step, p.restarts, p.stopped,
                        p.seconds, p.history[0] if p.history else None, p.history[-1] if p.history else None, p.evals,
                        {k: r.flat() for k, r in results.items()}, plots, shipped,
                        kl_after(p.history, p.shipped_step or p.step))


def dagster_report(spec: JobSpec, out: AlignOutcome) -> DagsterReport:
    """The aligned_model asset's metadata, and its check: the shipped weights' KL to the start model within
    `checks.max_align_kl` and coverage@10 not collapsed (at least `checks.min_coverage_ratio` of the start's)."""
    rows = {f"{name} ({split})": out.results[f"{name}_{split}"] for name in ("base", "aligned") for split in ("valid", "test")}
    c = spec.checks
    return DagsterReport(
        metadata={**out.model.to_metadata(), "mlflow_run": tracking.run_link(spec, out.run_id),
                  "method": out.method, "init": out.init, "steps": out.steps, "stopped": out.stopped,
                  "shipped_step": (out.shipped or out.last_step or {}).get("step", out.steps),
                  "align_seconds": round(out.seconds, 1), "valid_ndcg@10": out.results["aligned_valid"]["ndcg@10"],
                  "base_valid_ndcg@10": out.results["base_valid"]["ndcg@10"], "kl": out.shipped_kl,
                  "metrics": meta(markdown_table(rows), "md"),
                  "alignment_curves": markdown_image(out.plots["alignment_curves.png"], "reward and gradient curves")},
        checks={Check.ALIGN_BOUNDS: (out.shipped_kl <= c.max_align_kl and out.coverage_ratio >= c.min_coverage_ratio, {
            "kl": out.shipped_kl, "max_kl": c.max_align_kl, "coverage_ratio": out.coverage_ratio,
            "min_coverage_ratio": c.min_coverage_ratio})})


def main(argv: list[str] | None = None) -> int:
    options = run_options("<spec>-align-<method>")
    return job_main(__doc__, options, lambda spec, a: run(spec, a.run_name, register=not a.no_register), argv,
                    dagster_report)


if __name__ == "__main__":
    sys.exit(main())
