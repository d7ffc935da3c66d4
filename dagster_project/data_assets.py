"""Data assets: the bronze/silver/gold Delta tables built by one ETL step, with blocking quality checks."""

from typing import Iterator

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetKey,
                     AssetSpec, MaterializeResult, MetadataValue, multi_asset)

from dagster_project.resources import SpecResource
from spark.delta_io import table_version
from spark.etl import TABLES, Lake, run_etl, start_engine_for

BUILT = ["interactions_raw", "quarantine", "interactions", "items", "item_index", "user_index", "sequences"]
LAYER_DEPS = {"interactions_raw": [], "quarantine": ["interactions_raw"], "interactions": ["interactions_raw"],
              "items": [], "item_index": ["interactions", "items"], "user_index": ["interactions"],
              "sequences": ["interactions", "item_index", "user_index"]}
# which asset each data-quality check guards
CHECKS = {"no_null_ids": "interactions", "kcore_holds": "sequences", "no_train_test_leakage": "sequences",
          "sequence_items_indexed": "sequences", "quarantine_share": "quarantine"}


def asset_key(table: str) -> AssetKey:
    layer, name = TABLES[table].split("/")
    return AssetKey([layer, name])


@multi_asset(
    specs=[AssetSpec(asset_key(t), group_name="data", kinds={"spark", "delta"},
                     deps=[asset_key(d) for d in LAYER_DEPS[t]], description=f"Delta table {TABLES[t]}")
           for t in BUILT],
    check_specs=[AssetCheckSpec(name, asset=asset_key(table), blocking=True) for name, table in CHECKS.items()],
)
def lake_tables(context: AssetExecutionContext, spec: SpecResource) -> Iterator:
    """`llmrec etl` as one step: every table is one atomic Delta commit, each reported with its version."""
    job = spec.load()
    engine = start_engine_for(job)
    try:
        summary = run_etl(job, engine)
    finally:
        engine.stop()
    lake = Lake.of(job)
    acc, gold = summary["accounting"], summary["gold"]
    extra = {"interactions_raw": {"rows": acc["raw_rows"]},
             "quarantine": {"rows": acc["quarantined_rows"],
                            "by_reason": MetadataValue.json(acc["quarantined_by_reason"])},
             "interactions": {"rows": acc["silver_rows"], "duplicates_removed": acc["duplicates_removed"]},
             "item_index": {"rows": gold["items"]}, "user_index": {"rows": gold["users"]},
             "sequences": {"rows": sum(gold["sequences_by_split"].values()),
                           "by_split": MetadataValue.json(gold["sequences_by_split"]),
                           "interactions": gold["interactions"]}}
    for table in BUILT:
        meta = {"path": MetadataValue.path(lake.path(table)),
                "delta_version": table_version(lake.path(table), lake.storage_options),
                **extra.get(table, {})}
        yield MaterializeResult(asset_key=asset_key(table), metadata=meta)
    for check in summary["checks"]:
        yield AssetCheckResult(asset_key=asset_key(CHECKS[check["name"]]), check_name=check["name"],
                               passed=check["passed"], severity=AssetCheckSeverity.ERROR,
                               description=check["description"],
                               metadata={k: v for k, v in check["metrics"].items()})
