"""The item catalogue by index, and how a model trained on one catalogue meets a later one.

Within a lineage an index never changes meaning: new items take the next index, departed items stay
(inactive). A model records the catalogue it was trained on (each index's item id and a hash of its
text, and which items it saw in training); a later catalogue *extends* it when every index the model
knows still names the same item — changed texts included (a text model re-reads them). Only an
index that now names another item is a mismatch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class CatalogueMismatch(ValueError):
    """A model's item index names other items in the current catalogue; the message says which."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Catalogue:
    """Index i (1..n; 0 is padding) names `item_ids[i]` with text `item_text[i]`; `active[i]`: it can
    be recommended; `kcore[i]`: it is in the gold sequences (what models train on)."""
    item_ids: list[str]
    item_text: list[str]
    active: np.ndarray = field(default=None)
    kcore: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if len(self.item_text) != n:
            raise ValueError(f"catalogue: {n} item ids but {len(self.item_text)} texts")
        self.active = np.ones(n, bool) if self.active is None else np.asarray(self.active, bool)
        self.kcore = self.active.copy() if self.kcore is None else np.asarray(self.kcore, bool)
        self.active[0] = self.kcore[0] = False

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def text_hashes(self) -> list[str]:
        return [text_hash(t) for t in self.item_text]

    def index_of(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.item_ids) if i}


@dataclass
class ModelCatalogue:
    """What a checkpoint records of the catalogue it was trained on. `item_ids` is None for a
    checkpoint written before ids were recorded: its catalogue is then known by text only."""
    item_text: list[str]
    item_ids: list[str] | None = None
    seen: np.ndarray | None = None   # items with training interactions (None: every item)

    @property
    def num_items(self) -> int:
        return len(self.item_text) - 1

    def seen_mask(self) -> np.ndarray:
        n = self.num_items + 1
        mask = np.ones(n, bool) if self.seen is None else np.asarray(self.seen, bool)[:n]
        mask[0] = False
        return mask

    def check_extended_by(self, current: Catalogue, label: str, versions: dict | None = None,
                          current_version: int | None = None) -> "Extension":
        """How `current` extends this catalogue; `CatalogueMismatch` when an index the model knows
        now names another item (or, for an id-less old checkpoint, another text)."""
        n = self.num_items
        where = (f" (item_index version {versions.get('item_index')} vs {current_version})"
                 if versions is not None else "")
        if current.num_items < n:
            raise CatalogueMismatch(f"{label}: the model was trained on a catalogue of {n} items{where} but the gold "
                                    f"tables now hold {current.num_items}: not the same lineage; retrain on the current "
                                    "tables or read the versions the model was trained on")
        if self.item_ids is not None:
            differ = next((i for i in range(1, n + 1) if self.item_ids[i] != current.item_ids[i]), None)
            what = "item id"
        else:  # an old checkpoint: ids were not recorded, texts are all it has
            differ = next((i for i in range(1, n + 1) if self.item_text[i] != current.item_text[i]), None)
            what = "item text"
        if differ is not None:
            theirs = (self.item_ids or self.item_text)[differ]
            ours = (current.item_ids if self.item_ids is not None else current.item_text)[differ]
            raise CatalogueMismatch(f"{label}: the model was trained on a catalogue of {n} items{where} and the gold "
                                    f"tables now hold {current.num_items}, but index {differ} names another {what} "
                                    f"({theirs!r} then, {ours!r} now): the ids were renumbered; retrain on the current "
                                    "tables or read the versions the model was trained on")
        changed = [i for i in range(1, n + 1) if self.item_text[i] != current.item_text[i]]
        return Extension(n, current.num_items, changed)


@dataclass
class Extension:
    """A model catalogue of `known` items met by a current catalogue of `total` (`total - known` new
    items; `changed`: known indexes whose text changed)."""
    known: int
    total: int
    changed: list[int]

    @property
    def new_items(self) -> int:
        return self.total - self.known

    @property
    def identical(self) -> bool:
        return self.new_items == 0 and not self.changed
