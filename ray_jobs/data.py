"""Data feeding: gold Delta tables at a pinned version -> per-user sequences -> padded torch batches.

Reads with delta-rs (no Spark on the training side), so the same code runs in one process and in a
Ray Train worker. A worker reads its shard: the `sequences` table is streamed in record batches and
only the users with user_idx % world == rank are kept whole; of every other user only its sequence
lengths are kept, which is all the global window index needs. Every worker shuffles that index with
the same seed and takes the windows of each global batch that belong to its users (`train_batches`),
so N workers train on exactly the single-process batches while each holds 1/N of the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import torch
from deltalake import DeltaTable

from jobs.lake import open_table, read_versions, table_path
from jobs.schema import JobSpec
from jobs.spec import storage_options
from ray_jobs.catalogue import Catalogue


SPLITS = ("train", "valid", "test")


@dataclass
class EvalSplit:
    users: np.ndarray            # user_idx per row
    histories: list[np.ndarray]  # item ids before the target, oldest first
    targets: np.ndarray          # the held-out next item
    times: list[np.ndarray] = field(default_factory=list)  # epoch seconds of each history item
    target_times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # of each target

    def subset(self, rows: np.ndarray) -> EvalSplit:
        """The given rows of the split, in that order."""
        return EvalSplit(self.users[rows], [self.histories[i] for i in rows], self.targets[rows],
                         [self.times[i] for i in rows] if self.times else [],
                         self.target_times[rows] if self.times else self.target_times)

    def stamps(self, rows: np.ndarray | None = None) -> list[np.ndarray] | None:
        """Each history's timestamps followed by its target's (the time the prediction is for): what a
        score function that reads time takes, for every row or the given ones; None when the split
        has no timestamps."""
        if not self.times:
            return None
        rows = range(len(self.times)) if rows is None else rows
        return [np.append(self.times[i], self.target_times[i]) for i in rows]


@dataclass
class SeqData:
    num_items: int                      # item ids are 1..num_items; 0 is padding
    train: list[np.ndarray]             # per user, the training sequence (oldest first)
    valid: EvalSplit
    test: EvalSplit
    popularity: np.ndarray              # (num_items + 1,) interactions per item in the training sequences
    catalogue: Catalogue                # what each index names, its text, which items are active / in the k-core
    versions: dict = field(default_factory=dict)  # Delta versions read, for lineage
    train_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # user_idx of each train row
    shard: tuple[int, int] = (0, 1)     # (rank, world): the users held are those with user_idx % world == rank
    rows: dict = field(default_factory=dict)     # split -> global row (user order) of each row held
    sizes: dict = field(default_factory=dict)    # split -> rows in the whole table
    lengths: dict = field(default_factory=dict)  # fit_on -> every user's fit-sequence length, global row order
    train_times: list[np.ndarray] = field(default_factory=list)  # epoch seconds of each train item

    @property
    def item_text(self) -> list[str]:
        """Index = item id ("" at 0)."""
        return self.catalogue.item_text

    def training_items(self) -> np.ndarray:
        """The item ids models train on (the k-core: what the gold sequences hold), sorted: where
        negatives are drawn from and what a softmax ranks a target against."""
        return np.nonzero(self.catalogue.kcore)[0]

    def fit_sequences(self, fit_on: str = "train", times: bool = False, withhold: int = 0) -> list[np.ndarray]:
        """The sequences to train on (of the users held): the train split (without each user's last
        `withhold` items, train.withhold), or train + the validation target (all but the test item,
        the generative-recommenders protocol) for a refit; with `times`, their timestamps instead,
        item for item."""
        if fit_on == "train":
            seqs = self.train_times if times else self.train
            return [s[:max(len(s) - withhold, 0)] for s in seqs] if withhold else seqs
        if fit_on == "train_valid":
            v = self.valid
            if times:  # the validation history's timestamps, then its target's
                return v.stamps() or []
            return [np.append(h, t) for h, t in zip(v.histories, v.targets)]
        raise ValueError(f"fit_on must be train or train_valid, got {fit_on!r}")

    def fit_rows(self, fit_on: str = "train", times: bool = False, withhold: int = 0) -> dict[int, np.ndarray]:
        """Global fit row -> sequence (or, with `times`, its timestamps), for the users held."""
        rows = self.rows["train" if fit_on == "train" else "valid"]
        return dict(zip(rows.tolist(), self.fit_sequences(fit_on, times, withhold)))

    def fit_lengths(self, fit_on: str = "train", withhold: int = 0) -> np.ndarray:
        """Every user's fit-sequence length (global row order), after `withhold`."""
        return np.maximum(self.lengths[fit_on] - withhold, 0)

    def split(self, name: str | EvalSplit) -> EvalSplit:
        """A split by name; an `EvalSplit` (a reordered or cut copy of one, over this catalogue) as it is."""
        if isinstance(name, EvalSplit):
            return name
        if name not in ("valid", "test"):
            raise ValueError(f"split must be valid or test, got {name!r}")
        return self.valid if name == "valid" else self.test


def _read(spec: JobSpec, table: str, version: int | None) -> DeltaTable:
    path = table_path(spec, table)
    dt = open_table(path, version, storage_options(spec), table)
    if dt is None:
        raise FileNotFoundError(f"gold table {table} not found at {path} (version {version}): "
                                "run `llmrec etl --spec ...` first")
    return dt


def read_catalogue(spec: JobSpec, version: int | None) -> Catalogue:
    """`gold/item_index` at a version as a `Catalogue` (an index written before the catalogue had
    `active` / `n_interactions`: every item active and in the k-core)."""
    table = _read(spec, "item_index", version)
    names = set(table.schema().to_arrow().names)
    columns = ["item_idx", "item_id", "text"] + [c for c in ("active", "n_interactions") if c in names]
    idx = table.to_pyarrow_table(columns=columns)
    ids = idx["item_idx"].to_pylist()
    n = int(max(ids or [0]))
    item_ids, text = [""] * (n + 1), [""] * (n + 1)
    active, kcore = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    act = idx["active"].to_pylist() if "active" in columns else [True] * len(ids)
    cnt = idx["n_interactions"].to_pylist() if "n_interactions" in columns else [1] * len(ids)
    for i, iid, t, a, c in zip(ids, idx["item_id"].to_pylist(), idx["text"].to_pylist(), act, cnt):
        item_ids[i], text[i], active[i], kcore[i] = iid or "", t or "", bool(a), bool(c)
    return Catalogue(item_ids, text, active, kcore)


def load_sequences(spec: JobSpec, versions: dict | None = None, shard: tuple[int, int] = (0, 1),
                   batch_rows: int = 65_536) -> SeqData:
    """Read `sequences` and `item_index` into numpy structures, at `versions` when given, else at the
    dataset's read set (`data.pinned_versions`, or the latest published set: `jobs.lake.read_versions`).
    `SeqData.versions` is that whole set: what a run records it read.

    Every item comes with its timestamp (epoch seconds; what HSTU's relative time bias reads).

    `shard=(rank, world)`: keep whole only the users with user_idx % world == rank. The table is
    streamed `batch_rows` rows at a time (six columns), so memory holds one record batch, the
    shard, and per user of the whole table a few integers (split sizes, sequence lengths for the
    global window index); popularity is counted over every training row either way."""
    versions = dict(versions or read_versions(spec))
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard rank {rank} is not one of {world} workers")
    catalogue = read_catalogue(spec, versions.get("item_index"))
    num_items = catalogue.num_items
    seq = _read(spec, "sequences", versions.get("sequences")).to_pyarrow_dataset()
    users: dict[str, list] = {s: [] for s in SPLITS}
    lengths: dict[str, list] = {s: [] for s in SPLITS}
    held: dict[str, list] = {s: [] for s in SPLITS}
    popularity = np.zeros(num_items + 1, dtype=np.int64)
    for batch in seq.to_batches(columns=["user_idx", "split", "item_ids", "timestamps", "target", "target_ts"],
                                batch_size=batch_rows):
        u = batch["user_idx"].to_numpy(zero_copy_only=False).astype(np.int64)
        split = np.asarray(batch["split"].to_pylist(), dtype=object)
        lens = pc.list_value_length(batch["item_ids"]).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(batch["item_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        stamps = pc.list_flatten(batch["timestamps"]).to_numpy(zero_copy_only=False).astype(np.int64)
        target = batch["target"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        target_ts = batch["target_ts"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(stamps) != len(flat):
            raise ValueError("gold table sequences: a row's timestamps and item_ids differ in length")
        is_train = split == "train"
        popularity += np.bincount(flat[np.repeat(is_train, lens)], minlength=num_items + 1)
        for name in SPLITS:
            m = split == name
            users[name].append(u[m])
            lengths[name].append(lens[m])
        for i in np.nonzero(u % world == rank)[0]:
            a, b = starts[i], starts[i] + lens[i]
            held[split[i]].append((int(u[i]), flat[a:b].copy(), int(target[i]), stamps[a:b].copy(), int(target_ts[i])))
    order, rows, sizes, glen = {}, {}, {}, {}
    for name in SPLITS:
        all_users = np.concatenate(users[name]) if users[name] else np.zeros(0, np.int64)
        order[name] = np.argsort(all_users, kind="stable")
        sorted_users = all_users[order[name]]
        held[name].sort(key=lambda r: r[0])
        rows[name] = np.searchsorted(sorted_users, np.asarray([r[0] for r in held[name]], dtype=np.int64))
        sizes[name] = len(all_users)
        glen[name] = (np.concatenate(lengths[name]) if lengths[name] else np.zeros(0, np.int64))[order[name]]
    train = [r[1] for r in held["train"]]

    def eval_split(name: str) -> EvalSplit:
        r = held[name]
        return EvalSplit(users=np.asarray([x[0] for x in r], dtype=np.int64), histories=[x[1] for x in r],
                         targets=np.asarray([x[2] for x in r], dtype=np.int64), times=[x[3] for x in r],
                         target_times=np.asarray([x[4] for x in r], dtype=np.int64))

    return SeqData(num_items=num_items, train=train, valid=eval_split("valid"), test=eval_split("test"),
                   popularity=popularity, catalogue=catalogue, versions=versions,
                   train_users=np.asarray([r[0] for r in held["train"]], dtype=np.int64), shard=(rank, world),
                   rows=rows, sizes=sizes, lengths={"train": glen["train"], "train_valid": glen["valid"] + 1},
                   train_times=[r[3] for r in held["train"]])


@dataclass
class Windows:
    """The global window index: window w is items [start[w], end[w]) of fit row row[w]."""
    row: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.row)


def window_bounds(lengths: np.ndarray, max_len: int, kind: str = "all") -> Windows:
    """Cut each sequence (given by its length) into windows of at most max_len + 1 items, from the
    most recent backwards, consecutive windows sharing one item, so every transition is trained
    exactly once ("all"), or keep only each user's most recent window ("recent": every user weighs
    the same per epoch). Windows are ordered by row, most recent first."""
    if kind not in ("all", "recent"):
        raise ValueError(f"train.windows must be 'all' or 'recent', got {kind!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = np.where(lengths >= 2, 1 if kind == "recent" else (lengths - 2) // max_len + 1, 0)
    row = np.repeat(np.arange(len(lengths)), n)
    k = np.arange(len(row)) - np.repeat(np.cumsum(n) - n, n)      # 0, 1, ... within a row
    end = lengths[row] - k * max_len
    return Windows(row, np.maximum(0, end - max_len - 1), end)


def training_windows(seqs: list[np.ndarray], max_len: int, kind: str = "all") -> list[np.ndarray]:
    """The windows of `window_bounds` as arrays."""
    w = window_bounds(np.asarray([len(s) for s in seqs], dtype=np.int64), max_len, kind)
    return [seqs[r][a:b] for r, a, b in zip(w.row.tolist(), w.start.tolist(), w.end.tolist())]


def left_pad(seqs: list[np.ndarray], length: int) -> torch.Tensor:
    """(B, length) int64, each row right-aligned (the last `length` items), zeros on the left."""
    batch = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            batch[i, length - len(s):] = s
    return torch.from_numpy(batch)


def train_batches(windows: Windows, seqs: dict[int, np.ndarray], max_len: int, batch_size: int,
                  rng: np.random.Generator, length_buckets: int = 0, times: dict[int, np.ndarray] | None = None):
    """Shuffled (inputs, targets, times) batches: inputs = window[:-1], targets = window[1:], left
    padded to a width W; when `times` (global row -> the sequence's timestamps) is given, times are
    the whole window's timestamps left padded to W + 1 (each input's, then the last target's: column
    i + 1 is the time of the event position i predicts), else None.
    `windows` is the global index and `batch_size` the global batch; a worker holding the fit rows
    `seqs` (global row -> sequence) gets the windows of each global batch that are its users' (all
    workers draw the same permutation), so N workers see exactly the single-process batches. A
    worker left with no row gets one all-padding row, which the loss ignores.

    length_buckets > 0: the shuffled windows are taken in pools of `length_buckets` batches, each
    pool sorted by length and cut into batches, and the batches shuffled again; every batch is then
    trimmed to its longest window, so short histories stop paying for max_len columns of padding.
    The number of batches per epoch is ceil(len(windows) / batch_size) either way."""
    order = rng.permutation(len(windows))
    size = windows.end - windows.start
    if length_buckets:
        pool = batch_size * length_buckets
        batches = []
        for start in range(0, len(order), pool):
            part = order[start:start + pool]
            part = part[np.argsort(size[part], kind="stable")]
            batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    else:
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for idx in batches:
        cuts = [(r, a, b) for r, a, b in zip(windows.row[idx].tolist(), windows.start[idx].tolist(),
                                              windows.end[idx].tolist()) if r in seqs]
        if not cuts:
            empty = torch.zeros((1, max_len), dtype=torch.long)
            yield empty, empty.clone(), None if times is None else torch.zeros((1, max_len + 1), dtype=torch.long)
            continue
        chunk = [seqs[r][a:b] for r, a, b in cuts]
        width = min(max_len, max(len(w) for w in chunk) - 1) if length_buckets else max_len
        stamps = None if times is None else left_pad([times[r][a:b] for r, a, b in cuts], width + 1)
        yield left_pad([w[:-1] for w in chunk], width), left_pad([w[1:] for w in chunk], width), stamps
