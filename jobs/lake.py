"""The lake layout, shared by every layer: where each table of a dataset lives, and the dataset's
published version set — the table versions readers use.

An ETL run rewrites tables one commit at a time and runs its data-quality checks last; only when
they all pass does it append the versions it wrote to `<dataset>/_etl/published` (one Delta
commit). Readers take the latest published set (or a set pinned in the spec), never "the latest of
each table", so a failed or half-finished run changes nothing they see.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from jobs.spec import JobSpec, absolute_path

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
    opts = spec.lake.storage_options or None
    write_deltalake(path, row, mode="append", storage_options=opts)
    return DeltaTable(path, storage_options=opts).version()


def published_versions(spec: JobSpec) -> dict[str, int] | None:
    """The latest published version set of the spec's dataset, or None when nothing was published."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError
    try:
        table = DeltaTable(f"{dataset_root(spec)}/{PUBLISHED}", storage_options=spec.lake.storage_options or None)
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
