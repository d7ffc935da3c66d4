"""The whole ETL on real Spark and real Delta tables: MovieLens-100K, bad input, both engines, MERGE."""
import json
import os
import subprocess
import sys
import uuid

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.lake import TABLES, Lake, etl_lock, published_versions
from jobs.spec import load_spec
from ray_jobs.data import load_sequences
from spark.delta_io import MergeResult, read_table
from spark.etl import build_gold, engine_for, ingest_day, run_etl

GOOD = [  # user::movie::rating::ts — 3 users x 4 movies
    "1::10::4::978300760", "1::11::3::978300761", "1::12::5::978300762", "1::13::2::978300763",
    "2::10::5::978300770", "2::11::4::978300771", "2::12::3::978300772", "2::13::4::978300773",
    "3::10::1::978300780", "3::11::2::978300781", "3::12::4::978300782", "3::13::5::978300783",
]
BAD = {  # line -> the reason it must be quarantined with
    "1::10": "malformed_line",
    "abc::10::4::978300760": "invalid_user_id",  # MovieLens ids are integers
    "1::10x::4::978300760": "invalid_item_id",
    "1::10::4::978300": "timestamp_out_of_range",  # milliseconds read as seconds: January 1970
    "1::10::4::4102444800": "timestamp_out_of_range",  # 2100: in the future

    "": "malformed_line",
    "1::10::4::978300760::extra": "malformed_line",
    "::10::4::978300760": "missing_user_id",
    "1::::4::978300760": "missing_item_id",
    "1::10::4::": "missing_timestamp",
    "1::10::4::yesterday": "unparsable_timestamp",
    "1::10::4::-5": "timestamp_out_of_range",
    "1::10::::978300760": "missing_value",
    "1::10::abc::978300760": "unparsable_value",
    "1::10::9::978300760": "value_out_of_range",
}
DUPLICATES = ["2::11::4::978300771", "3::13::5::978300783", "3::12::3::978300782"]  # the last: value 4 vs 3
MOVIES = ["10::Café Society (1995)::Drama|Romance", "11::Toy Story (1995)::Animation|Comedy",
          "12::Heat (1995)::Action", "13::Nixon (1995)::(no genres listed)", "::Ghost (1990)::Drama"]


@pytest.fixture
def bad_movielens(tmp_path):
    folder = tmp_path / "ml-bad"
    folder.mkdir()
    lines = GOOD[:6] + list(BAD) + GOOD[6:] + DUPLICATES
    (folder / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "movies.dat").write_bytes(("\n".join(MOVIES) + "\n").encode("latin-1"))
    return folder


def test_bad_input_lands_in_quarantine(sail, make_spec, bad_movielens):
    spec = make_spec(source={"kind": "movielens", "path": str(bad_movielens)},
                     value_range={"min": 1, "max": 5}, kcore={"user": 2, "item": 2})
    summary = run_etl(spec, sail)
    acc = summary.accounting
    expected = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert acc.quarantined_by_reason == expected
    assert acc.raw_rows == len(GOOD) + len(BAD) + len(DUPLICATES)
    assert acc.duplicates_removed == len(DUPLICATES) and acc.conflicting_keys == 1
    assert acc.silver_rows == len(GOOD)
    assert acc.accounted is True
    assert acc.item_rows_quarantined_by_reason == {"missing_item_id": 1}
    lake = Lake.of(spec)
    q = DeltaTable(lake.path("quarantine")).to_pyarrow_table().to_pylist()
    by_raw = {r["raw"]: r["reason"] for r in q if r["kind"] == "interaction"}
    assert by_raw == BAD  # verbatim lines, each with its reason
    assert {r["source_file"] for r in q} == {str(bad_movielens / "ratings.dat"), str(bad_movielens / "movies.dat")}
    silver = DeltaTable(lake.path("interactions")).to_pyarrow_table()
    assert sorted(zip(silver["user_id"].to_pylist(), silver["item_id"].to_pylist(), silver["value"].to_pylist())) == \
        sorted((g.split("::")[0], g.split("::")[1], float(g.split("::")[2])) for g in GOOD)
    items = {r["item_id"]: r for r in DeltaTable(lake.path("item_index")).to_pyarrow_table().to_pylist()}
    assert items["10"]["title"] == "Café Society"  # latin-1 decoded
    assert items["10"]["text"] == "Title: Café Society. Genres: Drama, Romance."
    assert items["13"]["categories"] is None
    checks = {c.name: c for c in summary.checks}
    # 11 of 25 rows are broken: far above the 5% bound, so that check (and only that one) fails
    assert checks["quarantine_share"].passed is False and summary.checks_passed is False
    assert checks["quarantine_share"].metrics["quarantined_rows"] == len(BAD)
    assert all(c.passed for name, c in checks.items() if name != "quarantine_share")
    assert summary.published is None and published_versions(spec) is None  # a failed check publishes nothing
    with pytest.raises(FileNotFoundError, match=r"dataset ds at .* has no published version set"):
        load_sequences(spec)


def test_readers_keep_the_published_set_when_a_rerun_fails_its_checks(sail, make_spec, bad_movielens):
    """A passing run publishes its versions; a rerun whose checks fail rewrites the tables but
    publishes nothing, and readers still get the first run's rows (publishing is the same on every
    engine: the tables' writes on the JVM are in test_engines_build_identical_tables and the MERGEs)."""
    base = dict(source={"kind": "movielens", "path": str(bad_movielens)},
                value_range={"min": 1, "max": 5}, kcore={"user": 2, "item": 2})
    good = make_spec(**base, max_quarantine_share=1.0)
    first = run_etl(good, sail)
    assert first.published == 0 and published_versions(good) == first.versions
    before = load_sequences(good)
    strict = make_spec(**base, max_quarantine_share=0.05)
    second = run_etl(strict, sail)
    assert second.published is None and all(v == 1 for v in second.versions.values())
    assert published_versions(strict) == first.versions
    after = load_sequences(strict)
    assert after.versions == first.versions and after.item_text == before.item_text
    pinned = load_sequences(make_spec(**base, pinned_versions=second.versions))  # an explicit set is read as given
    assert pinned.versions == second.versions


def test_movielens_100k_end_to_end_and_time_travel(sail, make_spec):
    spec = make_spec(kcore={"user": 5, "item": 5})
    first = run_etl(spec, sail)
    g = first.gold
    assert (g.users, g.items, g.interactions) == (943, 1682, 99287)  # the index holds every catalogue item
    assert (g.items_active, g.items_in_kcore, g.new_items, g.new_users) == (1682, 1349, 1682, 943)
    assert first.accounting.raw_rows == 100000 and first.accounting.accounted
    assert g.sequences_by_split == {"test": 943, "train": 943, "valid": 943}
    assert [r["removed"] for r in g.kcore_rounds] == [713]
    assert first.checks_passed and all(v == 0 for v in first.versions.values())
    assert first.published == 0 and published_versions(spec) == first.versions
    lake = Lake.of(spec)
    # read back with delta-rs, independently of Spark
    seq = DeltaTable(lake.path("sequences")).to_pyarrow_table()
    test_rows = seq.filter(pc.equal(seq["split"], "test"))
    lengths = pc.add(pc.list_value_length(test_rows["item_ids"]), 1)
    assert pc.sum(lengths).as_py() == 99287
    index = DeltaTable(lake.path("item_index")).to_pyarrow_table()
    assert index.num_rows == 1682 and pc.sum(pc.greater(index["n_interactions"], 0)).as_py() == 1349
    assert DeltaTable(lake.path("interactions")).count() == 100000
    # a re-run on the same inputs writes nothing; a forced one commits version 1 everywhere with the
    # same contents, and version 0 stays readable
    same = run_etl(spec, sail)
    assert same.unchanged and same.versions == first.versions and same.published == first.published
    assert len(DeltaTable(lake.path("sequences")).history()) == 1
    second = run_etl(spec, sail, force=True)
    assert not second.unchanged and all(v == 1 for v in second.versions.values())
    assert published_versions(spec) == second.versions
    assert len(DeltaTable(lake.path("sequences")).history()) == 2
    for table in ("item_index", "user_index", "sequences"):
        v0 = read_table(sail, lake.path(table), version=0).toArrow()
        v1 = read_table(sail, lake.path(table), version=1).toArrow()
        key = [(c, "ascending") for c in ("user_idx", "split", "item_idx") if c in v0.column_names]
        assert v0.sort_by(key).equals(v1.sort_by(key)), table
    v0_delta_rs = DeltaTable(lake.path("user_index"), version=0).to_pyarrow_table()
    assert v0_delta_rs.num_rows == 943


def test_a_rerun_rebuilds_only_when_an_input_changed(sail, make_spec, bad_movielens):
    """The published set remembers what it was built from: the same source bytes, data settings and
    landed days again write nothing; a changed source file or setting rebuilds."""
    base = dict(source={"kind": "movielens", "path": str(bad_movielens)}, value_range={"min": 1, "max": 5},
                kcore={"user": 2, "item": 2}, max_quarantine_share=1.0)
    spec = make_spec(**base)
    lake = Lake.of(spec)
    first = run_etl(spec, sail)
    assert first.published == 0 and not first.unchanged
    again = run_etl(spec, sail)
    assert again.unchanged and again.versions == first.versions and again.accounting == first.accounting
    assert {t: lake.version(t) for t in first.versions} == first.versions
    ratings = bad_movielens / "ratings.dat"
    ratings.write_bytes(ratings.read_bytes() + b"4::12::5::978300790\n")  # one more row: another source
    grown = run_etl(spec, sail)
    assert not grown.unchanged and grown.published == 1 and grown.accounting.raw_rows == first.accounting.raw_rows + 1
    looser = run_etl(make_spec(**{**base, "kcore": {"user": 1, "item": 1}}), sail)  # another setting
    assert not looser.unchanged and looser.published == 2
    assert run_etl(make_spec(**{**base, "kcore": {"user": 1, "item": 1}}), sail).unchanged


def _table_rows(path: str) -> list:
    t = DeltaTable(path).to_pyarrow_table()
    if "ingest_date" in t.column_names:
        t = t.drop_columns(["ingest_date"])
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())


@pytest.mark.slow
def test_a_version_older_than_the_latest_checkpoint_reads_back(sail, tmp_path):
    """A living lake passes Delta's checkpoint interval (10 commits) after ten nights: every version
    before the checkpoint still reads, on every engine."""
    import pyarrow as pa
    from deltalake import write_deltalake
    path = str(tmp_path / "t")
    for v in range(12):
        write_deltalake(path, pa.table({"v": list(range(v + 1))}), mode="overwrite")
    DeltaTable(path).create_checkpoint()
    assert [read_table(sail, path, v).count() for v in (0, 5, 10, 11)] == [1, 6, 11, 12]
    assert read_table(sail, path).count() == 12
    write_deltalake(str(tmp_path / "empty"), pa.table({"v": pa.array([], pa.int64())}))  # no data file at all
    assert read_table(sail, str(tmp_path / "empty"), 0).columns == ["v"]


def test_engines_build_identical_tables(engines, tmp_path, bad_movielens):
    """The same spec on Sail (through the CLI) and on JVM Spark (in process: this runs with the JVM
    tests, whose engine is up) gives identical tables — on the bad input, so the JVM quarantines every
    line as Sail does (test_bad_input_lands_in_quarantine checks Sail's reasons line by line)."""
    import yaml

    from conftest import _spec_doc
    data = {"source": {"kind": "movielens", "path": str(bad_movielens)}, "value_range": {"min": 1, "max": 5},
            "kcore": {"user": 2, "item": 2}, "max_quarantine_share": 1.0}
    lakes = {"sail": tmp_path / "sail", "local": tmp_path / "local"}
    specs = {engine: tmp_path / f"{engine}.yaml" for engine in lakes}
    for engine, path in specs.items():
        path.write_text(yaml.safe_dump(_spec_doc(str(lakes[engine]), engine, **data)))
    run_etl(load_spec(str(specs["local"])), engines.get("local"))
    cli = [sys.executable, "-m", "jobs.cli", "etl", "--quiet", "--spec", str(specs["sail"])]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine sail" in proc.stdout
    for table in ("interactions_raw", "quarantine", "interactions", "items", "item_index", "user_index", "sequences"):
        a = _table_rows(f"{lakes['sail']}/ds/{TABLES[table]}")
        b = _table_rows(f"{lakes['local']}/ds/{TABLES[table]}")
        assert a == b and a, table


LANDED_DAY1 = "user_id,item_id,ts,value\n1,10,978400000,4\n4,10,978400001,5\n4,11,978400002,3\nbad,,978400003,4\n"
LANDED_DAY2 = "user_id,item_id,ts,value\n4,10,978400001,2\n5,12,978500000,5\n"


@pytest.mark.slow
def test_incremental_merge_is_idempotent(engine, make_spec, bad_movielens, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    spec = make_spec(engine=engine.name, source={"kind": "movielens", "path": str(bad_movielens)},
                     value_range={"min": 1, "max": 5}, landing={"path": str(landing)}, max_quarantine_share=1.0)
    run_etl(spec, engine)
    lake = Lake.of(spec)
    base = {t: lake.version(t) for t in ("interactions_raw", "quarantine", "interactions")}
    (landing / "2026-11-20.csv").write_text(LANDED_DAY1)
    first = ingest_day(spec, engine, "2026-11-20")
    assert first.rows == 4
    assert first.bronze.inserted == 4 and first.quarantine.inserted == 1
    assert first.silver == MergeResult(version=base["interactions"] + 1, inserted=3, updated=0, committed=True)
    assert first.gold.gold.users == 4  # user 4 arrived
    after_first = {t: _table_rows(lake.path(t)) for t in ("interactions_raw", "quarantine", "interactions")}
    versions = {t: lake.version(t) for t in ("interactions_raw", "quarantine", "interactions", "sequences")}
    # the same day again: nothing inserted, nothing committed, gold not rebuilt
    again = ingest_day(spec, engine, "2026-11-20")
    assert (again.bronze.committed, again.quarantine.committed, again.silver.committed) == (False,) * 3
    assert again.gold is None and again.gold_skipped == f"silver unchanged at version {again.silver.version}"
    assert {t: lake.version(t) for t in versions} == versions
    assert {t: _table_rows(lake.path(t)) for t in after_first} == after_first
    # the next day updates one value on an existing natural key and adds one row
    (landing / "2026-11-21.csv").write_text(LANDED_DAY2)
    second = ingest_day(spec, engine, "2026-11-21")
    assert (second.silver.inserted, second.silver.updated) == (1, 1)
    silver = {(r["user_id"], r["item_id"], r["ts"]): r["value"] for r in
              DeltaTable(lake.path("interactions")).to_pyarrow_table().to_pylist()}
    assert silver[("4", "10", 978400001)] == 2.0 and silver[("5", "12", 978500000)] == 5.0
    assert len(silver) == len(GOOD) + 4
    # a full run replays the landing folder: same silver as the incremental path
    incremental = _table_rows(lake.path("interactions"))
    run_etl(spec, engine)
    assert _table_rows(lake.path("interactions")) == incremental

    # a day's own accounting: raw = kept + quarantined + duplicates, a key landed with two values
    # counted and resolved to the larger, an existing key's new value updates silver (latest wins)
    (landing / "2026-11-22.csv").write_text("user_id,item_id,ts,value\n6,10,978600000,2\n6,10,978600000,4\n"
                                            "7,11,978600001,3\n7,11,978600001,3\n5,12,978500000,3\n7,x,yesterday,1\n")
    third = ingest_day(spec, engine, "2026-11-22")
    acc = third.accounting
    assert (acc.raw_rows, acc.quarantined_rows, acc.duplicates_removed, acc.silver_rows) == (6, 1, 2, 3)
    assert acc.accounted and acc.conflicting_keys == 1 and acc.quarantined_by_reason == {"unparsable_timestamp": 1}
    assert (third.silver.inserted, third.silver.updated) == (2, 1)
    silver = {(r["user_id"], r["item_id"], r["ts"]): r["value"] for r in
              DeltaTable(lake.path("interactions")).to_pyarrow_table().to_pylist()}
    assert silver[("6", "10", 978600000)] == 4.0 and silver[("5", "12", 978500000)] == 3.0


def test_the_embedded_sail_session_does_not_expire_while_its_engine_idles(make_spec, monkeypatch):
    """Sail drops a Connect session idle for its `spark.session_timeout_secs` (15 min by default),
    after which every call fails: a test worker or an asset idle that long between two queries broke.
    The embedded engine sets the timeout when it builds its server (a year); shrunk here to 1 s, its
    session is gone after 3 idle seconds, which shows the engine's setting is the one Sail uses."""
    import time

    from spark import session as spark_session
    assert spark_session.SAIL_SESSION_IDLE_S >= 24 * 3600
    monkeypatch.delenv(spark_session.SAIL_SESSION_TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(spark_session, "SAIL_SESSION_IDLE_S", 1)
    engine = spark_session.start_engine(make_spec().spark)
    try:
        assert spark_session.SAIL_SESSION_TIMEOUT_ENV not in os.environ  # set for the server's build only
        assert engine.session.range(3).count() == 3
        time.sleep(3)
        with pytest.raises(Exception, match="is not running"):
            engine.session.range(3).count()
    finally:
        engine.stop()


def test_ingest_without_landing_or_silver_is_a_clear_error(sail, make_spec, tmp_path):
    spec = make_spec()
    with pytest.raises(ValueError, match="data.landing is not configured"):
        ingest_day(spec, sail, "2026-11-20")
    spec = make_spec(landing={"path": str(tmp_path)})
    with pytest.raises(ValueError, match="run `llmrec etl` first"):
        ingest_day(spec, sail, "2026-11-20")


def test_temporal_split_on_movielens_100k(sail, make_spec):
    spec = make_spec(kcore={"user": 5, "item": 5}, split={"kind": "temporal", "valid_fraction": 0.1, "test_fraction": 0.1})
    summary = run_etl(spec, sail)
    lo, hi = summary.gold.temporal_cuts
    assert lo < hi
    seq = DeltaTable(Lake.of(spec).path("sequences")).to_pyarrow_table().to_pylist()
    for r in seq:
        if r["split"] == "train":
            assert max(r["timestamps"]) < lo
        elif r["split"] == "valid":
            assert lo <= r["target_ts"] < hi and max(r["timestamps"]) < lo
        else:
            assert r["target_ts"] >= hi and max(r["timestamps"]) < hi
    assert summary.checks_passed


def test_build_gold_refuses_nothing_silently(sail, make_spec):
    spec = make_spec()
    with pytest.raises(FileNotFoundError, match="no Delta table"):
        build_gold(spec, sail)


@pytest.mark.slow
def test_etl_cli_writes_summary(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "etl", "--spec", "movielens-100k-smoke",
                           "--set", f"lake.root={tmp_path / 'lake'}", "--summary-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["gold"]["users"] == 943 and summary["engine"] == "sail"
    assert os.path.exists(tmp_path / "lake" / "movielens-100k" / "_etl" / "summary.json")
    assert "✓ gold/sequences" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "jobs.cli", "etl", "--spec", "movielens-100k-smoke",
                          "--set", "data.kcore.usr=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown key 'data.kcore.usr'" in bad.stderr
    tables = subprocess.run([sys.executable, "-m", "jobs.cli", "tables", "--spec", "movielens-100k-smoke",
                             "--set", f"lake.root={tmp_path / 'lake'}"], capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0 and "sequences" in tables.stdout and "2,829" in tables.stdout

    # a second ETL on the same dataset while one holds it: refused, naming the holder; nothing changes
    spec = load_spec("movielens-100k-smoke", [f"lake.root={tmp_path / 'lake'}"])
    before = published_versions(spec)
    with etl_lock(spec):
        busy = subprocess.run([sys.executable, "-m", "jobs.cli", "etl", "--quiet", "--spec", "movielens-100k-smoke",
                               "--set", f"lake.root={tmp_path / 'lake'}"], capture_output=True, text=True, timeout=300)
    assert busy.returncode == 2 and f"being written by another ETL (pid {os.getpid()} on" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr and published_versions(spec) == before


def test_cli_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True)
    for command in ("etl", "ingest", "tables", "spec"):
        assert command in proc.stdout


def test_remote_engine_against_a_separate_spark_connect_server(sail, tmp_path):
    """engine=remote talks to whatever Spark Connect URL it is given: here a second Sail server."""
    from pysail.spark import SparkConnectServer

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    try:
        host, port = server.listening_address
        spec = load_spec("jobs/specs/movielens-100k-smoke.yaml",
                         [f"lake.root={tmp_path}", "spark.engine=remote", f"spark.remote=sc://{host}:{port}"])
        with engine_for(spec) as remote:
            assert remote.session is not sail.session
            summary = run_etl(spec, remote)
        assert summary.engine == "remote" and summary.gold.users == 943
        assert sail.session.range(3).count() == 3  # the in-process engine is untouched
    finally:
        server.stop()


def test_bad_input_is_a_clear_error_before_anything_is_written(sail, make_spec, tmp_path):
    """A missing landing folder and an empty source are refused before any table is written; a
    k-core that removes every interaction is refused and nothing is published."""
    lake = tmp_path / "lake"
    missing = make_spec(lake=str(lake), landing={"path": str(tmp_path / "no-such-folder")})
    with pytest.raises(ValueError, match=r"data.landing.path .*no-such-folder: no such folder"):
        run_etl(missing, sail)
    empty = tmp_path / "empty.csv"
    empty.write_text("u,i,t\n")
    source = {"kind": "generic", "path": str(empty), "columns": {"user_id": "u", "item_id": "i", "ts": "t"}}
    with pytest.raises(ValueError, match=r"data.source \(generic\) has no rows"):
        run_etl(make_spec(lake=str(lake), source=source), sail)
    assert [p.name for p in lake.rglob("*") if p.is_file()] == ["lock"]  # the ETL lock, no table
    greedy = make_spec(lake=str(lake), kcore={"user": 100000, "item": 5})
    with pytest.raises(ValueError, match=r"data.kcore \(user >= 100000, item >= 5\) removes every interaction"):
        run_etl(greedy, sail)
    assert published_versions(greedy) is None
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "etl", "--quiet", "--spec", "movielens-100k-smoke",
                           "--set", f"lake.root={lake}", "--set", "data.kcore.user=100000"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "removes every interaction" in proc.stderr and "Traceback" not in proc.stderr


_NEAR_VALID = st.tuples(st.sampled_from(["1", "2", "42", "", "abc", "-1", "1.5", " 7 "]),
                        st.sampled_from(["10", "11", "", "x", "0010"]),
                        st.sampled_from(["4", "5", "", "nan", "9", "1e3", "-inf"]),
                        st.sampled_from(["978300760", "978300", "", "-5", "4102444800", "1e9", "NaN", "978300760.5"]),
                        st.sampled_from(["", "::", "::extra"])).map(lambda t: "::".join(t[:4]).encode() + t[4].encode())
_ANY_LINE = st.one_of(st.binary(max_size=120), _NEAR_VALID).filter(lambda b: b"\n" not in b)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(junk=st.lists(st.tuples(st.integers(0, len(GOOD)), _ANY_LINE), min_size=1, max_size=25))
def test_arbitrary_lines_never_crash_ingest_and_every_row_is_accounted(sail, make_spec, tmp_path, junk):
    """Any bytes (invalid UTF-8, NUL, CR, lines over data.max_line_bytes, near-valid records) mixed
    into a valid MovieLens file: the ETL finishes, raw = silver + quarantined + duplicates holds,
    and every line is one bronze row (12 derandomized examples: ~1 s each)."""
    folder = tmp_path / f"ml-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    lines = [g.encode() for g in GOOD]
    for at, line in junk:
        lines.insert(at, line)
    (folder / "ratings.dat").write_bytes(b"\n".join(lines) + b"\n")
    spec = make_spec(lake=str(folder / "lake"), source={"kind": "movielens", "path": str(folder), "encoding": "utf-8"},
                     value_range={"min": 1, "max": 5}, max_line_bytes=100, max_quarantine_share=1.0)
    summary = run_etl(spec, sail)
    acc = summary.accounting
    assert acc.accounted and acc.raw_rows == len(lines)
    assert acc.raw_rows == acc.silver_rows + acc.quarantined_rows + acc.duplicates_removed
    silver = DeltaTable(Lake.of(spec).path("interactions")).to_pyarrow_table().to_pylist()
    assert all(r["user_id"].isdigit() and r["item_id"].isdigit() and 1 <= r["value"] <= 5 for r in silver)
