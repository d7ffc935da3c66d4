"""Data assets: the bronze/silver/gold Delta tables built by one ETL step, with blocking quality checks,
and landed days merged one partition at a time. The tables, their dependencies and which table each
check guards are what `spark.etl` and `spark.quality` declare."""

from typing import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)
from deltalake import DeltaTable

from dagster_project.resources import SparkResource, SpecResource
from spark.etl import ETL_TABLES, TABLES, Lake, engine_for, ingest_day, run_etl
from spark.quality import CHECKS

LANDING_DAYS = DynamicPartitionsDefinition(name="landing_days")


def asset_key(table: str) -> AssetKey:
    layer, name = TABLES[table].split("/")
    return AssetKey([layer, name])


def preview(lake: Lake, table: str, version: int, columns: list[str], rows: int = 5) -> MetadataValue:
    """The first rows of a table version as a markdown table."""
    t = DeltaTable(lake.path(table), version=version, storage_options=lake.storage_options or None)
    head = t.to_pyarrow_dataset().head(rows, columns=columns).to_pylist()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c])[:80].replace("|", "/") for c in columns) + " |" for r in head]
    return MetadataValue.md("\n".join(lines))


@multi_asset(
    specs=[AssetSpec(asset_key(t), group_name="data", kinds={"spark", "delta"},
                     deps=[asset_key(d) for d in deps], description=f"Delta table {TABLES[t]}")
           for t, deps in ETL_TABLES.items()],
    check_specs=[AssetCheckSpec(name, asset=asset_key(table), blocking=True) for name, table in CHECKS.items()],
)
def lake_tables(context: AssetExecutionContext, spec: SpecResource, spark: SparkResource) -> Iterator:
    """`llmrec etl` as one step: every table is one atomic Delta commit, each reported with its version;
    the version set is published for readers only when every check passes."""
    job = spec.load(*spark.spec_overrides())
    with engine_for(job) as engine:
        summary = run_etl(job, engine)
    lake = Lake.of(job)
    acc, gold, v = summary.accounting, summary.gold, summary.versions
    extra = {"interactions_raw": {"rows": acc.raw_rows},
             "quarantine": {"rows": acc.quarantined_rows, "by_reason": MetadataValue.json(acc.quarantined_by_reason)},
             "interactions": {"rows": acc.silver_rows, "duplicates_removed": acc.duplicates_removed,
                              "conflicting_keys": acc.conflicting_keys},
             "item_index": {"rows": gold.items,
                            "preview": preview(lake, "item_index", v["item_index"], ["item_idx", "item_id", "text"])},
             "user_index": {"rows": gold.users},
             "sequences": {"rows": sum(gold.sequences_by_split.values()),
                           "by_split": MetadataValue.json(gold.sequences_by_split), "interactions": gold.interactions,
                           "published": summary.published is not None,
                           "published_versions": MetadataValue.json(summary.versions if summary.published is not None
                                                                    else {})}}
    for table in ETL_TABLES:
        meta = {"path": MetadataValue.path(lake.path(table)), "delta_version": v[table], **extra.get(table, {})}
        yield MaterializeResult(asset_key=asset_key(table), metadata=meta)
    for check in summary.checks:
        yield AssetCheckResult(asset_key=asset_key(CHECKS[check.name]), check_name=check.name, passed=check.passed,
                               severity=AssetCheckSeverity.ERROR, description=check.description,
                               metadata=dict(check.metrics))


@asset(key=AssetKey(["bronze", "landed_day"]), group_name="data", kinds={"spark", "delta"},
       partitions_def=LANDING_DAYS)
def landed_day(context: AssetExecutionContext, spec: SpecResource, spark: SparkResource) -> MaterializeResult:
    """One day of the landing folder (`data.landing`) MERGEd into bronze, quarantine and silver on
    their keys, gold rebuilt and published when its checks pass. Materializing a day twice changes
    nothing (the MERGEs insert nothing, gold is not rebuilt)."""
    job = spec.load(*spark.spec_overrides())
    if job.data.landing is None:
        raise ValueError(f"spec {job.name}: data.landing is not configured; there is no landing folder to ingest")
    with engine_for(job) as engine:
        r = ingest_day(job, engine, context.partition_key)
    acc = r.accounting
    meta = {"rows": r.rows, "quarantined": acc.quarantined_rows,
            "quarantined_by_reason": MetadataValue.json(acc.quarantined_by_reason),
            "duplicates_removed": acc.duplicates_removed, "conflicting_keys": acc.conflicting_keys,
            "accounted": acc.accounted, "bronze_inserted": r.bronze.inserted, "quarantine_inserted": r.quarantine.inserted,
            "silver_inserted": r.silver.inserted, "silver_updated": r.silver.updated,
            "silver_version": r.silver.version, "gold_rebuilt": r.gold is not None}
    if r.gold is not None:
        meta["published"] = r.gold.published is not None
        meta["published_versions"] = MetadataValue.json(r.gold.versions if r.gold.published is not None else {})
        failed = [c.name for c in r.gold.checks if not c.passed]
        meta["failed_checks"] = MetadataValue.json(failed)
    else:
        meta["gold_skipped"] = r.gold_skipped
    return MaterializeResult(metadata=meta)
