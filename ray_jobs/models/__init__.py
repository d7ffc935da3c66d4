"""The sequence models (SASRec, HSTU, HLLM) and the training-free baselines; `build_model` makes the spec's one."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from jobs.spec import JobSpec

TRAINABLE = ("sasrec", "hstu", "hllm")


def reads_time(model: nn.Module) -> bool:
    """Whether a model's forward needs the events' timestamps beside the item ids (HSTU's time bias)."""
    return bool(getattr(model, "time_buckets", 0))


def reads_request_time(model: nn.Module) -> bool:
    """Whether a time-reading model measures gaps from the time the prediction is for
    (`model.query_time: target`), so that time is an input it cannot do without."""
    return reads_time(model) and getattr(model, "query_time", "event") == "target"


def one_item_pass(model: nn.Module, *ids: torch.Tensor) -> AbstractContextManager:
    """A block in which the model's item side runs once for the distinct items of `ids` (none: the
    whole catalogue) and every item lookup reads from it — HLLM's `one_item_pass`; ID models look
    items up in a table, which costs nothing to repeat."""
    share = getattr(model, "one_item_pass", None)
    return share(*ids) if share is not None else nullcontext()


def build_model(spec: JobSpec, item_text: list[str], item_index_version: int | None = None) -> nn.Module:
    """The spec's sequence model for a catalogue of len(item_text) - 1 items (id 0 = padding)."""
    m = spec.model
    if m.kind == "sasrec":
        from ray_jobs.models.sasrec import SASRec
        return SASRec(len(item_text) - 1, spec.data.max_seq_len, m.dim, m.blocks, m.heads, m.dropout, m.block)
    if m.kind == "hstu":
        from ray_jobs.models.hstu import HSTU
        return HSTU(len(item_text) - 1, spec.data.max_seq_len, m.dim, m.blocks, m.heads, m.dropout, m.time_buckets,
                    m.query_time, m.attention_dim, m.block)
    if m.kind == "hllm":  # imports transformers: only when an HLLM is asked for
        from ray_jobs.models.hllm import HLLM
        return HLLM(m, item_text, spec.data.max_seq_len, item_index_version)
    raise ValueError(f"model.kind={m.kind!r} is not a trainable sequence model ({', '.join(TRAINABLE)})")
