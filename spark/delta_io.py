"""Delta Lake I/O: native format("delta") + SQL MERGE where the session has Delta, delta-rs otherwise.

Every writer returns the table version it committed and reports it to `jobs.lake.committed`; every
reader can pin a version. Commits are atomic (Delta's log), so a failed write leaves the previous
version intact; a log that can't be read is `jobs.lake.LakeCorrupt`, naming the table.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable, write_deltalake
from pyspark.sql import DataFrame
from pyspark.sql.pandas.types import from_arrow_schema

from jobs.lake import Lake, committed, latest_version, open_table
from jobs.spec import absolute_path  # Spark SQL and delta-rs resolve relative paths differently
from spark.session import Engine


def table_version(path: str, storage_options: dict | None = None) -> int | None:
    """The latest committed version, or None when there is no Delta table at `path`."""
    return latest_version(absolute_path(path), storage_options)


def table_exists(path: str, storage_options: dict | None = None) -> bool:
    return table_version(path, storage_options) is not None


def table_history(path: str, storage_options: dict | None = None) -> list[dict]:
    return open_table(absolute_path(path), options=storage_options).history()


def read_table(engine: Engine, path: str, version: int | None = None,
               storage_options: dict | None = None) -> DataFrame:
    path = absolute_path(path)
    if not table_exists(path, storage_options):
        raise FileNotFoundError(f"no Delta table at {path}")
    if engine.native_delta and version is None:
        return engine.session.read.format("delta").load(path)
    # A pinned version's files come from delta-rs for every engine: Sail (0.7) cannot read a version
    # older than the table's latest checkpoint ("Missing commit file"), which a living lake reaches
    # on its tenth commit.
    dt = open_table(path, version, storage_options)
    uris = dt.file_uris()
    if not uris:  # an empty version (a quarantine that caught nothing): its columns, no rows
        return engine.session.createDataFrame([], schema=from_arrow_schema(pa.schema(dt.schema().to_arrow())))
    features = dt.protocol().reader_features or []
    if not dt.metadata().partition_columns and "deletionVectors" not in features:
        # Spark reads the version's data files itself: nothing passes through the driver.
        return engine.session.read.parquet(*uris)
    return engine.session.createDataFrame(dt.to_pyarrow_table())


def read_lake(engine: Engine, lake: Lake, table: str, version: int | None = None) -> DataFrame:
    """A table of the dataset (at `version`, default its latest) as a Spark DataFrame."""
    return read_table(engine, lake.path(table), version, lake.storage_options)


def write_lake(engine: Engine, df: DataFrame, lake: Lake, table: str) -> int:
    """Replace a table of the dataset with `df`; returns the committed version."""
    return write_table(engine, df, lake.path(table), "overwrite", lake.storage_options)


def write_table(engine: Engine, df: DataFrame, path: str, mode: str = "overwrite",
                storage_options: dict | None = None) -> int:
    """Write `df` as a Delta table (mode overwrite|append) and return the committed version."""
    if mode not in ("overwrite", "append"):
        raise ValueError(f"write_table({path}): mode must be overwrite or append, got {mode!r}")
    path = absolute_path(path)
    if engine.native_delta:
        writer = df.write.format("delta").mode(mode)
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        writer.save(path)
    else:
        staged = os.path.join(engine.scratch, f"stage-{uuid.uuid4().hex}")
        df.write.mode("overwrite").parquet(staged)
        dataset = pads.dataset(staged, format="parquet", schema=_arrow_schema(df))
        # Streamed with bounded read-ahead and file size: on 10M rows this holds the Python side
        # near 1 GiB instead of 2+ GiB with pyarrow's default read-ahead.
        reader = dataset.scanner(batch_size=32768, batch_readahead=1, fragment_readahead=1).to_reader()
        write_deltalake(path, reader, mode=mode, schema_mode="overwrite" if mode == "overwrite" else None,
                        target_file_size=32 * 1024 * 1024, storage_options=storage_options or None)
    version = table_version(path, storage_options)
    committed(path, version)
    return version


def _arrow_schema(df: DataFrame):
    """The frame's schema as Arrow (an empty collect: no rows move)."""
    return df.limit(0).toArrow().schema


@dataclass
class MergeResult:
    version: int
    inserted: int
    updated: int
    committed: bool  # False when the source held nothing new: no commit, the version is unchanged


def merge_table(engine: Engine, source: DataFrame, path: str, keys: list[str],
                compare: list[str] | None = None, storage_options: dict | None = None) -> MergeResult:
    """Upsert `source` into the table at `path` on `keys`.

    Rows whose keys are new are inserted; rows whose keys exist and whose `compare` columns differ
    (NULLs compare equal to NULLs) have those columns updated — every other column keeps the value
    it was inserted with (when a row first landed, for one); everything else is left alone. A source
    with nothing new commits nothing, so re-running the same load is a no-op (same version, same
    contents). `source` must be unique on `keys`.
    """
    path = absolute_path(path)
    base = table_version(path, storage_options)
    if base is None:
        n = source.count()
        return MergeResult(write_table(engine, source, path, "overwrite", storage_options), n, 0, True)
    target = read_table(engine, path, base, storage_options)
    compare = list(compare or [])
    fresh = source.join(target.select(*keys), on=keys, how="left_anti")
    if compare:
        t = target.select(*keys, *compare).toDF(*[f"_t_{c}" for c in (*keys, *compare)])
        same = [source[k] == t[f"_t_{k}"] for k in keys] + [source[c].eqNullSafe(t[f"_t_{c}"]) for c in compare]
        changed = source.join(t, on=same, how="left_anti")
    else:
        changed = fresh
    n_new = fresh.count()
    n_changed = changed.count() if compare else n_new
    if n_changed == 0:
        return MergeResult(base, 0, 0, False)
    on = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
    if engine.native_delta:
        view = f"llmrec_merge_{uuid.uuid4().hex}"
        changed.createOrReplaceTempView(view)
        matched = ("WHEN MATCHED THEN UPDATE SET " + ", ".join(f"t.`{c}` = s.`{c}`" for c in compare) + " ") \
            if compare else ""
        engine.session.sql(
            f"MERGE INTO delta.`{path}` AS t USING {view} AS s ON {on} {matched}WHEN NOT MATCHED THEN INSERT *"
        ).collect()
        engine.session.catalog.dropTempView(view)
    else:
        merger = DeltaTable(path, storage_options=storage_options or None).merge(
            source=changed.toArrow(), predicate=on.replace("`", ""), source_alias="s", target_alias="t")
        if compare:
            merger = merger.when_matched_update(updates={c: f"s.{c}" for c in compare})
        merger.when_not_matched_insert_all().execute()
    version = table_version(path, storage_options)
    committed(path, version)
    return MergeResult(version, n_new, n_changed - n_new, True)
