"""The lake layout, shared by every layer: where each table of a dataset lives."""
from __future__ import annotations

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


def dataset_root(spec: JobSpec) -> str:
    """`<lake.root>/<data.name>`, absolute for local paths."""
    return absolute_path(spec.dataset_root())


def table_path(spec: JobSpec, table: str) -> str:
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
    return f"{dataset_root(spec)}/{TABLES[table]}"
