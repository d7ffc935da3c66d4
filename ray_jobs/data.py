"""Data feeding: gold Delta tables at a pinned version -> per-user sequences -> padded torch batches.

Reads with delta-rs (no Spark on the training side), so the same code runs in one process and in a
Ray Train worker; `train_batches` gives a worker its rows of each global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from deltalake import DeltaTable

from jobs.lake import read_versions, table_path
from jobs.spec import JobSpec, storage_options


@dataclass
class EvalSplit:
    users: np.ndarray            # user_idx per row
    histories: list[np.ndarray]  # item ids before the target, oldest first
    targets: np.ndarray          # the held-out next item


@dataclass
class SeqData:
    num_items: int                      # item ids are 1..num_items; 0 is padding
    train: list[np.ndarray]             # per user, the training sequence (oldest first)
    valid: EvalSplit
    test: EvalSplit
    popularity: np.ndarray              # (num_items + 1,) interactions per item in the training sequences
    item_text: list[str]                # index = item id ("" at 0)
    versions: dict = field(default_factory=dict)  # Delta versions read, for lineage
    train_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # user_idx of each train row

    def fit_sequences(self, fit_on: str = "train") -> list[np.ndarray]:
        """The sequences to train on: the train split, or train + the validation target (all but the
        test item, the generative-recommenders protocol) for a refit."""
        if fit_on == "train":
            return self.train
        if fit_on == "train_valid":
            return [np.append(h, t) for h, t in zip(self.valid.histories, self.valid.targets)]
        raise ValueError(f"fit_on must be train or train_valid, got {fit_on!r}")

    def split(self, name: str) -> EvalSplit:
        if name not in ("valid", "test"):
            raise ValueError(f"split must be valid or test, got {name!r}")
        return self.valid if name == "valid" else self.test


def _read(spec: JobSpec, table: str, version: int | None, columns: list[str]):
    path = table_path(spec, table)
    try:
        dt = DeltaTable(path, version=version, storage_options=storage_options(spec))
    except Exception as exc:  # delta-rs raises TableNotFoundError and friends
        raise FileNotFoundError(f"gold table {table} not readable at {path} (version {version}): {exc}; "
                                f"run `llmrec etl --spec ...` first") from exc
    return dt.version(), dt.to_pyarrow_table(columns=columns)


def load_sequences(spec: JobSpec, versions: dict | None = None) -> SeqData:
    """Read `sequences` and `item_index` into numpy structures, at `versions` when given, else at the
    dataset's read set (`data.pinned_versions`, or the latest published set: `jobs.lake.read_versions`).
    `SeqData.versions` is that whole set: what a run records it read."""
    versions = dict(versions or read_versions(spec))
    _, seq = _read(spec, "sequences", versions.get("sequences"), ["user_idx", "split", "item_ids", "target"])
    _, idx = _read(spec, "item_index", versions.get("item_index"), ["item_idx", "text"])
    num_items = int(max(idx["item_idx"].to_pylist() or [0]))
    item_text = [""] * (num_items + 1)
    for i, t in zip(idx["item_idx"].to_pylist(), idx["text"].to_pylist()):
        item_text[i] = t or ""
    rows: dict[str, list] = {"train": [], "valid": [], "test": []}
    for u, split, items, target in zip(seq["user_idx"].to_pylist(), seq["split"].to_pylist(),
                                       seq["item_ids"].to_pylist(), seq["target"].to_pylist()):
        rows[split].append((u, np.asarray(items, dtype=np.int64), target))
    for split in rows:
        rows[split].sort(key=lambda r: r[0])
    train = [r[1] for r in rows["train"]]
    popularity = np.bincount(np.concatenate(train) if train else np.zeros(0, np.int64), minlength=num_items + 1)

    def eval_split(name: str) -> EvalSplit:
        r = rows[name]
        return EvalSplit(np.asarray([x[0] for x in r], dtype=np.int64), [x[1] for x in r],
                         np.asarray([x[2] for x in r], dtype=np.int64))

    return SeqData(num_items, train, eval_split("valid"), eval_split("test"), popularity, item_text, versions,
                   np.asarray([r[0] for r in rows["train"]], dtype=np.int64))


def training_windows(seqs: list[np.ndarray], max_len: int, kind: str = "all") -> list[np.ndarray]:
    """Cut each sequence into windows of at most max_len + 1 items, from the most recent backwards,
    consecutive windows sharing one item, so every transition is trained exactly once ("all"), or
    keep only each user's most recent window ("recent": every user weighs the same per epoch)."""
    if kind not in ("all", "recent"):
        raise ValueError(f"train.windows must be 'all' or 'recent', got {kind!r}")
    out = []
    for s in seqs:
        if len(s) < 2:
            continue
        if kind == "recent":
            out.append(s[-(max_len + 1):])
            continue
        end = len(s)
        while end > 1:
            start = max(0, end - max_len - 1)
            out.append(s[start:end])
            end = start + 1
    return out


def left_pad(seqs: list[np.ndarray], length: int) -> torch.Tensor:
    """(B, length) int64, each row right-aligned (the last `length` items), zeros on the left."""
    batch = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            batch[i, length - len(s):] = s
    return torch.from_numpy(batch)


def train_batches(windows: list[np.ndarray], max_len: int, batch_size: int, rng: np.random.Generator,
                  rank: int = 0, world: int = 1, length_buckets: int = 0):
    """Shuffled (inputs, targets) batches: inputs = window[:-1], targets = window[1:], left padded.
    `batch_size` is the global batch; worker `rank` of `world` gets every world-th row of it (all
    workers draw the same permutation), so N workers see exactly the single-process batches. A
    worker left with no row gets one all-padding row, which the loss ignores.

    length_buckets > 0: the shuffled windows are taken in pools of `length_buckets` batches, each
    pool sorted by length and cut into batches, and the batches shuffled again; every batch is then
    trimmed to its longest window, so short histories stop paying for max_len columns of padding.
    The number of batches per epoch is ceil(len(windows) / batch_size) either way."""
    order = rng.permutation(len(windows))
    if length_buckets:
        pool = batch_size * length_buckets
        batches = []
        for start in range(0, len(order), pool):
            part = order[start:start + pool]
            part = part[np.argsort([len(windows[i]) for i in part], kind="stable")]
            batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    else:
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for idx in batches:
        chunk = [windows[i] for i in idx[rank::world]]
        if not chunk:
            yield torch.zeros((1, max_len), dtype=torch.long), torch.zeros((1, max_len), dtype=torch.long)
            continue
        width = min(max_len, max(len(w) for w in chunk) - 1) if length_buckets else max_len
        yield left_pad([w[:-1] for w in chunk], width), left_pad([w[1:] for w in chunk], width)
