"""Scores: a model's cosine scores against the whole catalogue, full ranking of a split (in one
process or as shards gathered across workers), top-K lists, and the baselines behind one call.

Every consumer scores through here: the training loop's evaluation, the evaluate / recommend /
align jobs, the MLflow pyfunc, the CLI and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jobs.contracts import EvalResult
from jobs.schema import JobSpec
from ray_jobs.catalogue import Catalogue, Extension
from ray_jobs.checkpoint import ModelCheckpoint, read_model
from ray_jobs.data import EvalSplit, SeqData, left_pad
from ray_jobs.metrics import ScoreFn, call_scores, evaluate, mask_scores, rank_and_topk, summarize, usable_ks
from ray_jobs.models import SequenceRecommender, scores_unseen_items
from ray_jobs.models.baselines import Popularity, TransitionGraph

# (global rows of the split, target ranks, top-k lists, history lengths, targets) of the users ranked
Shard = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def cosine_scores(user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, n + 1) cosine of each user vector with every item vector: the geometry the loss trains."""
    return F.normalize(user, dim=-1) @ F.normalize(items, dim=-1).T


class CatalogueScores(nn.Module):
    """Left-padded histories (B, L) — and, for a model that reads them, their timestamps followed by
    the time of the prediction (B, L + 1) — -> a score of every item (B, n + 1), with gradients: the
    alignment policy's logits (times its temperature). The cosine of the user and item vectors; for a
    model that decodes items (the generative family), each item's exact log-probability (-inf for an
    item without tokens), so at temperature 1 the policy is the model's own distribution."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reads_time = model.reads_time

    def forward(self, ids: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        user = self.model.user_embeddings(ids) if times is None else self.model.user_embeddings(ids, times)
        if self.model.decodes_items:
            return self.model.item_log_probs(user)
        return cosine_scores(user, self.model.all_item_embeddings())


def scorer(model: SequenceRecommender, max_len: int, chunk: int = 64, scorable: np.ndarray | None = None) -> ScoreFn:
    """Histories -> cosine scores against every item, on the model's device, returned on the CPU.

    Users are encoded in chunks of similar history length, each trimmed to its longest history
    (padding columns carry no information: padded keys are masked and positions count from the
    right), so short histories do not pay for max_len-long attention; results are put back in order.
    The catalogue's vectors are computed on the first call and reused: a scorer serves one fixed
    model (every caller makes one per evaluation or per loaded model), and for HLLM they cost more
    than the users of a batch.

    A model that reads timestamps (HSTU's time bias) gets each history's timestamps followed by the
    time the prediction is for (len(history) + 1 entries each, `EvalSplit.stamps`), left padded the
    same way: the score function then takes (histories, times) and says so (`reads_time`, see
    call_scores).

    `scorable` (a boolean mask over item ids): items the model can score; the others get -inf (an ID
    model and an item it never trained on)."""
    device = next(model.parameters()).device
    unscorable = None if scorable is None else torch.as_tensor(~np.asarray(scorable, bool))
    catalogue: list[torch.Tensor] = []
    timed = model.reads_time
    reuse = model.reads_catalogue  # HLLM: history items read from the catalogue
    decodes = model.decodes_items  # the generative family: every item's score by decoding it

    def score(histories: list[np.ndarray], times: list[np.ndarray] | None = None) -> torch.Tensor:
        model.eval()
        if timed and (times is None or len(times) != len(histories)
                      or any(len(t) != len(h) + 1 for t, h in zip(times, histories))):
            raise ValueError("this model reads each event's timestamp: score(histories, times) needs each "
                             "history's timestamps followed by the time the prediction is for "
                             "(len(history) + 1 entries)")
        lengths = np.asarray([min(len(h), max_len) for h in histories])
        order = np.argsort(lengths, kind="stable")
        with torch.no_grad():
            if not catalogue and not decodes:
                catalogue.append(model.all_item_embeddings())
            extra = {"catalogue": catalogue[0]} if reuse else {}
            parts = []
            for start in range(0, len(order), chunk):
                rows = order[start:start + chunk]
                width = max(1, int(lengths[rows].max()))
                ids = left_pad([histories[i] for i in rows], width).to(device)
                if timed:
                    stamps = left_pad([times[i] for i in rows], width + 1).to(device)
                    parts.append(model.user_embeddings(ids, stamps, **extra))
                else:
                    parts.append(model.user_embeddings(ids, **extra))
                if decodes:  # item scores per chunk: the decoder's states are (users x prefixes) wide
                    parts[-1] = model.item_scores(parts[-1]).float().cpu()
            out = torch.cat(parts)
            user = torch.empty((len(histories), out.shape[-1]), dtype=out.dtype, device=out.device)
            user[torch.as_tensor(order, device=out.device)] = out
            scores = user if decodes else cosine_scores(user, catalogue[0]).float().cpu()
            if unscorable is not None:
                scores[:, unscorable] = float("-inf")
            return scores
    score.reads_time = timed
    return score


@dataclass
class LoadedModel:
    """A checkpoint's model on the current catalogue: what it scores, and how the catalogue grew."""
    model: nn.Module
    ckpt: ModelCheckpoint
    extension: Extension
    scorable: np.ndarray            # items it can score: a text model every one, an ID model those it trained on

    def score_function(self) -> ScoreFn:
        return scorer(self.model, self.ckpt.spec.data.max_seq_len, scorable=self.scorable)


def load_for_catalogue(checkpoint: str, catalogue: Catalogue, item_index_version: int | None = None,
                       cache_dir: str | None = None, label: str | None = None) -> LoadedModel:
    """Load a checkpoint to score `catalogue`, the one it was trained on or a later one that extends
    it (`CatalogueMismatch` otherwise): a text model (HLLM) embeds the new and changed items from
    their text; an ID model scores only the items it trained on."""
    ckpt = read_model(checkpoint)
    ext = ckpt.check_catalogue(catalogue, item_index_version, label or checkpoint)
    model = ckpt.build(cache_dir, catalogue)
    return LoadedModel(model, ckpt, ext, scorable_items(ckpt.spec.model.kind, ckpt.catalogue.seen_mask(),
                                                        catalogue.num_items))


def scorable_items(kind: str, seen: np.ndarray, num_items: int) -> np.ndarray:
    """Items a model of `kind` that trained on `seen` (a mask over its own catalogue) can score in a
    catalogue of `num_items`: every one for a text model, else those it trained on."""
    if scores_unseen_items(kind):
        mask = np.ones(num_items + 1, bool)
    else:
        mask = np.zeros(num_items + 1, bool)
        mask[:len(seen)] = seen
    mask[0] = False
    return mask


def candidate_items(spec: JobSpec, catalogue: Catalogue) -> np.ndarray:
    """What is ranked (`eval.candidates`): every active item, or only the k-core's (every model the
    same set: the leave-one-out benchmark)."""
    mask = catalogue.active.copy() if spec.eval.candidates == "catalogue" else catalogue.active & catalogue.kcore
    mask[0] = False
    return mask


def top_k(score: ScoreFn, histories: list[np.ndarray], k: int, batch_size: int,
          times: list[np.ndarray] | None = None, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each history's k best unseen items (ids, scores), best first; history items, padding, items
    outside `candidates` and items the model can't score masked. Where fewer than k items remain for
    a history, its row ends in id 0 with score -inf (callers drop those: `recommendation_rows`).
    `times`: the histories' timestamps and the prediction's time, for a score function that reads them."""
    ids, vals = [], []
    for i in range(0, len(histories), batch_size):
        h = histories[i:i + batch_size]
        stamps = None if times is None else times[i:i + batch_size]
        scores = mask_scores(call_scores(score, h, stamps).float(), h, candidates)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        ids.append(torch.where(torch.isneginf(top.values), 0, top.indices).numpy())
        vals.append(top.values.numpy())
    if not ids:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(ids), np.concatenate(vals)


# ----------------------------------------------------------------------------- full ranking

def evaluate_split(spec: JobSpec, score: ScoreFn, data: SeqData, split: str | EvalSplit,
                   item_emb: np.ndarray | None = None, scorable: np.ndarray | None = None) -> EvalResult:
    """Full-ranking metrics of any score function on one split (by name, or an `EvalSplit` over the
    data's catalogue), with the spec's eval settings, over the spec's candidates; `scorable`: the
    items the model can score (the rest are counted as `unscorable_items`)."""
    s, e = data.split(split), spec.eval
    cand = candidate_items(spec, data.catalogue)
    result = evaluate(score, s.histories, s.targets, data.num_items, data.popularity,
                      e.ks, e.batch_size, item_emb, e.tail_share, e.cold_item_max, e.short_history_max, s.stamps(),
                      cand)
    return with_candidate_counts(result, cand, scorable)


def with_candidate_counts(result: EvalResult, cand: np.ndarray, scorable: np.ndarray | None) -> EvalResult:
    """`candidates` ranked and, of them, `unscorable_items` the model could not score, in the metrics."""
    result.metrics["candidates"] = int(cand.sum())
    result.metrics["unscorable_items"] = 0 if scorable is None else int((cand & ~scorable).sum())
    return result


def rank_shard(spec: JobSpec, score: ScoreFn, data: SeqData, split: str, rows: np.ndarray | None = None) -> Shard:
    """Target ranks and top-k_max lists of the users of a split that `data` holds (its shard), or of
    the given rows of them, over the spec's candidates."""
    s = data.split(split)
    rows = np.arange(len(s.targets)) if rows is None else rows
    cand = candidate_items(spec, data.catalogue)
    k_max = max(usable_ks(spec.eval.ks, int(cand.sum())))
    histories = [s.histories[i] for i in rows]
    ranks, top = rank_and_topk(score, histories, s.targets[rows], k_max, spec.eval.batch_size, s.stamps(rows), cand)
    return data.rows[split][rows], ranks, top, np.asarray([len(h) for h in histories], dtype=np.int64), s.targets[rows]


def merge_shards(spec: JobSpec, data: SeqData, split: str, shards: list[Shard],
                 item_emb: np.ndarray | None = None, scorable: np.ndarray | None = None) -> EvalResult:
    """Metrics of a split from every shard's users, put back in user order: exactly what one process
    evaluating every user reports (popularity and the split's size are global in every shard)."""
    rows = np.concatenate([p[0] for p in shards])
    order = np.argsort(rows, kind="stable")
    n = data.sizes[split]
    if not np.array_equal(rows[order], np.arange(n)):
        raise ValueError(f"evaluation shards of split {split} do not cover its {n} users exactly once")
    ranks, top, lengths, targets = (np.concatenate([p[i] for p in shards])[order] for i in range(1, 5))
    e = spec.eval
    cand = candidate_items(spec, data.catalogue)
    result = summarize(ranks, top, lengths, targets, int(cand.sum()), data.popularity,
                       e.ks, item_emb, e.tail_share, e.cold_item_max, e.short_history_max)
    return with_candidate_counts(result, cand, scorable)


def evaluate_sharded(spec: JobSpec, score: ScoreFn, data: SeqData, split: str, rank: int, world: int,
                     gather: Callable[[Shard], list[Shard]], item_emb: np.ndarray | None = None,
                     scorable: np.ndarray | None = None) -> EvalResult:
    """Full ranking with the split's users shared among `world` workers: each ranks the users its
    data shard holds (or, when every worker holds every user, every world-th of them), `gather`
    collects every worker's, and every worker returns the same metrics."""
    if data.shard == (rank, world):
        rows = None
    elif data.shard == (0, 1):
        rows = np.arange(rank, len(data.split(split).targets), world)
    else:
        raise ValueError(f"worker {rank} of {world} was given the data shard {data.shard}")
    return merge_shards(spec, data, split, gather(rank_shard(spec, score, data, split, rows)), item_emb, scorable)


# ----------------------------------------------------------------------------- any model kind

def score_function(spec: JobSpec, data: SeqData, item_emb: np.ndarray, checkpoint: str | None = None,
                   cache_dir: str | None = None) -> tuple[ScoreFn, str, np.ndarray | None]:
    """(score function, label, items it can score or None for all) for the spec's model kind:
    popularity and the transition graph are built from the training sequences; a trained model
    (sasrec, hstu, hllm) is loaded from `checkpoint` onto the data's catalogue."""
    m = spec.model
    if m.kind == "pop":
        return Popularity(data.popularity).score, "pop", None
    if m.kind == "graph":
        return TransitionGraph(data.train, data.num_items, item_emb, data.popularity, m.graph_hops,
                               m.graph_last_items).score, "graph", None
    if not checkpoint:
        raise ValueError(f"model.kind={m.kind}: a trained model needs a checkpoint file to score")
    loaded = load_for_catalogue(checkpoint, data.catalogue, data.versions.get("item_index"), cache_dir)
    return loaded.score_function(), f"{loaded.ckpt.spec.model.kind} ({checkpoint})", loaded.scorable
