"""Data-quality checks: plain functions over tables returning pass/fail plus the figures behind it."""
from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark.transforms import kcore_satisfied, min_interactions

# The table each check guards (the Dagster asset checks are declared from this).
CHECKS = {"no_null_ids": "interactions", "kcore_holds": "sequences", "no_train_test_leakage": "sequences",
          "sequence_items_indexed": "sequences", "ids_stable": "item_index", "quarantine_share": "quarantine"}


@dataclass
class CheckResult:
    name: str
    passed: bool
    description: str
    metrics: dict = field(default_factory=dict)


def check_no_null_ids(interactions: DataFrame, user_col: str = "user_id", item_col: str = "item_id") -> CheckResult:
    row = interactions.select(
        F.sum(F.col(user_col).isNull().cast("int")).alias("null_users"),
        F.sum(F.col(item_col).isNull().cast("int")).alias("null_items"),
        F.count(F.lit(1)).alias("rows")).collect()[0]
    nulls_u, nulls_i = int(row["null_users"] or 0), int(row["null_items"] or 0)
    return CheckResult("no_null_ids", nulls_u == 0 and nulls_i == 0, "no interaction has a null user or item id",
                       {"rows": int(row["rows"]), "null_user_ids": nulls_u, "null_item_ids": nulls_i})


def gold_interactions(sequences: DataFrame) -> DataFrame:
    """The full per-user interaction set behind the split rows: the test row's history plus its
    target where the user has one, else the train row."""
    test = sequences.filter(F.col("split") == "test").select(
        "user_idx", F.concat("item_ids", F.array("target")).alias("items"))
    train_only = sequences.filter(F.col("split") == "train").join(test.select("user_idx"), "user_idx", "left_anti") \
        .select("user_idx", F.col("item_ids").alias("items"))
    return test.unionByName(train_only).select("user_idx", F.explode("items").alias("item_idx"))


def check_kcore(pairs: DataFrame, user_k: int, item_k: int, user_col: str = "user_idx",
                item_col: str = "item_idx") -> CheckResult:
    """Every user has >= user_k interactions and every item >= item_k."""
    min_user, min_item = min_interactions(pairs, user_col), min_interactions(pairs, item_col)
    return CheckResult("kcore_holds", kcore_satisfied(min_user, min_item, user_k, item_k), f"users >= {user_k} and items >= {item_k} interactions",
                       {"min_user_interactions": int(min_user), "min_item_interactions": int(min_item),
                        "user_k": user_k, "item_k": item_k})


def check_no_leakage(sequences: DataFrame) -> CheckResult:
    """No valid/test target event (item, timestamp) appears in the same user's train history.
    `targets_seen_in_train` counts targets whose item also occurs earlier in train (a repeat
    consumption, legitimate where the data has repeats, and zero on de-duplicated data)."""
    train = sequences.filter(F.col("split") == "train").select(
        "user_idx", F.arrays_zip(F.col("item_ids").alias("i"), F.col("timestamps").alias("t")).alias("hist"))
    targets = sequences.filter(F.col("split").isin("valid", "test")).select("user_idx", "split", "target", "target_ts")
    joined = targets.join(train, "user_idx", "left")
    leaked = F.exists("hist", lambda x: (x["i"] == F.col("target")) & (x["t"] == F.col("target_ts")))
    repeat = F.exists("hist", lambda x: x["i"] == F.col("target"))
    row = joined.select(F.sum(F.coalesce(leaked, F.lit(False)).cast("int")).alias("leaked"),
                        F.sum(F.coalesce(repeat, F.lit(False)).cast("int")).alias("repeat"),
                        F.count(F.lit(1)).alias("targets")).collect()[0]
    n_leaked = int(row["leaked"] or 0)
    return CheckResult("no_train_test_leakage", n_leaked == 0,
                       "no valid/test target event appears in the user's train history",
                       {"targets": int(row["targets"]), "leaked_target_events": n_leaked,
                        "targets_seen_in_train": int(row["repeat"] or 0)})


def check_sequence_items_indexed(sequences: DataFrame, item_index: DataFrame) -> CheckResult:
    items = sequences.select(F.explode("item_ids").alias("item_idx")).unionByName(
        sequences.filter(F.col("target").isNotNull()).select(F.col("target").alias("item_idx"))).distinct()
    missing = items.join(item_index.select("item_idx"), "item_idx", "left_anti").count()
    return CheckResult("sequence_items_indexed", missing == 0, "every sequence item exists in item_index",
                       {"missing_items": int(missing)})


def check_quarantine_share(n_raw: int, n_quarantined: int, max_share: float) -> CheckResult:
    share = n_quarantined / n_raw if n_raw else 0.0
    return CheckResult("quarantine_share", share <= max_share, f"quarantined share of raw rows <= {max_share}",
                       {"raw_rows": n_raw, "quarantined_rows": n_quarantined, "share": round(share, 6),
                        "max_share": max_share})


def check_index_stable(prev_items: DataFrame | None, items: DataFrame, item_key: str, item_idx: str,
                       prev_users: DataFrame | None, users: DataFrame) -> CheckResult:
    """Every id of the published indexes still names the same item and user (ids are never
    renumbered within a lineage), and no id names two keys."""
    def moved(prev: DataFrame | None, now: DataFrame, key: str, idx: str) -> int:
        if prev is None:
            return 0
        return prev.select(idx, key).join(now.select(idx, key), [idx, key], "left_anti").count()

    def doubled(now: DataFrame, idx: str) -> int:
        return now.groupBy(idx).count().filter(F.col("count") > 1).count()

    m_items, m_users = moved(prev_items, items, item_key, item_idx), moved(prev_users, users, "user_id", "user_idx")
    d_items, d_users = doubled(items, item_idx), doubled(users, "user_idx")
    return CheckResult("ids_stable", m_items + m_users + d_items + d_users == 0,
                       "every published item and user id keeps its key; no id is given twice",
                       {"items_renumbered": m_items, "users_renumbered": m_users, "item_ids_doubled": d_items,
                        "user_ids_doubled": d_users})
