"""The one training loop. `TrainState` holds a run (what is trained, its optimizer and schedule,
counters, history, the weights it ships); a backend holds what differs between one process and a
Ray Train worker (optimizer steps by hand or through a DeepSpeed engine, collectives, where
checkpoints go). `run_epochs` trains a recommender epoch by epoch; `run_steps` drives alignment
step by step on the same state, backends, clock, budget and checkpoints.

Documented behaviour, the same on both backends:
- `train.fit_on=train`: evaluate on valid every `eval_every` epochs, at the last epoch and at the
  epoch that crosses `max_minutes`; the best validation NDCG@10 is the model; `patience`
  evaluations without a gain stop the run.
- `train.fit_on=train_valid` (a refit): the test split is only reported; the newest weights are
  the model, whichever way the run ends (all epochs, or the time budget).
- A checkpoint after every epoch (and every `checkpoint_every` steps); a rerun resumes from the
  latest, mid-epoch included, and replays the batches and negatives of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from jobs.contracts import EvalResult, RunProgress
from jobs.schema import JobSpec
from jobs.secrets import public_doc
from ray_jobs.catalogue import Catalogue, CatalogueMismatch
from ray_jobs.checkpoint import ModelCheckpoint, read_model, save_model
from ray_jobs.data import SeqData, Windows, train_batches, window_bounds
from ray_jobs.distributed import Collectives, return_freed_memory
from ray_jobs.losses import InfoNCE, SequenceLoss, draw_negatives
from ray_jobs.models import build_model, known_table, load_weights
from ray_jobs.models.llm import weights_padding
from ray_jobs.registry import resolve_model
from ray_jobs.scoring import CatalogueScores, evaluate_sharded, scorable_items, scorer

VALID_METRIC = "ndcg@10"
REPORTED = ("hr@10", "ndcg@10", "hr@50", "mrr")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(kw_only=True)
class TrainState(RunProgress):
    """A run in memory: what it trains, on which catalogue and versions, and its progress (the
    `RunProgress` fields every checkpoint records)."""
    spec: JobSpec
    module: nn.Module                     # what the optimizer trains; `.model` is the recommender
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    catalogue: Catalogue                  # the items trained on (by index), recorded in every checkpoint
    versions: dict[str, int]              # Delta versions of the gold tables read
    # the weights the run ships (held by rank 0): the best on validation; the newest for a refit
    # and for alignment
    model_weights: dict[str, torch.Tensor] | None = None
    stateful: dict[str, Stateful] = field(default_factory=dict)  # more state saved with each checkpoint
    stage: str = "train"                  # train | align | tokenizer: which settings a resume must keep
    run_id: str | None = None             # the MLflow run logging this run, recorded in every Ray Train checkpoint

    PROGRESS = tuple(f.name for f in dataclasses.fields(RunProgress))  # what every checkpoint records

    @property
    def model(self) -> nn.Module:
        return self.module.model

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler else self.optimizer.param_groups[0]["lr"]

    def progress(self) -> RunProgress:
        return RunProgress(**{k: getattr(self, k) for k in self.PROGRESS})

    def restore_progress(self, progress: RunProgress) -> None:
        for k in self.PROGRESS:
            setattr(self, k, getattr(progress, k))

    def model_checkpoint(self, weights: dict[str, torch.Tensor], extra: dict | None = None) -> ModelCheckpoint:
        return ModelCheckpoint.of(weights, self.spec, self.catalogue, self.versions, self.progress(), extra)

    def scorable(self) -> np.ndarray:
        """Items the model in training can score: all for a text model, the trained ones for an ID model."""
        return scorable_items(self.spec.model.kind, self.catalogue.kcore, self.catalogue.num_items)


class RunMismatch(ValueError):
    """A run folder holds a run started with other training settings; the message names them."""


# What a resumed run may change: its budget, its checkpoints, where it runs, how the model decodes at
# inference. Any other setting of what it trains (the model, the optimisation — `train` for a training
# run, `align` for an alignment run —, the sequences it reads) makes it another run, which must not
# continue this one's weights and optimizer (an optimizer's saved state would even bring back the old
# learning rate).
RESUMABLE = {"train": frozenset({"epochs", "max_minutes", "max_steps", "patience", "eval_every", "checkpoint_every",
                                 "max_failures", "checkpoint_dir", "storage_path", "use_gpu", "cpus_per_worker"}),
             "align": frozenset({"steps", "max_minutes", "eval_every", "checkpoint_every", "enabled"}),
             "model": frozenset({"cache_dir", "decode", "beam_width"})}
# of `train`, what an alignment run reads and so keeps: its shards' layout, gradient clipping
ALIGN_READS_TRAIN = ("workers", "deepspeed", "grad_clip")


def training_changes(saved: JobSpec, now: JobSpec, stage: str = "train") -> list[str]:
    """`section.key: saved -> now` for each setting of what a `stage` run ("train" or "align") trains
    that differs between its saved spec and the spec resuming it."""
    def settings(spec: JobSpec) -> dict:
        doc = spec.model_dump(mode="json")
        out = {f"data.{k}": doc["data"][k] for k in ("max_seq_len", "item_text")}
        out |= {f"model.{k}": v for k, v in trained_section(spec.model).items() if k not in RESUMABLE["model"]}
        out |= {f"{stage}.{k}": v for k, v in doc[stage].items() if k not in RESUMABLE[stage]}
        if stage == "align":
            out |= {f"train.{k}": doc["train"][k] for k in ALIGN_READS_TRAIN}
        return out
    a, b = settings(saved), settings(now)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_resumable(saved: JobSpec, now: JobSpec, stage: str, where: str) -> None:
    """Refuse to resume the `stage` run in `where` with other settings than it started with (a tokenizer
    fit's folder is keyed by every setting of the fit: nothing to check)."""
    changed = [] if stage == "tokenizer" else training_changes(saved, now, stage)
    if changed:
        raise RunMismatch(
            f"{where} holds run {saved.name!r} started with other settings ({'; '.join(changed)}); a run resumes only "
            f"with its own settings (its budget may change: {stage}.{{{','.join(sorted(RESUMABLE[stage]))}}}) — run "
            "under another name (name=...), or start over (`llmrec train --local --restart`; on Ray, another run "
            "name)")


def check_same_versions(saved: dict[str, int], now: dict[str, int], stage: str, where: str) -> None:
    """Refuse to resume a training or alignment run on other versions of the gold tables than it
    started on: other data under the same catalogue (which the catalogue check alone lets through)
    would mix two datasets' batches in one run. (A tokenizer fit is keyed by its inputs.)"""
    changed = [f"{t} {saved[t]} -> {now[t]}" for t in sorted(saved.keys() & now.keys()) if saved[t] != now[t]]
    if changed and stage != "tokenizer":
        pinned = json.dumps({t: saved[t] for t in sorted(saved)}, separators=(",", ":"))
        raise RunMismatch(f"{where} holds a run started on other versions of the gold tables ({', '.join(changed)}); a "
                          f"run resumes only on the versions it started on — pin them (--set data.pinned_versions="
                          f"'{pinned}'), run under another name, or start over")


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's state dict, floating tensors in fp32 (what checkpoints and scorers take)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in model.state_dict().items()}


def frozen_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the floating weights a model never trains (frozen parameters, buffers: a
    cached HLLM's item table, a generative model's quantizer, a LoRA base). Taken before a bf16 engine
    casts the module, they are what its checkpoints keep, not their bf16 roundings."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in weights_of(model).items() if v.is_floating_point() and k not in trained}


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup to 1, then cosine decay to `floor`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_windows(spec: JobSpec, data: SeqData) -> Windows:
    """The global window index of the fit sequences (every user's, whichever shard `data` holds)."""
    t = spec.train
    windows = window_bounds(data.fit_lengths(t.fit_on, t.withhold), spec.data.max_seq_len, t.windows)
    if not len(windows):
        raise ValueError(f"spec {spec.name}: no training sequence has two or more items")
    return windows


def epoch_batches(spec: JobSpec, data: SeqData, windows: Windows, rng: np.random.Generator, reads_time: bool):
    """One epoch's (inputs, targets, times) batches of this worker's fit sequences (`train.fit_on`,
    without the `train.withhold` items)."""
    t = spec.train
    times = data.fit_rows(t.fit_on, times=True, withhold=t.withhold) if reads_time else None
    return train_batches(windows, data.fit_rows(t.fit_on, withhold=t.withhold), spec.data.max_seq_len, t.batch_size,
                         rng, t.length_buckets, times)


def adamw(params, lr: float, device: torch.device, betas=(0.9, 0.999), weight_decay: float = 0.0):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=(device.type == "cuda") or None)


@dataclass
class WarmStart:
    """What `train.init_from` gave: the start checkpoint (None: a fresh start) and the MLflow tag
    `warm_start` that says what happened (extended by how many items, or why it fell back)."""
    path: str | None
    tag: str


def trained_section(m) -> dict:
    """A model section's settings its trained weights depend on: all but where its cache lives and,
    where no text padding shapes the weights (`weights_padding`), `item_text_padding`."""
    return m.model_dump(mode="json", exclude={"cache_dir"} | ({"item_text_padding"} if weights_padding(m) is None
                                                               else set()))


def warm_start(spec: JobSpec, data: SeqData) -> WarmStart:
    """`train.init_from`: its weights are used when its model section is this run's and the current
    item catalogue extends the one it was trained on (every index it knows names the same item);
    new items get rows by the model's rule (`ray_jobs.models.ITEM_ROWS`) and the optimizer starts
    afresh. A real mismatch — renumbered ids, another model section — is a fresh start, tagged with
    the reason."""
    if not spec.train.init_from:
        return WarmStart(None, "fresh start")
    resolved = resolve_model(spec, spec.train.init_from)
    ckpt = read_model(resolved.path)
    same = trained_section(ckpt.spec.model) == trained_section(spec.model)
    if not same or ckpt.spec.data.max_seq_len != spec.data.max_seq_len:
        return WarmStart(None, f"fresh start: {resolved.label} has another model section")
    try:
        ext = ckpt.check_data(data, resolved.label)
    except CatalogueMismatch as exc:
        return WarmStart(None, f"fresh start: {exc}")
    where = f"from {resolved.label} (version {resolved.version})"
    if ext.identical:
        return WarmStart(resolved.path, f"warm start {where}")
    return WarmStart(resolved.path, f"extended (+{ext.new_items} items, {len(ext.changed)} texts changed) {where}")


def known_items(ckpt: ModelCheckpoint | None) -> tuple[list[str], torch.Tensor] | None:
    """What building a warm start's model must take from its checkpoint rather than recompute (a
    cached HLLM's frozen item embeddings, a generative model's token table: `known_table`), with the
    texts it covers; None for a fresh start."""
    table = None if ckpt is None else known_table(ckpt.spec.model.kind, ckpt.weights)
    return None if table is None else (ckpt.item_text, table)


def training_state(spec: JobSpec, data: SeqData, device: torch.device, init_file: str | None = None) -> TrainState:
    """A training run: the spec's model (weights from `init_file` for a warm start, extended to this
    catalogue) and loss as one module, AdamW, warmup + cosine. Negatives and the full softmax range
    over the items the gold sequences hold (`SeqData.training_items`)."""
    t = spec.train
    torch.manual_seed(t.seed)
    ckpt = read_model(init_file) if init_file else None
    model = build_model(spec, data.item_text, known_items(ckpt), data.versions)
    if ckpt is not None:
        load_weights(model, spec.model.kind, ckpt.weights, ckpt.check_data(data, init_file))
    universe = torch.from_numpy(data.training_items())
    if model.decodes_items:  # the generative family: next-item likelihood, token by token
        from ray_jobs.models.generative import GenerativeLoss
        module = GenerativeLoss(model, universe).to(device)
    else:
        module = SequenceLoss(model, InfoNCE(t.temperature, t.learnable_temperature, t.negative_mask_cosine),
                              universe).to(device)
    optimizer = adamw(module.parameters(), t.lr, device, (0.9, t.adam_beta2), t.weight_decay)
    total = t.epochs * math.ceil(len(fit_windows(spec, data)) / t.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, total, t.min_lr_ratio))
    return TrainState(spec=spec, module=module, optimizer=optimizer, scheduler=scheduler, catalogue=data.catalogue,
                      versions=dict(data.versions))


def alignment_state(spec: JobSpec, policy: nn.Module, data: SeqData, device: torch.device,
                    listed: np.ndarray | None = None) -> TrainState:
    """A fresh alignment run: the policy's cosine scores as the trained module, AdamW at align.lr.
    `listed`: the items lists may hold (what the aligned model is recorded as trained on)."""
    module = CatalogueScores(policy).to(device)
    c = data.catalogue
    catalogue = c if listed is None else Catalogue(c.item_ids, c.item_text, c.active, c.kcore & listed)
    return TrainState(spec=spec, module=module, optimizer=adamw(module.parameters(), spec.align.lr, device),
                      scheduler=None, catalogue=catalogue, versions=dict(data.versions), stage="align")


# ----------------------------------------------------------------------------- backends

class Backend(ABC):
    """What the loops need from where they run. This base steps, evaluates and reports as one plain
    PyTorch process; a backend says where its checkpoints go (`save` / `restore`)."""
    rank, world = 0, 1

    def __init__(self, state: TrainState, device: torch.device = torch.device("cpu")) -> None:
        self.state, self.device = state, device
        self.comm = Collectives()

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.state.module.parameters() if p.is_floating_point())

    def forward(self, *args):
        return self.state.module(*args)

    def train(self, mode: bool = True) -> None:
        self.state.module.train(mode)

    def step(self, loss: torch.Tensor) -> None:
        s = self.state
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.spec.train.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in s.optimizer.param_groups for p in g["params"]],
                                           s.spec.train.grad_clip)
        s.optimizer.step()
        if s.scheduler:
            s.scheduler.step()

    def full_weights(self) -> dict[str, torch.Tensor]:
        return weights_of(self.state.model)

    def scoring_model(self) -> nn.Module:
        return self.state.model

    def evaluate(self, data: SeqData, split: str, item_emb: np.ndarray | None = None) -> EvalResult:
        """Full ranking of a split, users shared among the workers; the same result on every rank."""
        scorable = self.state.scorable()
        score = scorer(self.scoring_model(), self.state.spec.data.max_seq_len, scorable=scorable)
        return evaluate_sharded(self.state.spec, score, data, split, self.rank, self.world,
                                self.comm.all_gather_object, item_emb, scorable)

    @abstractmethod
    def save(self, metrics: dict) -> None:
        """Checkpoint the run's state (after an epoch, or mid-epoch every `train.checkpoint_every` steps)."""

    @abstractmethod
    def restore(self) -> bool:
        """Resume from the latest checkpoint, if there is one; whether it resumed."""


class LocalBackend(Backend):
    """One process, plain PyTorch; checkpoints are files in `<train.checkpoint_dir>/<name>/`:
    `last.pt` (weights, optimizer, schedule, progress: what a rerun resumes from) and `best.pt`
    (the model the run ships, rewritten when it changes)."""

    def __init__(self, state: TrainState, folder: str, device: torch.device = torch.device("cpu")) -> None:
        super().__init__(state, device)
        self.folder = folder
        self.last, self.best = os.path.join(folder, "last.pt"), os.path.join(folder, "best.pt")
        self._saved_weights = None

    def save(self, metrics: dict) -> None:
        s = self.state
        module = {k: v for k, v in s.module.state_dict().items() if not k.startswith("model.")}
        resume = {"module": module, "optimizer": s.optimizer.state_dict(),
                  "scheduler": s.scheduler.state_dict() if s.scheduler else None,
                  "stateful": {k: v.state_dict() for k, v in s.stateful.items()}}
        save_model(self.last, s.model_checkpoint(self.full_weights(), {"resume": resume}))
        # rewritten when the shipped weights change, and at the end (so it carries the final progress)
        if s.model_weights is not None and (s.model_weights is not self._saved_weights or s.stopped):
            save_model(self.best, s.model_checkpoint(s.model_weights))
            self._saved_weights = s.model_weights

    def restore(self) -> bool:
        if not os.path.exists(self.last):
            return False
        s, ckpt = self.state, read_model(self.last)
        check_resumable(ckpt.spec, s.spec, s.stage, self.last)
        check_same_versions(ckpt.versions, s.versions, s.stage, self.last)
        ckpt.require_same_catalogue(s.catalogue, s.versions.get("item_index"), f"resuming from {self.last}")
        resume = ckpt.extra["resume"]
        s.module.load_state_dict({**{f"model.{k}": v for k, v in ckpt.weights.items()}, **resume["module"]})
        s.optimizer.load_state_dict(resume["optimizer"])
        if s.scheduler and resume["scheduler"]:
            s.scheduler.load_state_dict(resume["scheduler"])
        for k, v in s.stateful.items():
            v.load_state_dict(resume["stateful"][k])
        s.restore_progress(ckpt.progress)
        s.restarts += 1
        if os.path.exists(self.best):
            best = read_model(self.best)
            best.require_same_catalogue(s.catalogue, s.versions.get("item_index"), f"resuming with {self.best}")
            s.model_weights = self._saved_weights = best.weights
        return True


CATALOGUE_FILE = "catalogue.json"


def run_folder_doc(state: TrainState) -> dict:
    """What a Ray Train checkpoint records beside its DeepSpeed shards (`catalogue.json`) so that a
    resume can be refused before any shard is read: the item catalogue, the run's spec and the gold
    table versions it reads; and the MLflow run that wrote it, which a resume links to."""
    return {"item_ids": state.catalogue.item_ids, "text_hashes": state.catalogue.text_hashes(),
            "spec": public_doc(state.spec), "stage": state.stage, "versions": dict(state.versions),
            "mlflow_run_id": state.run_id}


def check_folder_doc(doc: dict, spec: JobSpec, stage: str, label: str) -> None:
    """A run folder's record (`run_folder_doc`) against the run resuming it: the same stage, the same
    settings (`check_resumable`)."""
    if doc.get("stage", stage) != stage:
        raise RunMismatch(f"{label} holds a run of stage {doc['stage']!r}, this one is of stage {stage!r}: run it under "
                          "another name")
    check_resumable(JobSpec.from_saved(doc["spec"]), spec, stage, label)


def check_run_folder(folder: str, state: TrainState, label: str) -> None:
    """A Ray Train checkpoint must be the run's: its settings (`check_resumable`) and its catalogue
    (`catalogue.json`: item ids and text hashes by index, or for an older checkpoint its `model.pt`),
    checked on every rank before any DeepSpeed shard is read, so a checkpoint of another run or
    lineage is refused before it is loaded."""
    catalogue = state.catalogue
    path = os.path.join(folder, CATALOGUE_FILE)
    if os.path.exists(path):
        doc = json.loads(Path(path).read_text())
        if "spec" in doc:  # (checkpoints written before runs recorded their spec are resumed unchecked)
            check_folder_doc(doc, state.spec, state.stage, label)
        check_same_versions(doc.get("versions", {}), state.versions, state.stage, label)
        if doc.get("item_ids") != catalogue.item_ids or doc.get("text_hashes") != catalogue.text_hashes():
            raise CatalogueMismatch(f"{label}: the checkpoint's item catalogue ({len(doc.get('item_ids', [])) - 1} "
                                    f"items) is not the run's ({catalogue.num_items} items); a run resumes only on "
                                    "the versions it started on")
    elif os.path.exists(os.path.join(folder, "model.pt")):
        read_model(os.path.join(folder, "model.pt")).require_same_catalogue(catalogue, None, label)


# ----------------------------------------------------------------------------- reporting

class Reporter:
    """Where a loop's figures go (this base: nowhere). `log` takes named metrics at a step;
    `epoch` an epoch's record; `start` the total and completed steps."""

    def start(self, total: int, done: int) -> None: ...
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def epoch(self, record: dict, monitor: str) -> None: ...
    def close(self) -> None: ...


class ConsoleReporter(Reporter):
    """A progress bar with the step's loss and throughput, and a line per epoch."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), transient=True)
        self.task = None

    def start(self, total: int, done: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.task is not None and "train/loss" in metrics:
            self.bar.update(self.task, completed=step,
                            info=f"loss {metrics['train/loss']:.4f} {metrics['train/seq_per_s']:,.0f} seq/s")

    def epoch(self, record: dict, monitor: str) -> None:
        scores = (f", {monitor} hr@10 {record[monitor + '_hr@10']:.4f} ndcg@10 {record[monitor + '_ndcg@10']:.4f}"
                  if monitor + "_hr@10" in record else "")
        self.bar.console.print(f"epoch {record['epoch']}: loss {record['loss']:.4f}{scores} ({record['seconds']:.0f} s)",
                               highlight=False)

    def close(self) -> None:
        self.bar.stop()


class Clock:
    """Seconds of this run, counting what earlier attempts of it spent (a resumed run's budget)."""

    def __init__(self, spent: float) -> None:
        self.origin = time.perf_counter() - spent

    def __call__(self) -> float:
        return time.perf_counter() - self.origin


def over_budget(seconds: float, max_minutes: float | None) -> bool:
    return bool(max_minutes) and seconds > max_minutes * 60


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ----------------------------------------------------------------------------- training

def run_epochs(state: TrainState, backend: Backend, data: SeqData, reporter: Reporter = Reporter(),
               stop_after_epoch: int | None = None) -> TrainState:
    """Train from the state's epoch to `train.epochs` (see the module docstring for when the run
    evaluates, stops and what it ships). `stop_after_epoch` ends the call as an interruption would."""
    return_freed_memory()
    t = state.spec.train
    windows = fit_windows(state.spec, data)
    steps_per_epoch = math.ceil(len(windows) / t.batch_size)
    monitor = "valid" if t.fit_on == "train" else "test"
    clock = Clock(state.seconds)
    reporter.start(t.epochs * steps_per_epoch, state.step)
    # resumed at an epoch boundary after its last epoch's stop (under the settings it resumes with:
    # a larger budget or patience lets it go on): no further epoch; the reason is saved
    if state.batch == 0 and state.epoch > 0 and (stopped := stop_reason(state)):
        state.stopped = stopped
        save_epoch(backend, state, state.history[-1] if state.history else {})
        reporter.close()
        return state
    for epoch in range(state.epoch + 1, t.epochs + 1):
        record = train_epoch(state, backend, data, windows, epoch, steps_per_epoch, clock, reporter)
        state.epoch, state.batch, state.epoch_losses = epoch, 0, []
        capped = bool(t.max_steps) and state.step >= t.max_steps
        if epoch % t.eval_every == 0 or epoch == t.epochs or capped or over_budget(clock(), t.max_minutes):
            record.update(evaluate_epoch(state, backend, data, monitor))
        if monitor == "test":  # a refit selects nothing: the newest weights are the model
            state.best_epoch, state.model_weights = epoch, backend.full_weights()
        state.seconds = record["seconds"] = clock()
        state.history.append(record)
        state.stopped = stop_reason(state, last_epoch=epoch == t.epochs) or (
            "interrupted" if stop_after_epoch is not None and epoch >= stop_after_epoch else "")
        reporter.epoch(record, monitor)
        reporter.log(state.step, {f"{monitor}/{k}": record[f"{monitor}_{k}"] for k in REPORTED if f"{monitor}_{k}" in record}
                     | {"epoch/loss": record["loss"], "epoch/seq_per_s": record["seq_per_s"]})
        save_epoch(backend, state, record)
        if state.stopped:
            break
    state.stopped = state.stopped or "epochs"
    reporter.close()
    return state


def stop_reason(state: TrainState, last_epoch: bool = False) -> str:
    """Why the run stops after its current epoch under its settings: patience spent, budget spent, its
    last epoch (`last_epoch`), or `train.max_steps` reached; "" to go on."""
    t = state.spec.train
    return ("early_stopping" if state.bad_evals >= t.patience else
            "time_budget" if over_budget(state.seconds, t.max_minutes) else
            "epochs" if last_epoch else
            "max_steps" if t.max_steps and state.step >= t.max_steps else "")


def save_epoch(backend: Backend, state: TrainState, record: dict) -> None:
    backend.save({k: v for k, v in record.items() if isinstance(v, (int, float))} | {"best_metric": state.best_metric})


def train_epoch(state: TrainState, backend: Backend, data: SeqData, windows: Windows, epoch: int,
                steps_per_epoch: int, clock: Clock, reporter: Reporter) -> dict:
    """One pass over the shuffled windows (this worker's users' rows of each global batch). The summed loss
    is scaled by world / (valid positions of the global batch), so the gradient averaged over
    workers equals one process's gradient of the global batch's mean loss."""
    spec, t = state.spec, state.spec.train
    backend.train()
    rng = np.random.default_rng((t.seed, epoch))  # per-epoch seeds: a resumed run replays the same batches
    started, rows, tokens, losses = time.perf_counter(), 0, 0, state.epoch_losses
    if data.shard != (backend.rank, backend.world):
        raise ValueError(f"worker {backend.rank} of {backend.world} was given the data shard {data.shard}")
    batches = epoch_batches(spec, data, windows, rng, state.model.reads_time)
    for b, (inputs, targets, stamps) in enumerate(batches):
        if b < state.batch:  # trained before the checkpoint this run resumed from
            continue
        t_step = time.perf_counter()
        torch.manual_seed((t.seed * 7919 + state.step) * 104_729 + backend.rank)  # dropout: replayed on resume too
        inputs, targets = inputs.to(backend.device), targets.to(backend.device)
        stamps = None if stamps is None else stamps.to(backend.device)
        negatives = draw_negatives(t, state.module.universe, targets, state.step, backend.rank,
                                   backend.world).to(backend.device)
        counts = backend.comm.all_sum(torch.stack([(targets != 0).sum(), (inputs[:, -1] != 0).sum()]).float())
        loss_sum = backend.forward(inputs, targets, negatives, "sum", stamps)
        backend.step(loss_sum * backend.world / counts[0].clamp(min=1))
        state.step, state.batch = state.step + 1, b + 1
        total_loss = backend.comm.all_sum(loss_sum.detach().float().reshape(1))
        losses.append(float(total_loss) / max(1.0, float(counts[0])))
        rows, tokens = rows + int(counts[1]), tokens + int(counts[0])
        dt = max(1e-9, time.perf_counter() - t_step)
        reporter.log(state.step, {"train/loss": losses[-1], "train/lr": state.lr(),
                                  "train/seq_per_s": float(counts[1]) / dt, "train/tokens_per_s": float(counts[0]) / dt})
        if t.max_steps and state.step >= t.max_steps:
            break
        if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.batch < steps_per_epoch:
            state.seconds = clock()
            backend.save({"step": state.step, "epoch": epoch - 1, "loss": losses[-1]})
    elapsed = max(1e-9, time.perf_counter() - started)
    peak = backend.comm.all_max(torch.tensor([peak_rss_gib()], dtype=torch.float64))
    return {"epoch": epoch, "step": state.step, "loss": float(np.mean(losses)) if losses else float("nan"),
            "seq_per_s": rows / elapsed, "tokens_per_s": tokens / elapsed, "lr": state.lr(), "peak_rss_gib": float(peak)}


def evaluate_epoch(state: TrainState, backend: Backend, data: SeqData, monitor: str) -> dict:
    """Evaluate on the monitored split; on valid, keep the weights when NDCG@10 improves."""
    scores = backend.evaluate(data, monitor).metrics
    if monitor == "valid":
        if scores[VALID_METRIC] > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_evals = scores[VALID_METRIC], state.epoch, 0
            state.model_weights = backend.full_weights()
        else:
            state.bad_evals += 1
    else:
        state.best_metric = scores[VALID_METRIC]
    return {f"{monitor}_{k}": scores[k] for k in REPORTED}


# ----------------------------------------------------------------------------- step loop (alignment, the tokenizer)

@dataclass
class StepPlan:
    total: int                 # optimizer steps
    eval_every: int            # 0: only at the start and the end
    checkpoint_every: int      # 0: only at the end
    max_minutes: float | None  # wall-clock budget
    # the evaluated step whose weights ship, given the validation records so far (None: none yet);
    # without it the newest weights ship
    ship: Callable[[list[dict]], int | None] | None = None


def run_steps(state: TrainState, backend: Backend, plan: StepPlan, step_fn: Callable[[int], tuple[torch.Tensor, dict]],
              evaluate: Callable[[int], dict], reporter: Reporter = Reporter(), prefix: str = "align",
              monitor: str = "valid") -> TrainState:
    """Optimizer steps from the state's step to `plan.total`: `step_fn(step)` gives the loss and the
    step's metrics (reported as `<prefix>/*`); `evaluate(step)` a validation record (`<monitor>/*`:
    at the start, every `eval_every` steps, at the end and at the step that crosses the budget). The
    newest weights are the model, or with `plan.ship` those of the evaluated step it names; the
    model is checkpointed every `checkpoint_every` steps, at the end and at a budget stop."""
    return_freed_memory()
    clock = Clock(state.seconds)
    reporter.start(plan.total, state.step)

    def validate(step: int) -> None:
        record = evaluate(step)
        state.evals.append(record)
        reporter.log(step, {f"{monitor}/{k}": v for k, v in record.items() if k != "step"})
        if plan.ship is not None and plan.ship(state.evals) == step:  # every rank: the same records
            state.model_weights, state.shipped_step = backend.full_weights(), step

    if not state.evals and plan.eval_every:
        validate(0)
    for step in range(state.step, plan.total):
        started = time.perf_counter()
        loss, metrics = step_fn(step)
        backend.step(loss)
        state.step = step + 1
        metrics.update(step=state.step, seconds_per_step=time.perf_counter() - started)
        state.history.append(metrics)
        reporter.log(state.step, {f"{prefix}/{k}": v for k, v in metrics.items() if k != "step" and v is not None})
        last, over = state.step == plan.total, over_budget(clock(), plan.max_minutes)
        if last or over or (plan.eval_every and state.step % plan.eval_every == 0):
            validate(state.step)
        state.seconds = clock()
        if last or over or (plan.checkpoint_every and state.step % plan.checkpoint_every == 0):
            state.stopped = "time_budget" if over and not last else "steps" if last else ""
            if plan.ship is None:
                state.model_weights, state.shipped_step = backend.full_weights(), state.step
            backend.save({"step": state.step} | {k: v for k, v in metrics.items() if isinstance(v, float)})
        if over:
            break
    state.stopped = state.stopped or "steps"
    reporter.close()
    return state
