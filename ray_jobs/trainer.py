"""The single-process training loop: AdamW, warmup + cosine, clipping, early stopping on validation
NDCG@10, one checkpoint dict, resume, seeds, progress. The same step function runs under Ray Train.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from jobs.spec import JobSpec
from ray_jobs.data import SeqData, left_pad, load_sequences, train_batches, training_windows
from ray_jobs.losses import InfoNCE, gather_negatives, position_negatives, step_negatives
from ray_jobs.metrics import evaluate
from ray_jobs.models.sasrec import SASRec

VALID_METRIC = "ndcg@10"


def build_model(spec: JobSpec, item_text: list[str], item_index_version: int | None = None) -> torch.nn.Module:
    """The spec's sequence model for a catalogue of len(item_text) - 1 items (id 0 = padding)."""
    m = spec.model
    if m.kind == "sasrec":
        return SASRec(len(item_text) - 1, spec.data.max_seq_len, m.dim, m.blocks, m.heads, m.dropout, m.block)
    if m.kind == "hllm":
        from ray_jobs.models.hllm import HLLM
        return HLLM(m, item_text, spec.data.max_seq_len, item_index_version)
    raise ValueError(f"model.kind={m.kind!r} is not a trainable sequence model (sasrec, hllm)")


def scorer(model: torch.nn.Module, max_len: int, chunk: int = 64):
    """Histories -> cosine scores against every item (the geometry the loss trains).

    Users are encoded in chunks of similar history length, each trimmed to its longest history
    (padding columns carry no information: padded keys are masked and positions count from the
    right), so short histories do not pay for 200-long attention; results are put back in order."""
    device = next(model.parameters()).device

    def score(histories: list[np.ndarray]) -> torch.Tensor:
        model.eval()
        lengths = np.asarray([min(len(h), max_len) for h in histories])
        order = np.argsort(lengths, kind="stable")
        with torch.no_grad():
            parts = []
            for start in range(0, len(order), chunk):
                rows = order[start:start + chunk]
                width = max(1, int(lengths[rows].max()))
                ids = left_pad([histories[i] for i in rows], width)
                parts.append(model.user_embeddings(ids.to(device)))
            user = torch.empty((len(histories), parts[0].shape[-1]), dtype=parts[0].dtype, device=device)
            user[torch.as_tensor(order, device=device)] = torch.cat(parts)
            user = torch.nn.functional.normalize(user, dim=-1)
            items = torch.nn.functional.normalize(model.all_item_embeddings(), dim=-1)
            return (user @ items.T).float().cpu()
    return score


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup to 1, then cosine decay to `floor`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def sequence_loss(model: torch.nn.Module, loss_fn: InfoNCE, inputs: torch.Tensor, targets: torch.Tensor,
                  negatives: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Every non-padded position predicts its next item against the shared negatives (this
    worker's share of them, all-gathered when distributed)."""
    out = model(inputs)
    d = out.shape[-1]
    if negatives.numel() == 0:  # full softmax over the catalogue
        return loss_fn.full(out.reshape(-1, d), targets.reshape(-1), model.all_item_embeddings(),
                            (targets != 0).reshape(-1), reduction)
    if negatives.dim() == 3:  # (B, L, R): per-position negatives against the whole item table
        return loss_fn.per_position(out.reshape(-1, d), targets.reshape(-1), model.all_item_embeddings(),
                                    negatives.reshape(-1, negatives.shape[-1]), (targets != 0).reshape(-1), reduction)
    return loss_fn(out.reshape(-1, d), model.item_embeddings(targets).reshape(-1, d),
                   gather_negatives(model.item_embeddings(negatives)), (targets != 0).reshape(-1), reduction)


def draw_negatives(t, num_items: int, targets: torch.Tensor, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The step's negatives for `sequence_loss`: this worker's share of the shared pool (R,), or
    R per position (B, L, R) when `train.negative_sampling` is per_position, or nothing (full softmax)."""
    if t.negative_sampling == "full":
        return torch.empty(0, dtype=torch.long)
    if t.negative_sampling == "per_position":
        return position_negatives(num_items, tuple(targets.shape), t.negatives, t.seed, step, rank)
    return step_negatives(num_items, t.negatives, t.seed, step, rank, world)


class SequenceLoss(torch.nn.Module):
    """Model and loss as one module, so a DeepSpeed engine owns every trained parameter (a
    learnable temperature included) and ZeRO-3 gathers them all inside one forward."""

    def __init__(self, model: torch.nn.Module, loss_fn: InfoNCE) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
        return sequence_loss(self.model, self.loss_fn, inputs, targets, negatives, reduction)


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    epochs_run: int
    steps: int
    seconds: float
    stopped: str
    checkpoint: str
    history: list[dict] = field(default_factory=list)


def checkpoint_dir(spec: JobSpec) -> str:
    return os.path.join(spec.train.checkpoint_dir, spec.name)


def evaluate_split(spec: JobSpec, score, data: SeqData, split: str, item_emb: np.ndarray | None = None) -> dict:
    """Full-ranking metrics of any score function on one split, with the spec's eval settings."""
    s = data.split(split)
    e = spec.eval
    return evaluate(score, s.histories, s.targets, data.num_items, data.popularity,
                    e.ks, e.batch_size, item_emb, e.tail_share, e.cold_item_max, e.short_history_max)


def train_local(spec: JobSpec, data: SeqData | None = None, resume: bool = True, show_progress: bool = True,
                stop_after_epoch: int | None = None) -> TrainResult:
    """Train, validating every `eval_every` epochs; resumes from `<checkpoint_dir>/<name>/last.pt`.
    `stop_after_epoch` ends this call early, as an interruption would (the schedule is unchanged)."""
    t = spec.train
    data = data or load_sequences(spec)
    torch.manual_seed(t.seed)
    model = build_model(spec, data.item_text, data.versions.get("item_index"))
    loss_fn = InfoNCE(t.temperature, t.learnable_temperature, t.negative_mask_cosine)
    params = [p for p in model.parameters() if p.requires_grad] + ([loss_fn.log_scale] if t.learnable_temperature else [])
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay)
    windows = training_windows(data.fit_sequences(t.fit_on), spec.data.max_seq_len, t.windows)
    # A refit (train_valid) has seen the validation targets: it runs the fixed epoch count and only
    # reports the test split as it goes; nothing is selected on it, the final epoch is the model.
    monitor = "valid" if t.fit_on == "train" else "test"
    if not windows:
        raise ValueError(f"spec {spec.name}: no training sequence has two or more items")
    steps_per_epoch = math.ceil(len(windows) / t.batch_size)
    total = t.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, total, t.min_lr_ratio))
    folder = checkpoint_dir(spec)
    os.makedirs(folder, exist_ok=True)
    state = {"epoch": 0, "step": 0, "best_metric": -1.0, "best_epoch": 0, "bad_evals": 0, "history": [], "seconds": 0.0}
    last = os.path.join(folder, "last.pt")
    if resume and os.path.exists(last):
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "loss" in ckpt:
            loss_fn.load_state_dict(ckpt["loss"])
        state = ckpt["state"]

    def save(path: str) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "state": state,
                    "spec": spec.model_dump(mode="json"), "item_text": data.item_text,
                    "versions": data.versions}, path + ".tmp")
        os.replace(path + ".tmp", path)

    start = time.perf_counter() - state["seconds"]
    stopped = "epochs"
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), disable=not show_progress, transient=True)
    with progress:
        task = progress.add_task("train", total=total, completed=state["step"], info="")
        for epoch in range(state["epoch"] + 1, t.epochs + 1):
            model.train()
            rng = np.random.default_rng((t.seed, epoch))  # per-epoch seeds: a resumed run replays the same batches
            torch.manual_seed(t.seed * 7919 + epoch)
            t_epoch, seen, losses = time.perf_counter(), 0, []
            for inputs, targets in train_batches(windows, spec.data.max_seq_len, t.batch_size, rng, length_buckets=t.length_buckets):
                negatives = draw_negatives(t, data.num_items, targets, state["step"])
                loss = sequence_loss(model, loss_fn, inputs, targets, negatives)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                seen += len(inputs)
                losses.append(loss.item())
                rate = seen / max(1e-9, time.perf_counter() - t_epoch)
                progress.update(task, advance=1, info=f"epoch {epoch} loss {loss.item():.4f} {rate:,.0f} seq/s")
            state["epoch"] = epoch
            record = {"epoch": epoch, "step": state["step"], "loss": float(np.mean(losses)),
                      "seq_per_s": seen / max(1e-9, time.perf_counter() - t_epoch), "lr": scheduler.get_last_lr()[0]}
            if epoch % t.eval_every == 0 or epoch == t.epochs:
                scores = evaluate_split(spec, scorer(model, spec.data.max_seq_len), data, monitor)["metrics"]
                record.update({f"{monitor}_{k}": scores[k] for k in ("hr@10", "ndcg@10", "hr@50", "mrr")})
                if monitor == "test":
                    pass
                elif scores[VALID_METRIC] > state["best_metric"]:
                    state.update(best_metric=scores[VALID_METRIC], best_epoch=epoch, bad_evals=0)
                    save(os.path.join(folder, "best.pt"))
                else:
                    state["bad_evals"] += 1
            state["seconds"] = time.perf_counter() - start
            record["seconds"] = state["seconds"]
            state["history"].append(record)
            if monitor == "test":
                state.update(best_epoch=epoch, best_metric=record.get("test_ndcg@10", state["best_metric"]))
                save(os.path.join(folder, "best.pt"))
            save(last)
            if show_progress:
                progress.console.print(
                    f"epoch {epoch}: loss {record['loss']:.4f}"
                    + (f", {monitor} hr@10 {record[monitor + '_hr@10']:.4f} ndcg@10 {record[monitor + '_ndcg@10']:.4f}"
                       if monitor + "_hr@10" in record else "") + f" ({record['seconds']:.0f} s)", highlight=False)
            if state["bad_evals"] >= t.patience:
                stopped = "early_stopping"
                break
            if t.max_minutes and state["seconds"] > t.max_minutes * 60:
                stopped = "time_budget"
                break
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                stopped = "interrupted"
                break
    return TrainResult(state["best_metric"], state["best_epoch"], state["epoch"], state["step"], state["seconds"],
                       stopped, os.path.join(folder, "best.pt"), state["history"])


def load_trained(path: str, cache_dir: str | None = None) -> tuple[torch.nn.Module, dict]:
    """A model from a checkpoint dict (model, spec, item_text, versions) written by `train_local`
    or `ray_jobs.train`, ready to score. `cache_dir` points a cached-mode HLLM at a shipped
    item-embedding cache (a registered model carries its own)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = JobSpec.model_validate(ckpt["spec"])
    if cache_dir:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"cache_dir": cache_dir})})
    model = build_model(spec, ckpt["item_text"], ckpt["versions"].get("item_index"))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
