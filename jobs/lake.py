"""The lake layout, shared by every layer: where each table of a dataset lives, and the dataset's
published version set — the table versions readers use.

An ETL run rewrites tables one commit at a time and runs its data-quality checks last; only when
they all pass does it append the versions it wrote to `<dataset>/_etl/published` (one Delta
commit). Readers take the latest published set (or a set pinned in the spec), never "the latest of
each table", so a failed or half-finished run changes nothing they see.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from jobs.spec import JobSpec, absolute_path, storage_options

TABLES = {
    "interactions_raw": "bronze/interactions_raw",
    "quarantine": "bronze/quarantine",
    "interactions": "silver/interactions",
    "items": "silver/items",
    "item_index": "gold/item_index",
    "user_index": "gold/user_index",
    "sequences": "gold/sequences",
    "recommendations": "gold/recommendations",
}
PUBLISHED = "_etl/published"
LOCK = "_etl/lock"


class LakeBusy(RuntimeError):
    """Another ETL holds the dataset's lock; the message names it."""


_held: dict[str, int] = {}  # lock file -> nesting depth in this process (a full run ingests landed days)


@contextmanager
def etl_lock(spec: JobSpec) -> Iterator[None]:
    """One ETL at a time per dataset: an exclusive `flock` on `<dataset>/_etl/lock`, taken without
    waiting; a second run (another process, or another Dagster run) gets `LakeBusy` naming the
    holder and writes nothing. The kernel drops the lock when its holder dies, so a killed run never
    leaves the lake locked. Object-store roots (`s3://...`) have no file lock: serialise their ETLs
    in the orchestrator (the Dagster deployment runs one data job at a time per dataset)."""
    root = dataset_root(spec)
    if "://" in root:
        yield
        return
    path = f"{root}/{LOCK}"
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise LakeBusy(f"dataset {spec.data.name} at {root} is being written by another ETL ({holder}); "
                           f"nothing was changed: run again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n".encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def dataset_root(spec: JobSpec) -> str:
    """`<lake.root>/<data.name>`, absolute for local paths."""
    return absolute_path(spec.dataset_root())


def table_path(spec: JobSpec, table: str) -> str:
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
    return f"{dataset_root(spec)}/{TABLES[table]}"


def publish(spec: JobSpec, versions: dict[str, int], source: str) -> int:
    """Make `versions` the dataset's published set (one atomic append); returns the commit version."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake
    path = f"{dataset_root(spec)}/{PUBLISHED}"
    row = pa.table({"published_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
                    "versions": [json.dumps(versions, sort_keys=True)], "source": [source]})
    opts = storage_options(spec)
    write_deltalake(path, row, mode="append", storage_options=opts)
    return DeltaTable(path, storage_options=opts).version()


def published_versions(spec: JobSpec) -> dict[str, int] | None:
    """The latest published version set of the spec's dataset, or None when nothing was published."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError
    try:
        table = DeltaTable(f"{dataset_root(spec)}/{PUBLISHED}", storage_options=storage_options(spec))
    except TableNotFoundError:
        return None
    rows = table.to_pyarrow_table(columns=["published_at", "versions"]).sort_by([("published_at", "descending")])
    return json.loads(rows["versions"][0].as_py()) if rows.num_rows else None


def read_versions(spec: JobSpec) -> dict[str, int]:
    """The version set a reader of the spec's dataset uses: `data.pinned_versions` when set, else the
    latest published set; an error naming the dataset when there is neither."""
    versions = spec.data.pinned_versions or published_versions(spec)
    if not versions:
        raise FileNotFoundError(f"dataset {spec.data.name} at {dataset_root(spec)} has no published version set: "
                                "run `llmrec etl` (a set is published only when its data-quality checks pass)")
    return dict(versions)
