"""Data assets: the bronze/silver/gold Delta tables built by one ETL step, with blocking quality checks.
The tables, their dependencies and which table each check guards are what `spark.etl` and
`spark.quality` declare."""

from typing import Iterator

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetKey,
                     AssetSpec, MaterializeResult, MetadataValue, multi_asset)

from dagster_project.resources import SpecResource
from spark.delta_io import table_version
from spark.etl import ETL_TABLES, TABLES, Lake, engine_for, run_etl
from spark.quality import CHECKS


def asset_key(table: str) -> AssetKey:
    layer, name = TABLES[table].split("/")
    return AssetKey([layer, name])


@multi_asset(
    specs=[AssetSpec(asset_key(t), group_name="data", kinds={"spark", "delta"},
                     deps=[asset_key(d) for d in deps], description=f"Delta table {TABLES[t]}")
           for t, deps in ETL_TABLES.items()],
    check_specs=[AssetCheckSpec(name, asset=asset_key(table), blocking=True) for name, table in CHECKS.items()],
)
def lake_tables(context: AssetExecutionContext, spec: SpecResource) -> Iterator:
    """`llmrec etl` as one step: every table is one atomic Delta commit, each reported with its version."""
    job = spec.load()
    with engine_for(job) as engine:
        summary = run_etl(job, engine)
    lake = Lake.of(job)
    acc, gold = summary.accounting, summary.gold
    extra = {"interactions_raw": {"rows": acc.raw_rows},
             "quarantine": {"rows": acc.quarantined_rows, "by_reason": MetadataValue.json(acc.quarantined_by_reason)},
             "interactions": {"rows": acc.silver_rows, "duplicates_removed": acc.duplicates_removed},
             "item_index": {"rows": gold.items}, "user_index": {"rows": gold.users},
             "sequences": {"rows": sum(gold.sequences_by_split.values()),
                           "by_split": MetadataValue.json(gold.sequences_by_split), "interactions": gold.interactions}}
    for table in ETL_TABLES:
        meta = {"path": MetadataValue.path(lake.path(table)),
                "delta_version": table_version(lake.path(table), lake.storage_options), **extra.get(table, {})}
        yield MaterializeResult(asset_key=asset_key(table), metadata=meta)
    for check in summary.checks:
        yield AssetCheckResult(asset_key=asset_key(CHECKS[check.name]), check_name=check.name, passed=check.passed,
                               severity=AssetCheckSeverity.ERROR, description=check.description,
                               metadata=dict(check.metrics))
