"""Checkpoints as data: one file holding only tensors and plain values (dicts, lists, strings,
numbers), read back with `torch.load(weights_only=True)`, so a checkpoint from shared storage or
the model registry cannot run code when loaded. Written atomically.

A model checkpoint holds the weights, the resolved spec (as a plain mapping), the item catalogue
it was trained on (item text by id), the Delta versions read, the run's progress (counters and
history) and, for a resumable training checkpoint, the optimizer, scheduler and loss state.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch
from torch import nn

from jobs.files import write_atomic
from jobs.spec import JobSpec, public_doc
from ray_jobs.models import build_model

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
    progress: dict = field(default_factory=dict)   # counters and history of the run (TrainState.progress)
    extra: dict = field(default_factory=dict)      # resume state (optimizer, scheduler, loss) or job notes

    @property
    def num_items(self) -> int:
        return len(self.item_text) - 1

    def payload(self) -> dict:
        return {"format": FORMAT, "weights": self.weights, "spec": public_doc(self.spec),
                "item_text": list(self.item_text), "versions": dict(self.versions), "progress": self.progress,
                "extra": self.extra}

    @classmethod
    def from_payload(cls, payload: dict, path: str) -> "ModelCheckpoint":
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path}: not an llmrec model checkpoint ({FORMAT})")
        return cls(payload["weights"], JobSpec.model_validate(payload["spec"]), payload["item_text"],
                   payload["versions"], payload.get("progress", {}), payload.get("extra", {}))

    def check_data(self, data, label: str) -> None:
        """Refuse `data` (SeqData) whose item catalogue differs from the one the model was trained on."""
        self.check_catalogue(data.item_text, data.versions.get("item_index"), label)

    def check_catalogue(self, item_text: list[str], item_index_version: int | None, label: str) -> None:
        """Refuse an item catalogue (item text by id) other than the model's: after a rebuild of the
        gold tables an item id may name another item."""
        if list(item_text) == list(self.item_text):
            return
        differ = next((i for i, (a, b) in enumerate(zip(self.item_text, item_text)) if a != b), None)
        where = f"first difference at item id {differ}" if differ is not None else "one catalogue extends the other"
        raise ValueError(f"{label}: the model was trained on a catalogue of {self.num_items} items "
                         f"(item_index version {self.versions.get('item_index')}) but the gold tables now hold "
                         f"{len(item_text) - 1} (version {item_index_version}), {where}; "
                         "retrain on the current tables or read the versions the model was trained on")

    def build(self, cache_dir: str | None = None) -> nn.Module:
        """The model with these weights, in eval mode. `cache_dir` points a cached-mode HLLM at a
        shipped item-embedding cache (a registered model carries its own)."""
        spec = self.spec
        if cache_dir:
            spec = spec.model_copy(update={"model": spec.model.model_copy(update={"cache_dir": cache_dir})})
        model = build_model(spec, self.item_text, self.versions.get("item_index"))
        model.load_state_dict(self.weights)
        return model.eval()


def save_model(path: str, ckpt: ModelCheckpoint) -> str:
    return save(path, ckpt.payload())


def read_model(path: str) -> ModelCheckpoint:
    return ModelCheckpoint.from_payload(load(path), path)


def load_model(path: str, cache_dir: str | None = None) -> tuple[nn.Module, ModelCheckpoint]:
    """A ready-to-score model and its checkpoint from a file written by a training or alignment run."""
    ckpt = read_model(path)
    return ckpt.build(cache_dir), ckpt
