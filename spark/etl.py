"""The ETL pipeline: source -> bronze -> silver -> gold Delta tables; full runs and daily MERGEs."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from jobs.files import write_atomic
from jobs.lake import Lake, current_publication, etl_lock, ingested_days, publish, rollback_unpublished
from jobs.progress import QUIET, Steps
from jobs.schema import JobSpec
from spark import quality
from spark.delta_io import MergeResult, merge_table, read_lake, write_lake
from spark.quality import CheckResult
from spark.session import Engine, spark_engine
from spark.sources import (RawSource, SourceError, day_fingerprint, files_fingerprint, landing_days, read_landing_day,
                           read_source, source_fingerprint)
from spark.transforms import (EmptyData, build_item_index, build_sequences, collapse_repeats, deduplicate,
                              extend_index, filter_min_value, first_appearance, index_interactions, interaction_counts,
                              kcore, leave_one_out, line_checks, quarantine_rows, tag_interactions, temporal_split,
                              typed_interactions)

NATURAL_KEY = ["user_id", "item_id", "ts"]
ITEM_FIELDS = ["title", "categories", "description", "attributes", "active"]  # what a changed item text is
# The tables an ETL run writes, each with the tables it is built from (the Dagster asset graph).
ETL_TABLES: dict[str, list[str]] = {
    "interactions_raw": [], "quarantine": ["interactions_raw"], "interactions": ["interactions_raw"], "items": [],
    "item_index": ["interactions", "items"], "user_index": ["interactions"],
    "sequences": ["interactions", "item_index", "user_index"],
}


@dataclass
class Accounting:
    """Where every raw row went: `accounted` holds when raw = silver + quarantined + duplicates
    removed. `conflicting_keys`: natural keys (user, item, time) that came with different values;
    the largest value is kept (`transforms.deduplicate`) and the other rows count as duplicates
    removed. For a landed day, `silver_rows` are the day's rows after deduplication, before the
    MERGE (whose inserted / updated / unchanged counts the IngestResult carries)."""
    raw_rows: int
    quarantined_rows: int
    quarantined_by_reason: dict[str, int]
    duplicates_removed: int
    silver_rows: int
    accounted: bool
    item_rows_quarantined_by_reason: dict[str, int]
    conflicting_keys: int = 0


@dataclass
class GoldStats:
    """`users` / `items`: rows of the lineage's indexes (every id ever given; inactive items stay);
    `items_active`: catalogue items that can be recommended; `items_in_kcore`: those the models train
    on; `items_without_metadata`: catalogue items with no metadata yet (their text is their id);
    `new_items` / `new_users`: ids this build added to the published index."""
    interactions_after_filters: int
    interactions: int
    users: int
    items: int
    kcore_rounds: list[dict]
    sequences_by_split: dict[str, int]
    temporal_cuts: list[int] | None
    items_active: int = 0
    items_in_kcore: int = 0
    items_without_metadata: int = 0
    new_items: int = 0
    new_users: int = 0


@dataclass
class GoldBuild:
    """What a gold rebuild produced: its figures, the version of every table, the quality checks."""
    gold: GoldStats
    versions: dict[str, int]
    checks: list[CheckResult]
    published: int | None = None   # the publication's commit, None when a check failed (nothing published)
    lineage: str | None = None     # the id lineage the build extends (None: a new one)

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass
class IngestResult:
    """One landed day MERGEd into bronze, quarantine and silver; `gold` is None when silver did not
    change (`gold_skipped` says why) or the caller rebuilds gold itself."""
    day: str
    rows: int
    bronze: MergeResult
    quarantine: MergeResult
    silver: MergeResult
    gold: GoldBuild | None = None
    gold_skipped: str | None = None
    accounting: Accounting | None = None
    items: MergeResult | None = None   # the day's item metadata MERGEd into silver/items (None: no items file)
    repairs: list[dict] = field(default_factory=list)  # rolled back before the day (`jobs.lake.rollback_unpublished`)


@dataclass
class EtlSummary:
    """A dataset's latest build, as written to `<lake>/<dataset>/_etl/summary.json`."""
    spec: str
    dataset: str
    engine: str
    lake: str
    source: str
    ingest_date: str
    accounting: Accounting | None
    gold: GoldStats
    versions: dict[str, int]
    checks: list[CheckResult]
    published: int | None = None
    landing: list[IngestResult] = field(default_factory=list)
    last_ingest: IngestResult | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)
    repairs: list[dict] = field(default_factory=list)  # what was rolled back first (`jobs.lake.rollback_unpublished`)
    lineage: str | None = None
    unchanged: bool = False  # this run found the published set built from its very inputs and wrote nothing

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return asdict(self) | {"checks_passed": self.checks_passed}

    @classmethod
    def from_dict(cls, doc: dict) -> "EtlSummary":
        def ingest(d: dict | None) -> IngestResult | None:
            if d is None:
                return None
            gold = d.get("gold")
            return IngestResult(d["day"], d["rows"], *(MergeResult(**d[k]) for k in ("bronze", "quarantine", "silver")),
                                GoldBuild(GoldStats(**gold["gold"]), gold["versions"],
                                          [CheckResult(**c) for c in gold["checks"]], gold.get("published"))
                                if gold else None, d.get("gold_skipped"),
                                Accounting(**d["accounting"]) if d.get("accounting") else None,
                                MergeResult(**d["items"]) if d.get("items") else None, d.get("repairs", []))
        return cls(doc["spec"], doc["dataset"], doc["engine"], doc["lake"], doc["source"], doc["ingest_date"],
                   Accounting(**doc["accounting"]) if doc.get("accounting") else None, GoldStats(**doc["gold"]),
                   doc["versions"], [CheckResult(**c) for c in doc["checks"]], doc.get("published"),
                   [ingest(x) for x in doc.get("landing", [])], ingest(doc.get("last_ingest")),
                   doc.get("step_seconds", {}), doc.get("repairs", []), doc.get("lineage"))


@contextmanager
def engine_for(spec: JobSpec) -> Iterator[Engine]:
    """The spec's engine, stopped on exit; on remote/cluster engines scratch data goes under the
    lake root, which the Spark servers can reach (a local temp folder is only visible to this machine)."""
    shared = spec.spark.engine in ("remote", "cluster")
    with spark_engine(spec.spark, app_name=f"llmrec-{spec.name}",
                      scratch_root=f"{Lake.of(spec).root}/_scratch" if shared else None) as engine:
        yield engine


def today_utc() -> str:
    return datetime.now(timezone.utc).date().isoformat()


def add_record_ids(raw: DataFrame, ingest_date: str) -> DataFrame:
    """`record_id`: a 96-bit content hash of (source file, verbatim line), xxhash64 + murmur3, hex.

    It identifies a landed line, so re-landing a file inserts nothing on the insert-only bronze and
    quarantine MERGEs; exact duplicate lines of one file share it (they are the same record, and
    each copy is still kept as its own bronze row). Identical on every engine."""
    line = F.coalesce(F.col("raw"), F.lit(""))
    high = F.lpad(F.hex(F.xxhash64(F.col("source_file"), line)), 16, "0")
    low = F.lpad(F.hex(F.pmod(F.hash(line, F.col("source_file")).cast("long"), F.lit(4294967296))), 8, "0")
    return raw.withColumn("record_id", F.lower(F.concat(high, low))) \
        .withColumn("ingest_date", F.lit(ingest_date).cast("date"))


def tag_items(items: DataFrame, id_pattern: str | None = None) -> DataFrame:
    checks = [*line_checks(), ("missing_item_id", F.col("item_id").isNull())]
    if id_pattern is not None:
        checks.append(("invalid_item_id", ~F.col("item_id").rlike(id_pattern)))
    reason = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        reason = F.when(failed, F.lit(name)).otherwise(reason)
    return items.withColumn("reason", reason)


def tag(src: RawSource, spec: JobSpec, bronze: DataFrame) -> DataFrame:
    """`tag_interactions` with the spec's value and time ranges and the source's id format; the
    latest plausible time, unless set, is the end of the day after today (UTC)."""
    d = spec.data
    earliest = int(datetime(*d.time_range.earliest.timetuple()[:3], tzinfo=timezone.utc).timestamp())
    latest_day = d.time_range.latest or (datetime.now(timezone.utc).date() + timedelta(days=1))
    latest = int(datetime(*latest_day.timetuple()[:3], tzinfo=timezone.utc).timestamp()) + 86399
    return tag_interactions(bronze, src.ts_format, d.value_range.min, d.value_range.max, src.has_value,
                            (earliest, latest), src.user_id_pattern, src.item_id_pattern)


def silver_items(tagged_items: DataFrame, landed_on: str | None = None) -> DataFrame:
    """One metadata row per item id (the first by verbatim text where a feed repeats an item), with
    the landing day it came with (NULL: the base source)."""
    w = Window.partitionBy("item_id").orderBy("raw")
    return (tagged_items.filter(F.col("reason").isNull()).withColumn("_rn", F.row_number().over(w))
            .filter(F.col("_rn") == 1)
            .select("item_id", *ITEM_FIELDS, F.lit(landed_on).cast("date").alias("landed_on")))


def items_from_interactions(silver: DataFrame) -> DataFrame:
    """Sources without metadata: every item id, no text fields (item text falls back to the id)."""
    return silver.select("item_id").distinct().select(
        "item_id", F.lit(None).cast("string").alias("title"), F.lit(None).cast("array<string>").alias("categories"),
        F.lit(None).cast("string").alias("description"), F.lit(None).cast("string").alias("attributes"),
        F.lit(True).alias("active"), F.lit(None).cast("date").alias("landed_on"))


def _bronze_columns(df: DataFrame) -> DataFrame:
    return df.select("record_id", "user_id", "item_id", "ts", "value", "raw", "parse_error", "source_file",
                     "ingest_date")


# ----------------------------------------------------------------------------- full run

def locked(fn):
    """Run `fn(spec, ...)` holding the dataset's ETL lock (`jobs.lake.etl_lock`)."""
    @functools.wraps(fn)
    def run(spec: JobSpec, *args, **kwargs):
        with etl_lock(spec):
            return fn(spec, *args, **kwargs)
    return run


def rolled_back_on_failure(fn):
    """A writer, under the ETL lock, that starts from the published version set (what a failed or
    killed earlier run left ahead of it is rolled back first: `jobs.lake.rollback_unpublished`) and
    rolls its own commits back when it raises. Its result's `repairs` say what was rolled back."""
    @functools.wraps(fn)
    def run(spec: JobSpec, *args, **kwargs):
        with etl_lock(spec):
            repairs = rollback_unpublished(spec, list(ETL_TABLES))
            try:
                result = fn(spec, *args, **kwargs)
            except BaseException:
                rollback_unpublished(spec, list(ETL_TABLES))
                raise
            result.repairs = [asdict(r) for r in repairs] + getattr(result, "repairs", [])
            return result
    return run


@rolled_back_on_failure
def run_etl(spec: JobSpec, engine: Engine, steps: Steps = QUIET, renumber: bool = False,
            force: bool = False) -> EtlSummary:
    """Rebuild every table from the spec's source, merge any landed daily files, rebuild gold. The
    ids of the published index are kept (`renumber`: start a new id lineage instead). A run whose
    checks fail publishes nothing and rolls its commits back (readers and the next writer keep the
    published set; the failed versions stay readable by time travel, listed in the summary).

    A run whose inputs — the source's files (or a generated source's settings), the landed days, the
    `data` settings and the ETL's code — are those the published set was built from writes nothing
    and returns that build's summary marked `unchanged` (`force`: rebuild anyway), so rerunning the
    ETL on the same data leaves every table at its version and a run pinned to it resumable."""
    lake, d = Lake.of(spec), spec.data
    ingest_date = today_utc()
    check_landing(spec)
    files = landing_days(d.landing) if d.landing is not None else {}
    days = list(files)
    landed = {day: read_landing_day(engine, d.landing, day, d.max_line_bytes) for day in days}  # checked before writing
    fingerprints = {day: day_fingerprint(f, d.landing.path) for day, f in files.items()}
    with steps.step("read source"):
        src = read_source(engine, d.source, d.max_line_bytes)
        inputs = etl_inputs(spec, src)
        if not (force or renumber) and (same := built_from(spec, inputs, fingerprints)) is not None:
            return same
        if src.interactions.limit(1).count() == 0:  # before anything is written
            raise SourceError(f"data.source ({d.source.kind}) has no rows: nothing to build")
    with steps.step("bronze/interactions_raw"):
        v_raw = write_lake(engine, _bronze_columns(add_record_ids(src.interactions, ingest_date)), lake, "interactions_raw")
    bronze = read_lake(engine, lake, "interactions_raw", v_raw)
    tagged = tag(src, spec, bronze)
    items_tagged = None
    if src.items is not None:
        items_tagged = tag_items(add_record_ids(src.items, ingest_date), src.item_id_pattern)
    with steps.step("bronze/quarantine"):
        q = quarantine_rows(tagged, "interaction")
        if items_tagged is not None:
            q = q.unionByName(quarantine_rows(items_tagged, "item"))
        v_q = write_lake(engine, q, lake, "quarantine")
    with steps.step("silver/interactions"):
        v_silver = write_lake(engine, deduplicate(typed_interactions(tagged)), lake, "interactions")
    with steps.step("silver/items"):
        items = silver_items(items_tagged) if items_tagged is not None else \
            items_from_interactions(read_lake(engine, lake, "interactions", v_silver))
        write_lake(engine, items, lake, "items")
    with steps.step("accounting"):
        accounting = _account(engine, lake, tagged, v_raw, v_q, v_silver)
    ingested = [merge_day(spec, engine, day, steps, landed[day]) for day in days]
    build = build_gold(spec, engine, steps, publish_as="etl" if accounting.accounted else None, renumber=renumber,
                       days=fingerprints, inputs=inputs)
    summary = EtlSummary(spec.name, d.name, engine.name, lake.root, d.source.kind, ingest_date, accounting,
                         build.gold, build.versions, build.checks, build.published, ingested,
                         step_seconds={k: round(v, 3) for k, v in steps.timings.items()}, lineage=build.lineage)
    if build.published is None:
        summary.repairs = [asdict(r) for r in rollback_unpublished(spec, list(ETL_TABLES))]
    write_summary(lake, summary)
    return summary


def etl_inputs(spec: JobSpec, src: RawSource) -> str | None:
    """The fingerprint of what a full build reads, `<source>:<settings>`: the source
    (`source_fingerprint`) and `etl_settings`; None when the source can't be fingerprinted (remote
    files)."""
    source = source_fingerprint(spec.data.source, src)
    return None if source is None else f"{source}:{etl_settings(spec)}"


def etl_settings(spec: JobSpec) -> str:
    """What else decides a build's rows: the `data` settings but the reader's pin, the ETL's code
    (the `spark` package and the lake layer) and the versions of the engines and Delta writer."""
    from importlib.metadata import PackageNotFoundError, version
    settings = spec.data.model_dump(mode="json", exclude={"pinned_versions"})
    root = Path(__file__).resolve().parents[1]
    code = files_fingerprint([str(p) for p in sorted((root / "spark").glob("*.py"))] + [str(root / "jobs" / "lake.py")],
                             str(root))
    libraries = {}
    for name in ("pyspark", "pysail", "deltalake", "pyarrow"):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            libraries[name] = None
    doc = {"data": settings, "code": code, "libraries": libraries}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def ingest_inputs(spec: JobSpec, inputs: str | None, ingested: dict[str, str], day: str,
                  fingerprint: str) -> str | None:
    """The inputs a publication after ingesting `day` was built from: the base build's source with
    this run's settings — or unknown (None: the next full build rebuilds) when the day was delivered
    before with other files (MERGEs add and update rows, never remove them, so the tables may hold
    rows a full build would not) or lands before a day already ingested (the order decides which
    value of a key wins). `ingested`: the days the published set holds (`ingested_days`)."""
    if inputs is None or ingested.get(day, fingerprint) != fingerprint or any(d > day for d in ingested):
        return None
    return f"{inputs.split(':')[0]}:{etl_settings(spec)}"


def built_from(spec: JobSpec, inputs: str | None, days: dict[str, str]) -> EtlSummary | None:
    """The published build's summary, marked `unchanged`, when it was built from `inputs` and these
    landed days and every table is still at its published version; else None (build)."""
    publication, lake = current_publication(spec), Lake.of(spec)
    if inputs is None or publication is None or publication.inputs != inputs or ingested_days(spec) != days:
        return None
    if any(lake.version(t) != v for t, v in publication.versions.items()):
        return None
    summary = read_summary(lake)
    if summary is None or summary.accounting is None or summary.versions != publication.versions:
        return None
    return replace(summary, unchanged=True, repairs=[], step_seconds={}, published=publication.number)


def check_landing(spec: JobSpec) -> None:
    """A configured landing folder must exist (a typo would otherwise ingest nothing, silently)."""
    landing = spec.data.landing
    if landing is not None and not os.path.isdir(landing.path):
        raise SourceError(f"data.landing.path {landing.path}: no such folder")


def _account(engine: Engine, lake: Lake, tagged: DataFrame, v_raw: int, v_q: int, v_silver: int) -> Accounting:
    """Where every raw row went. Raw rows and silver rows come from the written tables, quarantined
    rows from the quarantine table, valid rows from the typed bronze rows: `accounted` holds when
    raw = valid + quarantined, i.e. raw = silver + quarantined + duplicates removed."""
    raw_rows = lake.count("interactions_raw", v_raw)
    reasons: dict[str, dict[str, int]] = {"interaction": {}, "item": {}}
    for r in read_lake(engine, lake, "quarantine", v_q).groupBy("kind", "reason").count().collect():
        reasons[r["kind"]][r["reason"]] = int(r["count"])
    quarantined = sum(reasons["interaction"].values())
    valid_rows = typed_interactions(tagged).count()
    silver_rows = lake.count("interactions", v_silver)
    return Accounting(raw_rows, quarantined, dict(sorted(reasons["interaction"].items())), valid_rows - silver_rows,
                      silver_rows, raw_rows == valid_rows + quarantined, dict(sorted(reasons["item"].items())),
                      conflicting_keys(typed_interactions(tagged)))


def conflicting_keys(typed: DataFrame) -> int:
    """Natural keys that arrive with more than one distinct value."""
    return typed.groupBy(*NATURAL_KEY).agg(F.countDistinct("value").alias("n")).filter(F.col("n") > 1).count()


def account_day(tagged: DataFrame, items_tagged: DataFrame | None = None) -> Accounting:
    """Where every row of a landed day went, from its tagged rows (before the MERGEs)."""
    raw_rows = tagged.count()
    reasons = {r["reason"]: int(r["count"]) for r in tagged.filter(F.col("reason").isNotNull())
               .groupBy("reason").count().collect()}
    item_reasons = {} if items_tagged is None else \
        {r["reason"]: int(r["count"]) for r in items_tagged.filter(F.col("reason").isNotNull())
         .groupBy("reason").count().collect()}
    typed = typed_interactions(tagged)
    valid_rows, kept = typed.count(), deduplicate(typed).count()
    quarantined = sum(reasons.values())
    return Accounting(raw_rows, quarantined, dict(sorted(reasons.items())), valid_rows - kept, kept,
                      raw_rows == valid_rows + quarantined, dict(sorted(item_reasons.items())), conflicting_keys(typed))


# ----------------------------------------------------------------------------- incremental

@rolled_back_on_failure
def ingest_day(spec: JobSpec, engine: Engine, day: str, steps: Steps = QUIET) -> IngestResult:
    """MERGE one landed day into bronze, quarantine and silver (interactions, and items when the day
    brings metadata) on their keys, then rebuild gold and publish it when its checks pass.

    Re-running the same day inserts nothing and commits nothing: the table versions stay put. A day
    whose gold fails its checks publishes nothing and its commits are rolled back."""
    lake, d = Lake.of(spec), spec.data
    if d.landing is None:
        raise ValueError(f"spec {spec.name}: data.landing is not configured; nothing to ingest for {day}")
    check_landing(spec)
    publication = current_publication(spec)
    if lake.version("interactions") is None or publication is None:
        raise ValueError(f"spec {spec.name}: no published silver table at {lake.path('interactions')}; "
                         "run `llmrec etl` first")
    check_silver_schema(lake, engine)
    src = read_landing_day(engine, d.landing, day, d.max_line_bytes)  # headers and columns checked before writing
    fingerprint = {day: day_fingerprint(landing_days(d.landing)[day], d.landing.path)}
    ingested = ingested_days(spec)
    inputs = ingest_inputs(spec, publication.inputs, ingested, day, fingerprint[day])
    result = merge_day(spec, engine, day, steps, src)
    # anything committed must be published (what is not is rolled back by the next writer): gold is
    # rebuilt whenever the day changed a table, and only then
    changed = [r for r in (result.bronze, result.quarantine, result.silver, result.items) if r is not None and r.committed]
    if not changed and ingested.get(day) != fingerprint[day]:
        # files that change nothing are still this day's delivery: recorded, so they are not asked for again
        publish(spec, publication.versions, f"ingest {day} (no change)", publication.lineage, fingerprint, inputs)
    if changed or "sequences" not in publication.versions:
        result.gold = g = build_gold(spec, engine, steps, publish_as=f"ingest {day}", days=fingerprint,
                                     inputs=inputs)
        previous = read_summary(lake)
        write_summary(lake, replace(previous, gold=g.gold, versions=g.versions, checks=g.checks,
                                    published=g.published, last_ingest=result, lineage=g.lineage)
                      if previous else EtlSummary(spec.name, d.name, engine.name, lake.root, d.source.kind, today_utc(),
                                                  None, g.gold, g.versions, g.checks, g.published, last_ingest=result,
                                                  lineage=g.lineage))
        if g.published is None:
            rollback_unpublished(spec, list(ETL_TABLES))
    else:
        result.gold_skipped = f"silver unchanged at version {result.silver.version}"
    return result


def check_silver_schema(lake: Lake, engine: Engine) -> None:
    """A lake built before silver recorded when rows landed can't take a MERGE of the new schema."""
    columns = set(read_lake(engine, lake, "interactions").columns) | set(read_lake(engine, lake, "items").columns)
    if not {"landed_on", "active"} <= columns:
        raise ValueError(f"dataset at {lake.root}: its silver tables predate landing days and the item catalogue "
                         "(no landed_on / active columns); run `llmrec etl` once to rebuild them (ids are kept)")


def mapped_item_fields(files) -> list[str]:
    """The item fields a landed items file carries (its column mapping): only those are compared and
    updated — a feed that maps `item_id` and `active` alone deactivates items without erasing their text."""
    c = files.columns
    mapped = {"title": c.title, "categories": c.categories, "description": c.description, "attributes": c.attributes,
              "active": c.active}
    return [f for f in ITEM_FIELDS if mapped[f]]


def merge_day(spec: JobSpec, engine: Engine, day: str, steps: Steps, src: RawSource) -> IngestResult:
    """One landed day MERGEd into bronze, quarantine and silver (gold is the caller's)."""
    lake = Lake.of(spec)
    opts = lake.storage_options
    with steps.step(f"landing {day}: read"):
        bronze = engine.materialize(_bronze_columns(add_record_ids(src.interactions, today_utc())))
        items_tagged = None if src.items is None else \
            engine.materialize(tag_items(add_record_ids(src.items, today_utc()), src.item_id_pattern))
    with steps.step(f"landing {day}: bronze merge"):
        r_raw = merge_table(engine, bronze, lake.path("interactions_raw"), ["record_id"], storage_options=opts)
    tagged = tag(src, spec, bronze)
    with steps.step(f"landing {day}: quarantine merge"):
        q = quarantine_rows(tagged, "interaction")
        if items_tagged is not None:
            q = q.unionByName(quarantine_rows(items_tagged, "item"))
        r_q = merge_table(engine, q, lake.path("quarantine"), ["record_id"], storage_options=opts)
    with steps.step(f"landing {day}: silver merge"):
        r_s = merge_table(engine, deduplicate(typed_interactions(tagged, day)), lake.path("interactions"), NATURAL_KEY,
                          compare=["value"], storage_options=opts)
    r_items = None
    if items_tagged is not None:
        with steps.step(f"landing {day}: items merge"):
            r_items = merge_table(engine, silver_items(items_tagged, day), lake.path("items"), ["item_id"],
                                  compare=mapped_item_fields(spec.data.landing.items), storage_options=opts)
    return IngestResult(day, bronze.count(), r_raw, r_q, r_s, accounting=account_day(tagged, items_tagged),
                        items=r_items)


# ----------------------------------------------------------------------------- gold

def split_cuts(df: DataFrame, spec: JobSpec) -> tuple[int, int]:
    """Temporal cut times: explicit dates, or shares of the interaction time range."""
    s = spec.data.split
    lo, hi = df.agg(F.min("ts"), F.max("ts")).collect()[0]

    def date_ts(text: str) -> int:
        return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())

    valid = date_ts(s.valid_start) if s.valid_start else int(lo + (1 - s.valid_fraction - s.test_fraction) * (hi - lo))
    test = date_ts(s.test_start) if s.test_start else int(lo + (1 - s.test_fraction) * (hi - lo))
    if not valid < test:
        raise ValueError(f"data.split: valid cut {valid} must come before test cut {test}")
    return valid, test


def with_catalogue_columns(items: DataFrame, silver: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Silver tables as this code reads them: a lake built before landing days and the catalogue gets
    `landed_on` NULL (the base) and every item active."""
    if "landed_on" not in silver.columns:
        silver = silver.withColumn("landed_on", F.lit(None).cast("date"))
    if "landed_on" not in items.columns:
        items = items.withColumn("landed_on", F.lit(None).cast("date"))
    if "active" not in items.columns:
        items = items.withColumn("active", F.lit(True))
    return items, silver


@locked
def build_gold(spec: JobSpec, engine: Engine, steps: Steps = QUIET, publish_as: str | None = None,
               renumber: bool = False, days: dict[str, str] | None = None, inputs: str | None = None) -> GoldBuild:
    """Gold tables from the silver this run wrote: the lineage's indexes (ids of the published index
    kept, new users and items appended: `extend_index`), filters, k-core, item text, sequences,
    splits, then the data-quality checks; with `publish_as`, the version set is published (readers
    switch to it) only when every check passed. `renumber` starts a new id lineage."""
    lake, d = Lake.of(spec), spec.data
    v_silver, v_items = lake.version("interactions"), lake.version("items")
    publication = None if renumber else current_publication(spec)
    with steps.step("gold: ids"):
        items, silver = with_catalogue_columns(read_lake(engine, lake, "items", v_items),
                                               read_lake(engine, lake, "interactions", v_silver))
        prev_items = prev_users = None
        if publication is not None and {"item_index", "user_index"} <= set(publication.versions):
            prev_items = read_lake(engine, lake, "item_index", publication.versions["item_index"]).select("item_idx", "item_id")
            prev_users = read_lake(engine, lake, "user_index", publication.versions["user_index"]).select("user_idx", "user_id")
        listed = items.select("item_id", "landed_on", F.lit(None).cast("bigint").alias("ts"))
        catalogue = engine.materialize(silver.select("item_id", "landed_on", "ts").unionByName(listed))
        item_ids = engine.materialize(extend_index(prev_items, first_appearance(catalogue, "item_id"),
                                                   "item_id", "item_idx"))
        user_ids = engine.materialize(extend_index(prev_users, first_appearance(silver, "user_id"),
                                                   "user_id", "user_idx"))
    with steps.step("gold: filters + k-core"):
        df = filter_min_value(collapse_repeats(silver, d.dedup), d.min_value)
        if d.dedup != "natural_key":  # the window of collapse_repeats is worth computing once
            df = engine.materialize(df)
        n_filtered = df.count()
        if n_filtered == 0:
            raise EmptyData(f"no interaction is left after data.min_value={d.min_value} and data.dedup={d.dedup}")
        df, rounds = kcore(df, d.kcore.user, d.kcore.item, d.kcore.max_rounds, engine.materialize)
    with steps.step("gold/user_index + item_index"):
        user_table = user_ids.join(interaction_counts(df, "user_id"), "user_id", "left").select(
            "user_idx", "user_id", F.coalesce(F.col("n_interactions"), F.lit(0)).cast("bigint").alias("n_interactions"))
        v_users = write_lake(engine, user_table, lake, "user_index")
        v_index = write_lake(engine, build_item_index(item_ids, items, catalogue, interaction_counts(df, "item_id"),
                                                      d.item_text.template, d.item_text.max_chars), lake, "item_index")
    users = read_lake(engine, lake, "user_index", v_users)
    item_index = read_lake(engine, lake, "item_index", v_index)
    with steps.step("gold/sequences"):
        seqs = build_sequences(index_interactions(df, users, item_index))
        if d.split.kind == "leave_one_out":
            # materialized once: the three split selects would otherwise each redo the groupBy
            splits, cuts = leave_one_out(engine.materialize(seqs)), None
        else:
            cuts = split_cuts(df, spec)
            splits = temporal_split(seqs, *cuts)
        v_seq = write_lake(engine, splits, lake, "sequences")
    sequences = read_lake(engine, lake, "sequences", v_seq)
    with steps.step("quality checks"):
        figures = item_index.agg(F.count(F.lit(1)).alias("rows"), F.sum(F.col("active").cast("int")).alias("active"),
                                 F.sum((F.col("n_interactions") > 0).cast("int")).alias("kcore"),
                                 F.sum((F.col("active") & F.col("title").isNull() & F.col("description").isNull()
                                        & F.col("categories").isNull()).cast("int")).alias("bare")).collect()[0]
        n_users = users.count()
        n_inter = df.count()
        per_split = {r["split"]: int(r["count"]) for r in sequences.groupBy("split").count().collect()}
        checks = [
            quality.check_no_null_ids(silver),
            quality.check_kcore(quality.gold_interactions(sequences) if d.split.kind == "leave_one_out"
                                else index_interactions(df, users, item_index), d.kcore.user, d.kcore.item),
            quality.check_no_leakage(sequences),
            quality.check_sequence_items_indexed(sequences, item_index),
            quality.check_index_stable(prev_items, item_index, "item_id", "item_idx", prev_users, users),
        ]
        q = read_lake(engine, lake, "quarantine").filter(F.col("kind") == "interaction").count()
        raw = lake.count("interactions_raw")
        checks.append(quality.check_quarantine_share(raw, q, d.max_quarantine_share))
    versions = {t: lake.version(t) for t in ETL_TABLES}
    new_items = int(figures["rows"]) - (prev_items.count() if prev_items is not None else 0)
    new_users = n_users - (prev_users.count() if prev_users is not None else 0)
    build = GoldBuild(GoldStats(n_filtered, n_inter, n_users, int(figures["rows"]), rounds,
                                dict(sorted(per_split.items())), list(cuts) if cuts else None,
                                int(figures["active"] or 0), int(figures["kcore"] or 0), int(figures["bare"] or 0),
                                new_items, new_users),
                      {k: v for k, v in versions.items() if v is not None}, checks,
                      lineage=None if renumber or publication is None else publication.lineage)
    if publish_as and build.checks_passed:
        with steps.step("publish"):
            lineage = build.lineage or new_lineage()
            build.published = publish(spec, build.versions, publish_as + (" (renumbered)" if renumber else ""), lineage,
                                      days, inputs)
            build.lineage = lineage
    return build


def new_lineage() -> str:
    import uuid
    return uuid.uuid4().hex[:12]


# ----------------------------------------------------------------------------- summary

def write_summary(lake: Lake, summary: EtlSummary) -> None:
    if "://" in lake.summary_path:
        return
    text = json.dumps(summary.to_dict(), indent=2, default=str)
    write_atomic(lake.summary_path, lambda tmp: Path(tmp).write_text(text))  # never follows a planted link


def read_summary(lake: Lake) -> EtlSummary | None:
    try:
        with open(lake.summary_path) as fh:
            return EtlSummary.from_dict(json.load(fh))
    except FileNotFoundError:
        return None
