"""Data assets: the bronze/silver/gold Delta tables built by one ETL step, with blocking quality checks,
and landed days merged one partition at a time, in date order. The tables, their dependencies and
which table each check guards are what `spark.etl` and `spark.quality` declare. A run that finds the
lake held by another ETL asks Dagster to retry it later (it is never lost)."""

import time
from typing import Iterator

from dagster import (
    AssetCheckResult,
    Failure,
    RetryRequested,
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

from dagster_project.landing import landing_plan
from dagster_project.resources import SparkResource, SpecResource
from jobs.lake import TABLES, Lake, LakeBusy
from jobs.secrets import scrubbed_errors
from spark.etl import ETL_TABLES, engine_for, ingest_day, run_etl
from spark.quality import CHECKS

LANDING_DAYS = DynamicPartitionsDefinition(name="landing_days")
LAKE_POOL = "llmrec_lake"  # one lake-writing run at a time: the instance's pool limit (infra/dagster/dagster*.yaml)
BUSY_RETRIES, BUSY_WAIT_S = 30, 60


def busy_retry(exc: LakeBusy) -> RetryRequested:
    """Another ETL holds the lake: try again in a minute (up to half an hour), never give the run up."""
    return RetryRequested(max_retries=BUSY_RETRIES, seconds_to_wait=BUSY_WAIT_S)


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
    pool=LAKE_POOL,
)
def lake_tables(context: AssetExecutionContext, spec: SpecResource, spark: SparkResource) -> Iterator:
    """`llmrec etl` as one step: every table is one atomic Delta commit, each reported with its version;
    the version set is published for readers only when every check passes. Rematerialised on the
    inputs the published set was built from, it writes nothing (`unchanged`: the same versions)."""
    job = spec.load(*spark.spec_overrides())
    try:
        with scrubbed_errors(), engine_for(job) as engine:
            summary = run_etl(job, engine)
    except LakeBusy as exc:
        raise busy_retry(exc) from exc
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
        meta = {"path": MetadataValue.path(lake.path(table)), "delta_version": v[table],
                "unchanged": summary.unchanged, **extra.get(table, {})}
        yield MaterializeResult(asset_key=asset_key(table), metadata=meta)
    for check in summary.checks:
        yield AssetCheckResult(asset_key=asset_key(CHECKS[check.name]), check_name=check.name, passed=check.passed,
                               severity=AssetCheckSeverity.ERROR, description=check.description,
                               metadata=dict(check.metrics))


@asset(key=AssetKey(["bronze", "landed_day"]), group_name="data", kinds={"spark", "delta"},
       partitions_def=LANDING_DAYS, pool=LAKE_POOL,
       check_specs=[AssetCheckSpec("no_missing_days", asset=AssetKey(["bronze", "landed_day"]), blocking=False,
                                   description="no calendar day before this one is missing from the landing folder "
                                               "(a missing day is skipped after data.landing.missing_day_wait_hours)")])
def landed_day(context: AssetExecutionContext, spec: SpecResource, spark: SparkResource) -> Iterator:
    """One day of the landing folder (`data.landing`) MERGEd into bronze, quarantine and silver on
    their keys (interactions, and item metadata when the day brings it), gold rebuilt and published
    when its checks pass (a day whose gold fails them fails the run). Days go in date order: a day is
    refused while an earlier landed day waits to be ingested, and waits for a missing earlier day
    (see `dagster_project.landing`), which is ingested as a backfill when it arrives. Materializing
    a day twice changes nothing (the MERGEs insert nothing, gold is not rebuilt); a re-delivered day
    updates what changed and counts it."""
    job = spec.load(*spark.spec_overrides())
    if job.data.landing is None:
        raise ValueError(f"spec {job.name}: data.landing is not configured; there is no landing folder to ingest")
    day = context.partition_key
    plan = landing_plan(job, time.time())
    if day in plan.pending and plan.day != day:
        raise Failure(f"landed day {day} is not next: " + (f"{plan.day} is ingested before it" if plan.day else
                                                           plan.reason))
    try:
        with scrubbed_errors(), engine_for(job) as engine:
            r = ingest_day(job, engine, day)
    except LakeBusy as exc:
        raise busy_retry(exc) from exc
    if r.gold is not None and r.gold.published is None:
        failed = [c.name for c in r.gold.checks if not c.passed]
        raise Failure(f"landed day {day}: the rebuilt gold tables failed their checks {failed}; nothing was published "
                      "and the day's commits were rolled back", metadata={"failed_checks": MetadataValue.json(failed)})
    acc = r.accounting
    meta = {"rows": r.rows, "quarantined": acc.quarantined_rows,
            "quarantined_by_reason": MetadataValue.json(acc.quarantined_by_reason),
            "duplicates_removed": acc.duplicates_removed, "conflicting_keys": acc.conflicting_keys,
            "accounted": acc.accounted, "bronze_inserted": r.bronze.inserted, "quarantine_inserted": r.quarantine.inserted,
            "silver_inserted": r.silver.inserted, "silver_updated": r.silver.updated,
            "silver_version": r.silver.version, "gold_rebuilt": r.gold is not None,
            "items_inserted": r.items.inserted if r.items else 0, "items_updated": r.items.updated if r.items else 0,
            "item_rows_quarantined": MetadataValue.json(acc.item_rows_quarantined_by_reason),
            "fingerprint": plan.fingerprints.get(day, ""), "repairs": MetadataValue.json(r.repairs)}
    if r.gold is not None:
        g = r.gold.gold
        meta["published"] = r.gold.published is not None
        meta["published_versions"] = MetadataValue.json(r.gold.versions if r.gold.published is not None else {})
        meta.update(new_items=g.new_items, new_users=g.new_users, items_active=g.items_active,
                    items_without_metadata=g.items_without_metadata)
    else:
        meta["gold_skipped"] = r.gold_skipped
    yield MaterializeResult(metadata=meta)
    yield AssetCheckResult(check_name="no_missing_days", passed=not plan.skipped or day != plan.day,
                           severity=AssetCheckSeverity.ERROR,
                           description=plan.reason, metadata={"skipped_missing_days": MetadataValue.json(
                               plan.skipped if day == plan.day else [])})
