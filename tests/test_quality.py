"""Data-quality checks pass on good tables and fail, with the right figures, on broken ones."""
from spark import quality

SEQ_SCHEMA = "user_idx int, split string, item_ids array<int>, timestamps array<bigint>, target int, target_ts bigint"


def test_no_null_ids(sail):
    ok = sail.session.createDataFrame([("u", "i")], "user_id string, item_id string")
    bad = sail.session.createDataFrame([("u", None), (None, "i"), (None, None)], "user_id string, item_id string")
    assert quality.check_no_null_ids(ok).passed
    r = quality.check_no_null_ids(bad)
    assert not r.passed and r.metrics == {"rows": 3, "null_user_ids": 2, "null_item_ids": 2}


def test_kcore_check(sail):
    pairs = sail.session.createDataFrame([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)], "user_idx int, item_idx int")
    r = quality.check_kcore(pairs, 2, 2)
    assert not r.passed and r.metrics["min_user_interactions"] == 1 and r.metrics["min_item_interactions"] == 2
    assert quality.check_kcore(pairs, 1, 2).passed


def test_leakage_check(sail):
    clean = sail.session.createDataFrame([
        (1, "train", [5, 6], [1, 2], None, None), (1, "valid", [5, 6], [1, 2], 7, 3), (1, "test", [5, 6, 7], [1, 2, 3], 8, 4),
    ], SEQ_SCHEMA)
    r = quality.check_no_leakage(clean)
    assert r.passed and r.metrics == {"targets": 2, "leaked_target_events": 0, "targets_seen_in_train": 0}
    leaky = sail.session.createDataFrame([
        (1, "train", [5, 6, 8], [1, 2, 4], None, None), (1, "test", [5, 6], [1, 2], 8, 4),
        (2, "train", [5], [1], None, None), (2, "test", [5], [1], 5, 9),  # a repeat, not a leak
    ], SEQ_SCHEMA)
    r = quality.check_no_leakage(leaky)
    assert not r.passed and r.metrics == {"targets": 2, "leaked_target_events": 1, "targets_seen_in_train": 2}


def test_sequence_items_indexed_and_gold_interactions(sail):
    seq = sail.session.createDataFrame([
        (1, "train", [1], [1], None, None), (1, "valid", [1], [1], 2, 2), (1, "test", [1, 2], [1, 2], 3, 3),
        (2, "train", [2, 9], [1, 2], None, None),
    ], SEQ_SCHEMA)
    index = sail.session.createDataFrame([(1,), (2,), (3,)], "item_idx int")
    r = quality.check_sequence_items_indexed(seq, index)
    assert not r.passed and r.metrics == {"missing_items": 1}
    pairs = sorted((p.user_idx, p.item_idx) for p in quality.gold_interactions(seq).collect())
    assert pairs == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 9)]


def test_quarantine_share():
    assert quality.check_quarantine_share(100, 5, 0.05).passed
    r = quality.check_quarantine_share(100, 6, 0.05)
    assert not r.passed and r.metrics["share"] == 0.06
    assert quality.check_quarantine_share(0, 0, 0.05).passed
