"""The sequence models (SASRec, HSTU, HLLM, the generative semantic-id model) and the training-free
baselines; `build_model` makes the spec's one."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from jobs.schema import JobSpec

TRAINABLE = ("sasrec", "hstu", "hllm", "generative")


@runtime_checkable
class SequenceRecommender(Protocol):
    """What every sequence model declares and offers; the loop, the loss, the scorer and the served
    pyfunc read these and nothing else.

    - `forward(ids[, times])`: (B, L) left-padded item ids -> (B, L, d) next-item queries.
    - `user_embeddings(ids[, times][, catalogue=...])`: the query at the last position, (B, d).
    - `item_embeddings(ids)`, `all_item_embeddings()`: item vectors in the same space (row 0: padding).
    - `one_item_pass(*ids)`: a block in which the item side runs once for the distinct items of `ids`
      (none: the whole catalogue) and every item lookup reads from it (HLLM); ID models look items
      up in a table, which costs nothing to repeat, so theirs does nothing.
    - a model that `decodes_items` (the generative family) scores items by generating them:
      `item_scores(user_embeddings(...))` gives every item's score, where the others score by the
      cosine of the user and item vectors; its item-embedding methods are not used."""
    num_items: int
    reads_time: bool       # forward and user_embeddings take each event's timestamp (HSTU's time bias)
    query_time: str        # "event" | "target": what a time bias measures gaps from
    reads_catalogue: bool  # user_embeddings may take the catalogue vectors the scorer already computed
    decodes_items: bool    # scores come from decoding item tokens (item_log_probs), not from item vectors

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor: ...

    def all_item_embeddings(self) -> torch.Tensor: ...

    def user_embeddings(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor: ...

    def one_item_pass(self, *ids: torch.Tensor) -> AbstractContextManager: ...


def reads_request_time(model: SequenceRecommender) -> bool:
    """Whether a time-reading model measures gaps from the time the prediction is for
    (`model.query_time: target`), so that time is an input it cannot do without."""
    return model.reads_time and model.query_time == "target"


def build_model(spec: JobSpec, item_text: list[str], known: tuple[list[str], torch.Tensor] | None = None,
                versions: dict | None = None) -> SequenceRecommender:
    """The spec's sequence model for a catalogue of len(item_text) - 1 items (id 0 = padding).
    `known`: texts and frozen item embeddings at hand (a cached HLLM's checkpoint): not recomputed.
    `versions`: the gold tables' versions the run's data was read at (with the spec, they name the
    training interactions a fresh generative model's collaborative tokenizer is keyed by)."""
    m = spec.model
    if m.kind == "sasrec":
        from ray_jobs.models.sasrec import SASRec
        return SASRec.of(m, len(item_text) - 1, spec.data.max_seq_len)
    if m.kind == "hstu":
        from ray_jobs.models.hstu import HSTU
        return HSTU.of(m, len(item_text) - 1, spec.data.max_seq_len)
    if m.kind == "hllm":  # imports transformers: only when an HLLM is asked for
        from ray_jobs.models.hllm import HLLM
        return HLLM(m, item_text, spec.data.max_seq_len, known)
    if m.kind == "generative":  # `known`: the token table a checkpoint was trained with (never retrained)
        from ray_jobs.models.generative import build_generator, interactions_of
        return build_generator(m, item_text, spec.data.max_seq_len, None if known is None else known[1],
                               None if versions is None else interactions_of(spec, versions))
    raise ValueError(f"model.kind={m.kind!r} is not a trainable sequence model ({', '.join(TRAINABLE)})")


# Weights with one row per item id, and how the rows of items a model has not been trained on are
# set when it meets a grown catalogue (`load_weights`):
# - init: the model's own initialisation, where a cold start would put a new item (ID models; an ID
#   model never scores an item it did not train on, so the row matters only once it trains);
# - zero: an HLLM's ID embedding: a new item's text alone places it;
# - text: a cached HLLM's frozen item embeddings: new items and items whose text changed are embedded
#   from their text (the content-keyed cache computes only those).
# - zero: an HLLM's ID embedding: a new item's text alone places it; a generative model's token
#   table: a new item's row is filled from its text by the model's tokenizer once the weights are in.
ITEM_ROWS = {"sasrec": {"item_emb.weight": "init"}, "hstu": {"item_emb.weight": "init"},
             "hllm": {"id_emb.weight": "zero", "item_table": "text"}, "generative": {"tokens": "zero"}}
# score any item from its text, also one they never trained on (a generative model: its tokens, from
# its text through the trained tokenizer)
TEXT_MODELS = ("hllm", "generative")


def known_table(kind: str, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The per-item table a checkpoint carries that building its model must reuse, not recompute: a
    cached HLLM's frozen item embeddings, a generative model's token table (its items' rows)."""
    if kind == "generative":
        return weights["tokens"][:int(weights["table_items"]) + 1]
    return weights.get("item_table")


def scores_unseen_items(kind: str) -> bool:
    return kind in TEXT_MODELS


def load_weights(model: nn.Module, kind: str, weights: dict[str, torch.Tensor], extension=None) -> None:
    """Load trained `weights` into `model`, which is built on the same catalogue or, with
    `extension` (`ray_jobs.catalogue.Extension`), on one that extends the trained one: every weight
    is copied, and of the per-item weights (`ITEM_ROWS`) the rows of known items; new rows follow
    the rule of their weight, and a cached HLLM keeps fresh text embeddings for changed texts."""
    if extension is None or extension.identical:
        model.load_state_dict(weights)
        return
    state = model.state_dict()
    rules = ITEM_ROWS.get(kind, {})
    known = extension.known + 1
    for key, value in weights.items():
        if key not in state:
            raise ValueError(f"weight {key} of the trained model has no place in the {kind} model")
        rule = rules.get(key)
        if rule is None:
            state[key] = value
            continue
        grown = state[key].clone()
        if rule == "text":
            fresh = grown[extension.changed].clone() if extension.changed else None
            grown[:known] = value[:known]
            if fresh is not None:
                grown[extension.changed] = fresh
        else:
            grown[:known] = value[:known]
            if rule == "zero":
                grown[known:] = 0
        state[key] = grown
    model.load_state_dict(state)
