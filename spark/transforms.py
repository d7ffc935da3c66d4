"""Transforms: pure DataFrame -> DataFrame steps from bronze rows to gold sequences and splits.

Every function runs unchanged on Sail (Spark Connect) and on JVM Spark, and is deterministic: the
same input gives the same rows and the same ids on either engine and on every re-run.
"""
from __future__ import annotations

import re
from typing import Callable

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

TS_MIN, TS_MAX = 0, 4102444800  # 1970-01-01 .. 2100-01-01, epoch seconds: the widest range
OVERSIZE = "\x00llmrec:oversize_line:"  # spark.sources' stand-in for a line over data.max_line_bytes


def parse_epoch_seconds(ts: Column, ts_format: str) -> Column:
    """Timestamp strings to epoch seconds (BIGINT); NULL when unparsable. Never raises (ANSI-safe)."""
    if ts_format in ("epoch_s", "epoch_ms"):
        as_double = ts.try_cast("double")
        seconds = as_double / 1000.0 if ts_format == "epoch_ms" else as_double
        finite = seconds.between(-1e13, 1e13)  # also rejects NaN and +-Infinity
        return F.when(finite, F.floor(seconds)).cast("bigint")
    return F.unix_timestamp(F.try_to_timestamp(ts, F.lit(ts_format)))


def epoch_to_date(seconds: Column) -> Column:
    """UTC calendar date of epoch seconds, independent of the session time zone."""
    return F.date_add(F.lit("1970-01-01").cast("date"), F.floor(seconds / 86400).cast("int"))


def line_checks() -> list[tuple[str, Column]]:
    """Reasons that concern the line itself, before any field is looked at."""
    return [
        ("oversize_line", F.col("raw").startswith(OVERSIZE)),
        ("invalid_encoding", F.col("raw").contains("\ufffd")),  # bytes the declared encoding can't decode
        ("malformed_line", F.col("parse_error").isNotNull()),
    ]


def tag_interactions(raw: DataFrame, ts_format: str, value_min: float | None = None,
                     value_max: float | None = None, has_value: bool = True,
                     ts_range: tuple[int, int] = (TS_MIN, TS_MAX), user_id_pattern: str | None = None,
                     item_id_pattern: str | None = None) -> DataFrame:
    """Add typed `ts_s` (epoch seconds), `value_d` and `reason` (NULL = valid) to bronze rows.
    `ts_range`: plausible times (epoch seconds, inclusive); `*_id_pattern`: the source's id formats."""
    ts_s = parse_epoch_seconds(F.col("ts"), ts_format)
    value_d = F.col("value").try_cast("double") if has_value else F.lit(1.0)
    checks: list[tuple[str, Column]] = [
        *line_checks(),
        ("missing_user_id", F.col("user_id").isNull()),
        ("missing_item_id", F.col("item_id").isNull()),
    ]
    if user_id_pattern is not None:
        checks.append(("invalid_user_id", ~F.col("user_id").rlike(user_id_pattern)))
    if item_id_pattern is not None:
        checks.append(("invalid_item_id", ~F.col("item_id").rlike(item_id_pattern)))
    checks += [
        ("missing_timestamp", F.col("ts").isNull()),
        ("unparsable_timestamp", F.col("ts_s").isNull()),
        ("timestamp_out_of_range", ~F.col("ts_s").between(*ts_range)),
    ]
    if has_value:
        checks += [
            ("missing_value", F.col("value").isNull()),
            ("unparsable_value", F.col("value_d").isNull()),
            # NaN and +-Infinity parse as doubles but are no rating: quarantined whatever data.value_range says
            ("non_finite_value", F.isnan(F.col("value_d")) | ~F.col("value_d").between(-1.7976931348623157e308,
                                                                                      1.7976931348623157e308)),
        ]
    out_of_range = F.lit(False)
    if value_min is not None:
        out_of_range = out_of_range | (F.col("value_d") < F.lit(value_min))
    if value_max is not None:
        out_of_range = out_of_range | (F.col("value_d") > F.lit(value_max))
    checks.append(("value_out_of_range", out_of_range))
    reason = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        reason = F.when(failed, F.lit(name)).otherwise(reason)
    return raw.withColumn("ts_s", ts_s).withColumn("value_d", value_d).withColumn("reason", reason)


def typed_interactions(tagged: DataFrame, landed_on: str | None = None) -> DataFrame:
    """Valid tagged rows in the silver schema (user_id, item_id, ts, value, event_date, landed_on):
    `landed_on` is the landing day the rows came with (NULL: the base source)."""
    return tagged.filter(F.col("reason").isNull()).select(
        "user_id", "item_id", F.col("ts_s").alias("ts"), F.col("value_d").alias("value"),
        epoch_to_date(F.col("ts_s")).alias("event_date"), F.lit(landed_on).cast("date").alias("landed_on"))


def quarantine_rows(tagged: DataFrame, kind: str) -> DataFrame:
    """Rejected rows, verbatim, with their reason, in the quarantine schema."""
    return tagged.filter(F.col("reason").isNotNull()).select(
        "record_id", F.lit(kind).alias("kind"), "reason", "raw", "parse_error", "source_file", "ingest_date")


def deduplicate(df: DataFrame) -> DataFrame:
    """One row per natural key (user_id, item_id, ts); conflicting values resolve to the largest."""
    return df.groupBy("user_id", "item_id", "ts").agg(F.max("value").alias("value"),
                                                      F.min("event_date").alias("event_date"),
                                                      F.min("landed_on").alias("landed_on"))


def collapse_repeats(df: DataFrame, mode: str) -> DataFrame:
    """`user_item_first`/`user_item_last`: keep one interaction per (user, item); `natural_key`: as is."""
    if mode == "natural_key":
        return df
    order = [F.col("ts").asc(), F.col("value").desc()] if mode == "user_item_first" else \
        [F.col("ts").desc(), F.col("value").desc()]
    w = Window.partitionBy("user_id", "item_id").orderBy(*order)
    return df.withColumn("_rn", F.row_number().over(w)).filter(F.col("_rn") == 1).drop("_rn")


def filter_min_value(df: DataFrame, min_value: float | None) -> DataFrame:
    return df if min_value is None else df.filter(F.col("value") >= F.lit(min_value))


def kcore_round(df: DataFrame, user_k: int, item_k: int) -> DataFrame:
    """One k-core pass: drop users with < user_k interactions, then items with < item_k."""
    if user_k > 1:
        users = df.groupBy("user_id").count().filter(F.col("count") >= user_k).select("user_id")
        df = df.join(users, "user_id", "left_semi")
    if item_k > 1:
        items = df.groupBy("item_id").count().filter(F.col("count") >= item_k).select("item_id")
        df = df.join(items, "item_id", "left_semi")
    return df


class KCoreNotConverged(ValueError):
    """The k-core filter still removed rows after `data.kcore.max_rounds` rounds (the message says how many)."""


class EmptyData(ValueError):
    """A step left no interactions: a bad filter or k-core setting for this data, named in the message."""


def min_interactions(df: DataFrame, key: str) -> int:
    """The fewest rows any value of `key` has (0 for an empty frame)."""
    return df.groupBy(key).count().agg(F.min("count")).collect()[0][0] or 0


def kcore_satisfied(min_user: int, min_item: int, user_k: int, item_k: int) -> bool:
    """The k-core rule: every user has >= user_k interactions and every item >= item_k (k <= 1: no bound)."""
    return (user_k <= 1 or min_user >= user_k) and (item_k <= 1 or min_item >= item_k)


def kcore_holds(df: DataFrame, user_k: int, item_k: int, user_col: str = "user_id", item_col: str = "item_id") -> bool:
    return kcore_satisfied(min_interactions(df, user_col), min_interactions(df, item_col), user_k, item_k)


def kcore(df: DataFrame, user_k: int, item_k: int, max_rounds: int = 100,
          materialize: Callable[[DataFrame], DataFrame] | None = None) -> tuple[DataFrame, list[dict]]:
    """Iterative k-core: filter rounds until both bounds hold. Returns the frame and, per round that
    ran, the rows left and removed (an empty list: the input already was a k-core).

    `materialize` cuts the lineage between rounds (engines without a working persist)."""
    rounds: list[dict] = []
    if user_k <= 1 and item_k <= 1:
        return df, rounds
    before = None
    for r in range(1, max_rounds + 1):
        if kcore_holds(df, user_k, item_k):
            return df, rounds
        before = df.count() if before is None else before
        df = kcore_round(df, user_k, item_k)
        if materialize is not None:
            df = materialize(df)
        after = df.count()
        rounds.append({"round": r, "rows": after, "removed": before - after})
        if after == 0:
            raise EmptyData(f"data.kcore (user >= {user_k}, item >= {item_k}) removes every interaction "
                            f"({before} before round {r}): lower the bounds for this data")
        before = after
    if kcore_holds(df, user_k, item_k):
        return df, rounds
    raise KCoreNotConverged(f"data.kcore (user >= {user_k}, item >= {item_k}) still removes rows after {max_rounds} "
                            "rounds: raise data.kcore.max_rounds or lower the bounds")


BASE_LANDING = "0001-01-01"  # `first_landed` of what came with the base source


def first_appearance(df: DataFrame, key: str) -> DataFrame:
    """Per key of `df` (rows with `landed_on` and, for interactions, `ts`): the first landing it came
    with (`first_landed`; the base source, NULL `landed_on`, counts as BASE_LANDING) and its earliest
    time (`first_ts`, NULL for a key known only from metadata)."""
    ts = F.col("ts") if "ts" in df.columns else F.lit(None).cast("bigint")
    landed = F.coalesce(F.col("landed_on"), F.lit(BASE_LANDING).cast("date"))  # the base comes before every day
    return df.groupBy(key).agg(F.min(landed).alias("first_landed"), F.min(ts).alias("first_ts"))


def extend_index(previous: DataFrame | None, keys: DataFrame, key: str, idx: str) -> DataFrame:
    """Stable dense ids (0 is padding): every key of `previous` keeps its id; keys it lacks take the
    next free ids in order of first landing (the base source first, then landed days in date order),
    then earliest time (keys known only from metadata last), then key. The order depends only on
    the data and on when it landed, so a rebuild of the base plus days 1..n gives the ids the daily
    ingests gave, one day at a time. `keys`: (key, first_landed, first_ts), e.g. `first_appearance`."""
    if previous is None:
        known, offset = keys.limit(0).select(F.lit(0).cast("int").alias(idx), key), 0
    else:
        known = previous.select(F.col(idx).cast("int").alias(idx), key)
        offset = known.agg(F.max(idx)).collect()[0][0] or 0
    new = keys.join(known.select(key), key, "left_anti")
    w = Window.orderBy(F.col("first_landed"), F.col("first_ts").asc_nulls_last(), F.col(key))
    fresh = new.select((F.row_number().over(w) + F.lit(offset)).cast("int").alias(idx), key)
    return known.unionByName(fresh)


def interaction_counts(df: DataFrame, key: str) -> DataFrame:
    """(key, n_interactions) over the frame: what the models train on, after filters and k-core."""
    return df.groupBy(key).agg(F.count(F.lit(1)).alias("n_interactions"))


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ITEM_FIELDS = {"item_id", "title", "categories", "description"}


def render_text(template: str, max_chars: int) -> Column:
    """Item text from a template like "Title: {title}. Genres: {categories}." over item columns;
    other {names} come from the item's `attributes` JSON. Missing fields render empty."""
    parts: list[Column] = []
    pos = 0
    for m in _FIELD.finditer(template):
        if m.start() > pos:
            parts.append(F.lit(template[pos:m.start()]))
        name = m.group(1)
        if name == "categories":
            value = F.concat_ws(", ", F.col("categories"))
        elif name == "title":
            value = F.coalesce(F.col("title"), F.col("item_id"))
        elif name in _ITEM_FIELDS:
            value = F.col(name)
        else:
            value = F.get_json_object(F.col("attributes"), f"$.{name}")
        parts.append(F.coalesce(value.cast("string"), F.lit("")))
        pos = m.end()
    if pos < len(template):
        parts.append(F.lit(template[pos:]))
    text = F.trim(F.regexp_replace(F.concat(*parts) if parts else F.lit(""), r"\s+", " "))
    return F.substring(text, 1, max_chars)


def build_item_index(ids: DataFrame, items: DataFrame, catalogue: DataFrame, counts: DataFrame, template: str,
                     max_chars: int) -> DataFrame:
    """`item_index`: every id of the lineage joined to its item metadata, with the rendered item text;
    `active` when the item is in today's catalogue (`catalogue`: its item ids) and its metadata does
    not remove it; `n_interactions` in the gold interactions (0: a cold or unrated item, a candidate
    for a model that scores text, not a training item)."""
    meta = items.select("item_id", "title", "categories", "description", "attributes",
                        F.col("active").alias("_listed"))
    present = catalogue.select("item_id").distinct().withColumn("_present", F.lit(True))
    joined = ids.join(meta, "item_id", "left").join(present, "item_id", "left").join(counts, "item_id", "left")
    active = F.coalesce(F.col("_present"), F.lit(False)) & F.coalesce(F.col("_listed"), F.lit(True))
    return joined.select("item_idx", "item_id", "title", "categories", "description", "attributes",
                         F.coalesce(F.col("n_interactions"), F.lit(0)).cast("bigint").alias("n_interactions"),
                         active.alias("active"), render_text(template, max_chars).alias("text"))


def index_interactions(df: DataFrame, user_ids: DataFrame, item_ids: DataFrame) -> DataFrame:
    return (df.join(user_ids.select("user_id", "user_idx"), "user_id")
            .join(item_ids.select("item_id", "item_idx"), "item_id")
            .select("user_idx", "item_idx", "ts", "value"))


def build_sequences(indexed: DataFrame) -> DataFrame:
    """Per user the time-ordered item ids and timestamps (ties broken by item id), plus `events`,
    the same as (ts, item_idx) structs for splits that cut by time."""
    seq = F.sort_array(F.collect_list(F.struct(F.col("ts"), F.col("item_idx"))))
    return indexed.groupBy("user_idx").agg(seq.alias("events")).select(
        "user_idx",
        F.transform("events", lambda x: x["item_idx"]).alias("item_ids"),
        F.transform("events", lambda x: x["ts"]).alias("timestamps"),
        "events")


def leave_one_out(sequences: DataFrame) -> DataFrame:
    """Rows per user: train = all but the last two items; valid = history -> second-to-last;
    test = history -> last. Users with fewer than 3 items only get a train row."""
    n = F.size("item_ids")
    full = n >= 3

    def prefix(col: str, drop: int) -> Column:
        return F.slice(col, 1, n - drop)

    train = sequences.select(
        "user_idx", F.lit("train").alias("split"),
        F.when(full, prefix("item_ids", 2)).otherwise(F.col("item_ids")).alias("item_ids"),
        F.when(full, prefix("timestamps", 2)).otherwise(F.col("timestamps")).alias("timestamps"),
        F.lit(None).cast("int").alias("target"), F.lit(None).cast("bigint").alias("target_ts"))
    longer = sequences.filter(full)
    valid = longer.select(
        "user_idx", F.lit("valid").alias("split"), prefix("item_ids", 2).alias("item_ids"),
        prefix("timestamps", 2).alias("timestamps"), F.element_at("item_ids", -2).alias("target"),
        F.element_at("timestamps", -2).alias("target_ts"))
    test = longer.select(
        "user_idx", F.lit("test").alias("split"), prefix("item_ids", 1).alias("item_ids"),
        prefix("timestamps", 1).alias("timestamps"), F.element_at("item_ids", -1).alias("target"),
        F.element_at("timestamps", -1).alias("target_ts"))
    return train.unionByName(valid).unionByName(test)


def temporal_split(sequences: DataFrame, valid_start: int, test_start: int) -> DataFrame:
    """Global temporal split at two cut times (epoch seconds): train = interactions before
    `valid_start`; valid = a user's first interaction in [valid_start, test_start) with everything
    before it as history; test = the first interaction at or after `test_start`, likewise.

    Sail 0.7 can't push a filter holding a higher-order function (`exists`, `filter`) into a
    Parquet scan ("No field named ?table?.events"), so give this function sequences computed in the
    same plan, not read back from files, when running on Sail."""
    def before(t: int):
        return lambda x: x["ts"] < F.lit(t)

    def within(lo: int, hi: int | None):
        return (lambda x: x["ts"] >= F.lit(lo)) if hi is None else \
            (lambda x: (x["ts"] >= F.lit(lo)) & (x["ts"] < F.lit(hi)))

    def rows(split: str, cut: int, window=None) -> DataFrame:
        keep = F.exists("events", before(cut))
        if window is not None:
            keep = keep & F.exists("events", window)
        hist = F.filter("events", before(cut))
        target = F.try_element_at(F.filter("events", window), F.lit(1)) if window is not None else None
        return sequences.filter(keep).select(
            "user_idx", F.lit(split).alias("split"),
            F.transform(hist, lambda x: x["item_idx"]).alias("item_ids"),
            F.transform(hist, lambda x: x["ts"]).alias("timestamps"),
            (target["item_idx"] if target is not None else F.lit(None)).cast("int").alias("target"),
            (target["ts"] if target is not None else F.lit(None)).cast("bigint").alias("target_ts"))

    train = rows("train", valid_start)
    valid = rows("valid", valid_start, within(valid_start, test_start))
    # test history: everything before the test target, including the validation period
    test = rows("test", test_start, within(test_start, None))
    return train.unionByName(valid).unionByName(test)
