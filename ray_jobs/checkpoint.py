"""Checkpoints as data: one file holding only tensors and plain values (dicts, lists, strings,
numbers), read back with `torch.load(weights_only=True)`, so a checkpoint from shared storage or
the model registry cannot run code when loaded. Written atomically.

A model checkpoint holds the weights, the resolved spec (as a plain mapping), the item catalogue
it was trained on (each index's item id and text, and which items it trained on), the Delta
versions read, the run's progress (counters and history) and, for a resumable training checkpoint,
the optimizer, scheduler and loss state. Checkpoints written before item ids were recorded load
too: their catalogue is known by text (`ModelCatalogue.item_ids` None).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from jobs.contracts import RunProgress
from jobs.files import write_atomic
from jobs.secrets import public_doc
from jobs.schema import JobSpec
from ray_jobs.catalogue import Catalogue, CatalogueMismatch, Extension, ModelCatalogue
from ray_jobs.models import build_model, known_table, load_weights

FORMAT = "llmrec-checkpoint/1"


def save(path: str, payload: dict) -> str:
    """Write `payload` (tensors and plain values only) to `path` atomically."""
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load(path: str, map_location="cpu", allowed: tuple = ()) -> dict:
    """Read a file written by `save`; anything that would need code to unpickle is refused.
    `allowed`: classes the file may hold besides tensors and plain values (rebuilt from their
    fields, never by calling code named in the file)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refusing to load it: not a checkpoint of plain tensors and values "
                         f"({str(exc).splitlines()[0]})") from None


def deepspeed_state_types() -> tuple:
    """The only classes DeepSpeed's own ZeRO checkpoint shards hold (an enum, a named tuple of two
    ints, the loss scaler's fields); `safe_deepspeed_loads` lets these through and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return ZeroStageEnum, fragment_address, LossScaler


def safe_deepspeed_loads(engine) -> None:
    """DeepSpeed reads its checkpoint shards with `torch.load(weights_only=False)`, which runs any
    code a crafted file names: route its reads through `load` (weights only, DeepSpeed's own state
    types allowed) so a resumed shard from shared storage is data too."""
    allowed = deepspeed_state_types()
    engine.checkpoint_engine.load = lambda path, map_location=None: load(path, map_location, allowed)


@dataclass
class ModelCheckpoint:
    weights: dict[str, torch.Tensor]
    spec: JobSpec
    item_text: list[str]                 # index = item id, "" at 0 (padding)
    versions: dict[str, int]             # Delta versions of the gold tables read
    progress: RunProgress = field(default_factory=RunProgress)  # counters and history of the run
    extra: dict = field(default_factory=dict)      # resume state (optimizer, scheduler, loss) or job notes
    item_ids: list[str] | None = None    # index = item id, the item it names (None: an old checkpoint)
    seen: np.ndarray | None = None       # the items it trained on (None: every item)

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor], spec: JobSpec, catalogue: Catalogue, versions: dict[str, int],
           progress: RunProgress | None = None, extra: dict | None = None) -> "ModelCheckpoint":
        """A checkpoint of a model trained on `catalogue` (the items it trained on: its k-core)."""
        return cls(weights, spec, list(catalogue.item_text), dict(versions), progress or RunProgress(), extra or {},
                   list(catalogue.item_ids), catalogue.kcore.copy())

    @property
    def num_items(self) -> int:
        return len(self.item_text) - 1

    @property
    def catalogue(self) -> ModelCatalogue:
        return ModelCatalogue(self.item_text, self.item_ids, self.seen)

    def payload(self) -> dict:
        doc = {"format": FORMAT, "weights": self.weights, "spec": public_doc(self.spec),
               "item_text": list(self.item_text), "versions": dict(self.versions), "progress": self.progress.to_dict(),
               "extra": self.extra}
        if self.item_ids is not None:
            doc["item_ids"] = list(self.item_ids)
        if self.seen is not None:
            doc["seen"] = torch.from_numpy(np.asarray(self.seen, bool))
        return doc

    @classmethod
    def from_payload(cls, payload: dict, path: str) -> "ModelCheckpoint":
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path}: not an llmrec model checkpoint ({FORMAT})")
        seen = payload.get("seen")
        return cls(payload["weights"], JobSpec.from_saved(payload["spec"]), payload["item_text"],
                   payload["versions"], RunProgress.from_dict(payload.get("progress") or {}), payload.get("extra", {}),
                   payload.get("item_ids"),
                   None if seen is None else seen.numpy().astype(bool))

    def check_data(self, data, label: str) -> Extension:
        """How the catalogue of `data` (SeqData) extends the model's; `CatalogueMismatch` when an index
        the model knows names another item now."""
        return self.check_catalogue(data.catalogue, data.versions.get("item_index"), label)

    def check_catalogue(self, catalogue: Catalogue, item_index_version: int | None, label: str) -> Extension:
        return self.catalogue.check_extended_by(catalogue, label, self.versions, item_index_version)

    def require_same_catalogue(self, catalogue: Catalogue, item_index_version: int | None, label: str) -> None:
        """Resuming a run needs exactly the catalogue it started on (a run reads pinned versions)."""
        ext = self.check_catalogue(catalogue, item_index_version, label)
        if not ext.identical:
            raise CatalogueMismatch(f"{label}: the run started on a catalogue of {ext.known} items and the data now "
                                    f"holds {ext.total} ({len(ext.changed)} texts changed); a run resumes only on the "
                                    "versions it started on")

    def build(self, cache_dir: str | None = None, catalogue: Catalogue | None = None) -> nn.Module:
        """The model with these weights, in eval mode, on its own catalogue or on `catalogue`, a later
        one that extends it (`load_weights`: known rows as trained, new rows by the model's rule).
        `cache_dir` points a cached-mode HLLM at an item-embedding cache (a registered model ships its own)."""
        spec = self.spec
        if cache_dir:
            spec = spec.model_copy(update={"model": spec.model.model_copy(update={"cache_dir": cache_dir})})
        ext = None if catalogue is None else self.check_catalogue(catalogue, None, "model")
        table = known_table(spec.model.kind, self.weights)  # frozen item embeddings, token table: not recomputed
        model = build_model(spec, self.item_text if catalogue is None else catalogue.item_text,
                            None if table is None else (self.item_text, table))
        load_weights(model, spec.model.kind, self.weights, ext)
        return model.eval()


def save_model(path: str, ckpt: ModelCheckpoint) -> str:
    return save(path, ckpt.payload())


def read_model(path: str) -> ModelCheckpoint:
    return ModelCheckpoint.from_payload(load(path), path)


def load_model(path: str, cache_dir: str | None = None) -> tuple[nn.Module, ModelCheckpoint]:
    """A ready-to-score model (on its own catalogue) and its checkpoint, from a file written by a
    training or alignment run."""
    ckpt = read_model(path)
    return ckpt.build(cache_dir), ckpt
