"""The MovieLens-1M preparation done with plain pandas, as the HLLM and generative-recommenders
preprocessing scripts do it (read with pandas, group by user, sort by time, Python lists), covering
the same logical steps as `llmrec etl`: validate + quarantine, de-duplicate, iterative 5-core, ids by
first appearance, item text, time-ordered sequences, leave-one-out splits, Parquet outputs.

    python bench/pandas_etl.py --out /tmp/pandas-ml1m
"""
from __future__ import annotations

import argparse
import json
import os
import time

import pandas as pd

from spark.sources import packaged_movielens_dir  # locates the wheel's files, no Spark


def run(out: str, k: int = 5) -> dict:
    t0 = time.perf_counter()
    folder = packaged_movielens_dir("ml-1m")
    raw = pd.read_csv(folder / "ml-1m.inter", sep="\t", dtype=str, header=0, keep_default_na=False,
                      names=["user_id", "item_id", "rating", "timestamp"])
    ts = pd.to_numeric(raw["timestamp"], errors="coerce")
    value = pd.to_numeric(raw["rating"], errors="coerce")
    reason = pd.Series(None, index=raw.index, dtype=object)
    reason[value.isna() | ~value.between(1, 5)] = "value"
    reason[ts.isna() | (ts < 0)] = "timestamp"
    reason[raw["item_id"] == ""] = "missing_item_id"
    reason[raw["user_id"] == ""] = "missing_user_id"
    quarantine = raw[reason.notna()].assign(reason=reason[reason.notna()])
    good = raw[reason.isna()].assign(ts=ts[reason.isna()].astype("int64"), value=value[reason.isna()])
    silver = good.groupby(["user_id", "item_id", "ts"], as_index=False)["value"].max()
    df = silver
    while True:
        before = len(df)
        df = df[df["user_id"].map(df["user_id"].value_counts()) >= k]
        df = df[df["item_id"].map(df["item_id"].value_counts()) >= k]
        if len(df) == before:
            break

    def ids(key: str, name: str) -> pd.DataFrame:
        first = df.groupby(key, as_index=False).agg(first_ts=("ts", "min"), n_interactions=("ts", "size"))
        first = first.sort_values(["first_ts", key]).reset_index(drop=True)
        first[name] = first.index + 1
        return first[[name, key, "n_interactions"]]

    users, items = ids("user_id", "user_idx"), ids("item_id", "item_idx")
    meta = pd.read_csv(folder / "ml-1m.item", sep="\t", dtype=str, header=0,
                       names=["item_id", "title", "year", "genre"]).fillna("")
    item_index = items.merge(meta, on="item_id", how="left")
    item_index["text"] = [f"Title: {t}. Year: {y.removesuffix('.0')}. Genres: {', '.join(g.split())}."
                          for t, y, g in zip(item_index["title"], item_index["year"], item_index["genre"])]
    seq = (df.merge(users[["user_id", "user_idx"]], on="user_id").merge(items[["item_id", "item_idx"]], on="item_id")
           .sort_values(["user_idx", "ts", "item_idx"]))
    grouped = seq.groupby("user_idx").agg(item_ids=("item_idx", list), timestamps=("ts", list)).reset_index()
    rows = []
    for u, it, tss in zip(grouped["user_idx"], grouped["item_ids"], grouped["timestamps"]):
        if len(it) >= 3:
            rows += [(u, "train", it[:-2], tss[:-2], None, None), (u, "valid", it[:-2], tss[:-2], it[-2], tss[-2]),
                     (u, "test", it[:-1], tss[:-1], it[-1], tss[-1])]
        else:
            rows.append((u, "train", it, tss, None, None))
    splits = pd.DataFrame(rows, columns=["user_idx", "split", "item_ids", "timestamps", "target", "target_ts"])
    os.makedirs(out, exist_ok=True)
    for name, frame in [("quarantine", quarantine), ("interactions", silver), ("user_index", users),
                        ("item_index", item_index), ("sequences", splits)]:
        frame.to_parquet(os.path.join(out, f"{name}.parquet"), index=False)
    return {"seconds_in_process": round(time.perf_counter() - t0, 3), "raw_rows": len(raw),
            "interactions": len(df), "users": len(users), "items": len(items)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/llmrec-pandas-ml1m")
    print(json.dumps(run(ap.parse_args().out)))
