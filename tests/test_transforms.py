"""Transforms on hand-made frames with hand-computed answers, on both Sail and JVM Spark."""
import pytest
from pyspark.sql import functions as F

from spark.transforms import (build_sequences, deduplicate, extend_index, first_appearance, kcore, leave_one_out,
                              render_text, tag_interactions, temporal_split, typed_interactions)

RAW_SCHEMA = "user_id string, item_id string, ts string, value string, raw string, parse_error string, source_file string"


def pairs(engine, rows):
    return engine.session.createDataFrame([(u, i, t, 1.0) for u, i, t in rows], "user_id string, item_id string, ts long, value double")


def test_kcore_needs_several_rounds(engine):
    # u4 has one item -> D drops to 1 -> u3 drops to 1 -> C drops to 1 -> u2 drops to 1 -> B, A remain.
    rows = [("u1", "A", 1), ("u1", "B", 2), ("u2", "B", 3), ("u2", "C", 4), ("u3", "C", 5), ("u3", "D", 6),
            ("u4", "D", 7), ("u5", "A", 8), ("u5", "B", 9)]
    out, rounds = kcore(pairs(engine, rows), 2, 2, materialize=engine.materialize)
    assert sorted((r.user_id, r.item_id) for r in out.collect()) == [("u1", "A"), ("u1", "B"), ("u5", "A"), ("u5", "B")]
    assert rounds == [{"round": 1, "rows": 7, "removed": 2}, {"round": 2, "rows": 5, "removed": 2},
                      {"round": 3, "rows": 4, "removed": 1}]
    again, none = kcore(out, 2, 2)  # already a 2-core: no round runs
    assert none == [] and again.count() == 4


def test_kcore_off_and_not_converged(engine):
    df = pairs(engine, [("u1", "A", 1)])
    same, rounds = kcore(df, 0, 0)
    assert rounds == [] and same.count() == 1
    from spark.transforms import KCoreNotConverged
    chain = pairs(engine, [("u1", "A", 1), ("u1", "B", 2), ("u2", "B", 3), ("u2", "C", 4), ("u3", "C", 5)])
    with pytest.raises(KCoreNotConverged, match="after 1 rounds"):
        kcore(chain, 2, 2, max_rounds=1)


def test_deduplicate_natural_key(engine):
    df = engine.session.createDataFrame(
        [("u1", "i1", 100, 4.0), ("u1", "i1", 100, 4.0), ("u1", "i1", 100, 5.0), ("u1", "i1", 200, 3.0),
         ("u2", "i1", 100, 2.0)], "user_id string, item_id string, ts long, value double"
    ).withColumn("event_date", F.lit("2020-01-01").cast("date")).withColumn("landed_on", F.lit(None).cast("date"))
    out = sorted((r.user_id, r.item_id, r.ts, r.value) for r in deduplicate(df).collect())
    assert out == [("u1", "i1", 100, 5.0), ("u1", "i1", 200, 3.0), ("u2", "i1", 100, 2.0)]


def landed(engine, rows):
    """(item_id, ts or None, landed_on day or None) rows: interactions, or metadata when ts is None."""
    return engine.session.createDataFrame(rows, "item_id string, ts long, landed_on string") \
        .withColumn("landed_on", F.col("landed_on").cast("date"))


def ids_of(df) -> dict:
    return {r.item_id: r.item_idx for r in df.collect()}


def test_ids_are_stable_and_ordered_by_first_landing_then_time(engine):
    base = [("B", 5, None), ("A", 9, None), ("C", 5, None), ("B", 1, None), ("M", None, None)]
    ids = ids_of(extend_index(None, first_appearance(landed(engine, base), "item_id"), "item_id", "item_idx"))
    # base: B first seen at 1, then C at 5 and A at 9; M has metadata only: last; ties by id
    assert ids == {"B": 1, "C": 2, "A": 3, "M": 4}
    again = ids_of(extend_index(None, first_appearance(landed(engine, list(reversed(base))), "item_id"),
                                "item_id", "item_idx"))
    assert again == ids
    # a landed day with an event older than the base's (late data) still takes the next ids
    day = [("D", 3, "2026-01-02"), ("A", 10, "2026-01-02"), ("E", 2, "2026-01-02")]
    previous = engine.session.createDataFrame(list(ids.items()), "item_id string, item_idx int")
    grown = ids_of(extend_index(previous, first_appearance(landed(engine, day), "item_id"), "item_id", "item_idx"))
    assert grown == {**ids, "E": 5, "D": 6}
    # the same from scratch over base + day: the ids the daily extension gave
    fresh = ids_of(extend_index(None, first_appearance(landed(engine, base + day), "item_id"), "item_id", "item_idx"))
    assert fresh == grown
    # an item gone from the data keeps its id in the index (extension never drops or renumbers)
    later = ids_of(extend_index(previous, first_appearance(landed(engine, [("Z", 1, "2026-01-03")]), "item_id"),
                                "item_id", "item_idx"))
    assert later == {**ids, "Z": 5}


def _seq_rows(engine, seqs):
    df = engine.session.createDataFrame(
        [(u, i, t) for u, items in seqs.items() for i, t in items], "user_idx int, item_idx int, ts long")
    return build_sequences(df)


def test_leave_one_out_boundaries(engine):
    seqs = {1: [(10, 1)], 2: [(10, 1), (11, 2)], 3: [(12, 3), (10, 1), (11, 2)],
            4: [(10, 1), (11, 2), (12, 3), (13, 4), (14, 5)],
            5: [(21, 7), (20, 7), (22, 8)]}  # a tie at ts=7: ordered by item id
    out = {(r.user_idx, r.split): (r.item_ids, r.timestamps, r.target, r.target_ts)
           for r in leave_one_out(_seq_rows(engine, seqs)).collect()}
    assert out == {
        (1, "train"): ([10], [1], None, None),
        (2, "train"): ([10, 11], [1, 2], None, None),
        (3, "train"): ([10], [1], None, None),
        (3, "valid"): ([10], [1], 11, 2),
        (3, "test"): ([10, 11], [1, 2], 12, 3),
        (4, "train"): ([10, 11, 12], [1, 2, 3], None, None),
        (4, "valid"): ([10, 11, 12], [1, 2, 3], 13, 4),
        (4, "test"): ([10, 11, 12, 13], [1, 2, 3, 4], 14, 5),
        (5, "train"): ([20], [7], None, None),
        (5, "valid"): ([20], [7], 21, 7),
        (5, "test"): ([20, 21], [7, 7], 22, 8),
    }


def test_temporal_split(engine):
    seqs = {1: [(1, 1), (2, 2), (3, 5), (4, 8)], 2: [(5, 6), (6, 9)]}
    out = {(r.user_idx, r.split): (r.item_ids, r.target, r.target_ts)
           for r in temporal_split(_seq_rows(engine, seqs), valid_start=5, test_start=8).collect()}
    assert out == {
        (1, "train"): ([1, 2], None, None),
        (1, "valid"): ([1, 2], 3, 5),
        (1, "test"): ([1, 2, 3], 4, 8),
        (2, "test"): ([5], 6, 9),  # no history before the valid cut: no train or valid row
    }


def test_tag_interactions_reasons(engine):
    rows = [
        ("u", "i", "978300760", "4", "ok"),
        ("u", "i", "978300760.0", "5", "float epoch"),
        (None, "i", "978300760", "4", "no user"),
        ("u", None, "978300760", "4", "no item"),
        ("u", "i", None, "4", "no ts"),
        ("u", "i", "yesterday", "4", "bad ts"),
        ("u", "i", "1e30", "4", "huge ts"),
        ("u", "i", "-5", "4", "negative ts"),
        ("u", "i", "978300760", None, "no value"),
        ("u", "i", "978300760", "abc", "bad value"),
        ("u", "i", "978300760", "NaN", "nan value"),
        ("u", "i", "978300760", "inf", "inf value"),
        ("u", "i", "978300760", "-Infinity", "-inf value"),
        ("u", "i", "978300760", "9", "high value"),
        ("u", "i", "978300760", "0.5", "low value"),
    ]
    df = engine.session.createDataFrame([(u, i, t, v, raw, None, "f") for u, i, t, v, raw in rows], RAW_SCHEMA)
    df = df.unionByName(engine.session.createDataFrame([("u", "i", "1", "1", "broken", "expected 4 fields, got 2", "f")], RAW_SCHEMA))
    tagged = tag_interactions(df, "epoch_s", 1, 5)
    got = {r.raw: r.reason for r in tagged.collect()}
    assert got == {
        "ok": None, "float epoch": None, "no user": "missing_user_id", "no item": "missing_item_id",
        "no ts": "missing_timestamp", "bad ts": "unparsable_timestamp", "huge ts": "unparsable_timestamp",
        "negative ts": "timestamp_out_of_range", "no value": "missing_value", "bad value": "unparsable_value",
        "nan value": "non_finite_value", "inf value": "non_finite_value", "-inf value": "non_finite_value",
            "high value": "value_out_of_range", "low value": "value_out_of_range",
        "broken": "malformed_line",
    }
    typed = sorted((r.ts, r.value, str(r.event_date)) for r in typed_interactions(tagged).collect())
    assert typed == [(978300760, 4.0, "2000-12-31"), (978300760, 5.0, "2000-12-31")]


def test_tag_interactions_patterns_and_implicit(engine):
    df = engine.session.createDataFrame(
        [("u", "i", "2020-01-02 03:04:05", None, "a", None, "f"), ("u", "i", "02/01/2020", None, "b", None, "f")], RAW_SCHEMA)
    tagged = tag_interactions(df, "yyyy-MM-dd HH:mm:ss", has_value=False)
    got = {r.raw: (r.reason, r.ts_s, r.value_d) for r in tagged.collect()}
    assert got == {"a": (None, 1577934245, 1.0), "b": ("unparsable_timestamp", None, 1.0)}
    ms = tag_interactions(engine.session.createDataFrame([("u", "i", "1577934245123", "1", "c", None, "f")], RAW_SCHEMA), "epoch_ms")
    assert ms.collect()[0].ts_s == 1577934245


def test_render_text_template(engine):
    items = engine.session.createDataFrame(
        [("m1", "Toy Story", ["Animation", "Comedy"], None, '{"year": "1995"}'),
         ("m2", None, None, "A film.", None)],
        "item_id string, title string, categories array<string>, description string, attributes string")
    texts = {r.item_id: r.t for r in items.select("item_id", render_text(
        "Title: {title}. Year: {year}. Genres: {categories}. {description}", 200).alias("t")).collect()}
    assert texts == {"m1": "Title: Toy Story. Year: 1995. Genres: Animation, Comedy.",
                     "m2": "Title: m2. Year: . Genres: . A film."}
    short = items.select(render_text("{title}", 3).alias("t")).collect()
    assert sorted(r.t for r in short) == ["Toy", "m2"]
