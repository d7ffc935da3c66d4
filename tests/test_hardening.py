"""Reliability and security, the second round: each test feeds one fault — spreadsheet CSVs, ids with
control characters, infinite values, clock skew between publications, k-core that does not converge,
credentials given as literals in any shape, names that would escape their folder, planted symbolic
links, an object-store lake's lease, recommendations for very long histories, and a registered model
checked before anyone loads it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from jobs.files import UnsafeFile, write_atomic
from jobs.lake import (PUBLISHED, Lake, LakeBusy, LakeUnsupported, ObjectStoreLease, dataset_root, etl_lock,
                       published_versions)
from jobs.secrets import check_override_secrets
from jobs.errors import SpecError
from jobs.schema import safe_name
from jobs.spec import load_spec
from spark.etl import ingest_day, run_etl

ROOT = Path(__file__).resolve().parents[1]
LLMREC = str(Path(sys.executable).parent / "llmrec")
SPREADSHEET = "\ufeffuser,item,ts,rating\r\n" + "".join(f"u{u},i{i},{978300760 + u * 10 + i},{1 + (u + i) % 5}\r\n"
                                                      for u in range(1, 6) for i in range(1, 6))


def test_spreadsheet_csv_with_a_byte_order_mark_and_crlf_is_clean_in_every_csv_source(sail, make_spec, tmp_path):
    """Generic, landing and MovieLens CSV sources: the BOM and the CR never reach a header or an id,
    nothing is quarantined for them."""
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "ratings.csv").write_text(SPREADSHEET, encoding="utf-8")
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "2026-01-02.csv").write_text(SPREADSHEET.replace("u1,", "u9,"), encoding="utf-8")
    columns = {"user_id": "user", "item_id": "item", "ts": "ts", "value": "rating"}
    spec = make_spec(source={"kind": "generic", "path": str(tmp_path / "g"), "columns": columns},
                     landing={"path": str(landing), "columns": columns})
    summary = run_etl(spec, sail)
    assert summary.accounting.quarantined_rows == 0 and summary.published is not None
    silver = DeltaTable(Lake.of(spec).path("interactions")).to_pyarrow_table()
    users, items = set(silver["user_id"].to_pylist()), set(silver["item_id"].to_pylist())
    assert users == {f"u{u}" for u in range(1, 10) if u <= 5 or u == 9} and items == {f"i{i}" for i in range(1, 6)}
    assert all(v == v.strip() and "\ufeff" not in v for v in users | items)
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("\ufeffuserId,movieId,rating,timestamp\r\n1,10,4.0,978300760\r\n2,10,3.5,978300761\r\n",
                                    encoding="utf-8")
    (ml / "movies.csv").write_text('\ufeffmovieId,title,genres\r\n10,"Heat, The (1995)",Action\r\n', encoding="utf-8")
    other = make_spec(lake=str(tmp_path / "ml-lake"), source={"kind": "movielens", "path": str(ml)})
    ml_summary = run_etl(other, sail)
    assert ml_summary.accounting.quarantined_rows == 0 and ml_summary.accounting.item_rows_quarantined_by_reason == {}
    index = DeltaTable(Lake.of(other).path("item_index")).to_pyarrow_table().to_pylist()
    assert [(r["item_id"], r["title"]) for r in index] == [("10", "Heat, The")]


def test_generic_ids_with_control_characters_and_non_finite_values_are_quarantined(sail, make_spec, tmp_path):
    rows = ["user,item,ts,rating", "u1,i1,978300760,4", "u\x01,i1,978300761,4", "u2,i\x7f,978300762,4",
            "   ,i1,978300763,4", "u3,i1,978300764,inf", "u4,i1,978300765,NaN", "u5,i1,978300766,-Infinity"]
    (tmp_path / "g.csv").write_text("\n".join(rows) + "\n")
    spec = make_spec(source={"kind": "generic", "path": str(tmp_path / "g.csv"),
                             "columns": {"user_id": "user", "item_id": "item", "ts": "ts", "value": "rating"}},
                     max_quarantine_share=1.0)  # no data.value_range: infinities are still no rating
    acc = run_etl(spec, sail).accounting
    assert acc.quarantined_by_reason == {"invalid_user_id": 1, "invalid_item_id": 1, "missing_user_id": 1,
                                         "non_finite_value": 3}
    assert acc.silver_rows == 1 and acc.accounted


def test_the_published_set_is_chosen_by_commit_order_not_by_clock(sail, make_spec):
    spec = make_spec()
    first = run_etl(spec, sail)
    second = run_etl(spec, sail, force=True)
    path = f"{dataset_root(spec)}/{PUBLISHED}"
    # a publication written by a host whose clock is a day behind (or after a clock step)
    from datetime import datetime, timedelta, timezone
    row = pa.table({"published_at": pa.array([datetime.now(timezone.utc) - timedelta(days=1)], pa.timestamp("us", tz="UTC")),
                    "versions": [json.dumps(first.versions)], "source": ["skewed"],
                    "publication": pa.array([DeltaTable(path).version() + 1], pa.int64()),
                    "lineage": [second.lineage], "landed_days": ["{}"], "inputs": pa.array([None], pa.string())})
    write_deltalake(path, row, mode="append")
    assert published_versions(spec) == first.versions  # the last commit wins, whatever its wall clock says
    assert second.published < DeltaTable(path).version()


def test_a_publication_log_from_before_numbering_is_read_in_commit_order_and_rewritten_once(sail, make_spec):
    """A lake published by earlier code (rows without numbers, wall clocks out of order): the last
    commit is the published set; the next publication rewrites the log numbered, in one commit."""
    from datetime import datetime, timedelta, timezone

    from jobs.lake import publications
    spec = make_spec()
    versions = run_etl(spec, sail).versions
    path = f"{dataset_root(spec)}/{PUBLISHED}"
    import shutil
    shutil.rmtree(path)
    now = datetime.now(timezone.utc)
    for n, shift in enumerate((0, 5, -5)):  # the last one's clock is behind
        write_deltalake(path, pa.table({"published_at": pa.array([now + timedelta(hours=shift)], pa.timestamp("us", tz="UTC")),
                                        "versions": [json.dumps(versions)], "source": [f"old {n}"]}), mode="append")
    assert [p.source for p in publications(spec)] == ["old 0", "old 1", "old 2"]  # by commit, not by clock
    assert published_versions(spec) == versions
    run_etl(spec, sail)
    table = DeltaTable(path)
    assert "publication" in table.schema().to_arrow().names and len(table.history()) == 4  # three appends, one rewrite
    assert [p.source for p in publications(spec)] == ["old 0", "old 1", "old 2", "etl"]
    assert [p.number for p in publications(spec)] == [0, 1, 2, 3]


def test_known_failures_are_one_line_and_exit_2(tmp_path):
    def cli(*args):
        return subprocess.run([LLMREC, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lake = f"lake.root={tmp_path}/lake"
    stuck = cli("etl", "--quiet", "--spec", "movielens-100k-smoke", "--set", lake, "--set", "data.kcore.max_rounds=1",
                "--set", "data.kcore.user=40", "--set", "data.kcore.item=40")
    assert stuck.returncode == 2 and "still removes rows after 1 rounds" in stuck.stderr
    assert "Traceback" not in stuck.stderr and len(stuck.stderr.strip().splitlines()) == 1
    named = cli("train", "--spec", "movielens-100k-smoke", "--set", lake, "--run-name", "../escape")
    assert named.returncode == 2 and "is not a usable name" in named.stderr and "Traceback" not in named.stderr
    newline = cli("align", "--spec", "movielens-100k-smoke", "--set", lake, "--run-name", "ok\n")
    assert newline.returncode == 2 and "is not a usable name" in newline.stderr


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "/abs", "x\n", "x\x00", "", " lead", "-dash"])
def test_names_that_become_paths_are_refused(name):
    with pytest.raises(ValueError, match="not a usable name"):
        safe_name(name)
    assert safe_name("movielens-1m.v2_a") == "movielens-1m.v2_a"


def test_a_literal_credential_is_refused_wherever_it_sits_in_the_overrides():
    for overrides in (["tracking={uri: 'https://u:s3cr3t@mlflow:5000'}"],
                      ["lake={storage_options: {aws_secret_access_key: abcdef}}"],
                      ["lake.storage_options={AZURE_STORAGE_ACCOUNT_KEY: abcdef}"],
                      ["spark={remote: 'sc://spark:15002/;token=abcdef'}"],
                      ["spark.conf={spark.hadoop.fs.s3a.secret.key: abcdef}"]):
        with pytest.raises(SpecError, match="a credential would be written on the job's command line"):
            check_override_secrets(overrides)
    check_override_secrets(["lake={storage_options: {aws_secret_access_key: '${env:AWS_SECRET}'}}",
                            "model.max_item_tokens=64", "tracking.uri=https://u:${env:TOKEN}@mlflow:5000"])
    proc = subprocess.run([LLMREC, "submit", "train", "--spec", "movielens-100k-smoke", "--address", "http://127.0.0.1:1",
                           "--job-arg=--set=lake.storage_options.aws_secret_access_key=abcdef"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "credential" in proc.stderr and "abcdef" not in proc.stderr + proc.stdout


def test_files_we_create_never_follow_a_planted_link(make_spec, tmp_path):
    spec = make_spec(lake=str(tmp_path / "lake"))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock = Path(dataset_root(spec)) / "_etl" / "lock"
    lock.parent.mkdir(parents=True)
    lock.symlink_to(victim)
    with pytest.raises(UnsafeFile, match="is a symbolic link"):
        with etl_lock(spec):
            pass
    assert victim.read_text() == "keep me"
    target = tmp_path / "summary.json"
    seen = []
    write_atomic(str(target), lambda tmp: seen.append(oct(os.stat(os.path.dirname(tmp)).st_mode & 0o777))
                 or Path(tmp).write_text("new"))
    assert target.read_text() == "new" and victim.read_text() == "keep me"
    assert seen == ["0o700"] and sorted(p.name for p in tmp_path.iterdir()) == ["lake", "summary.json", "victim.txt"]
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    write_atomic(str(link), lambda tmp: Path(tmp).write_text("replaced"))  # the link itself is replaced
    assert not link.is_symlink() and victim.read_text() == "keep me"


def test_an_object_store_lake_is_guarded_by_a_conditional_lease(tmp_path):
    """Two ETLs on one object-store lake: the second is refused while the first holds the lease (a
    create-only put); a lease whose holder died is taken over once expired (a compare-and-swap on its
    version), by one taker only; a store that cannot swap atomically refuses instead of guessing."""
    from obstore.store import MemoryStore
    store = MemoryStore()
    first = ObjectStoreLease("s3://bucket/ds", {}, "ds", ttl=60, store=store)
    first.acquire()
    with pytest.raises(LakeBusy, match="being written by another ETL .*lease until"):
        ObjectStoreLease("s3://bucket/ds", {}, "ds", store=store).acquire()
    first.renew()  # the holder pushes its expiry forward while it works
    first.release()
    dead = ObjectStoreLease("s3://bucket/ds", {}, "ds", ttl=-1, store=store)  # died holding it: already expired
    dead.acquire()
    taker, late = (ObjectStoreLease("s3://bucket/ds", {}, "ds", store=store) for _ in range(2))
    taker.acquire()
    with pytest.raises(LakeBusy):
        late.acquire()  # the lease is the taker's now, and live
    dead.release()  # a holder whose lease was taken over deletes nothing
    with pytest.raises(LakeBusy):
        late.acquire()
    taker.release()
    late.acquire()
    late.release()
    (tmp_path / "bucket").mkdir()  # a local "object store" can create-if-absent but not swap
    ObjectStoreLease(f"file://{tmp_path}/bucket", {}, "ds", ttl=-1).acquire()
    with pytest.raises(LakeUnsupported, match="cannot replace it atomically"):
        ObjectStoreLease(f"file://{tmp_path}/bucket", {}, "ds").acquire()


def test_recommendations_never_hold_history_padding_or_minus_infinity():
    """Very long histories and a K larger than what remains: fewer rows, each a real unseen item."""
    import torch

    from ray_jobs.recommend import recommendations_table
    from ray_jobs.scoring import top_k
    n = 30
    histories = [np.arange(1, 26), np.arange(1, n + 1), np.array([3])]

    def score(h):
        return torch.randn(len(h), n + 1)
    active = np.ones(n + 1, bool)
    active[[0, 7]] = False
    ids, scores = top_k(score, histories, 50, 8, candidates=active)
    table = recommendations_table(np.array([1, 2, 3]), {1: "a", 2: "b", 3: "c"}, [""] + [f"i{i}" for i in range(1, n + 1)],
                                  ids, scores, "m", "1").to_pandas()
    for user, hist in zip((1, 2, 3), histories):
        rows = table[table.user_idx == user]
        assert not set(rows.item_idx) & set(hist.tolist()) and 0 not in set(rows.item_idx) and 7 not in set(rows.item_idx)
        assert np.isfinite(rows.score).all() and list(rows["rank"]) == list(range(1, len(rows) + 1))
    assert [len(table[table.user_idx == u]) for u in (1, 2, 3)] == [5, 0, 28]


@pytest.mark.slow
def test_verify_model_accepts_ours_and_refuses_code_or_another_loader(tmp_path):
    from ray_jobs import serving, tracking
    from test_faults import _tiny_checkpoint as tiny_checkpoint
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec("movielens-100k-smoke", ["model.dim=8", f"tracking.uri={uri}", "name=verified"])
    run_id = tracking.start_run(spec, "verified", "train")
    serving.log_recommender(spec, run_id, tiny_checkpoint(spec, tmp_path / "model.pt"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    ok = subprocess.run([LLMREC, "verify-model", "models:/verified@challenger"], env=env, capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0 and "data only" in ok.stdout, ok.stderr
    import mlflow
    local = Path(mlflow.artifacts.download_artifacts("models:/verified@challenger", dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=uri))
    (local / "data" / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    bad = subprocess.run([LLMREC, "verify-model", str(local)], env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert bad.returncode == 3 and "evil.pkl" in bad.stdout
    (local / "data" / "evil.pkl").unlink()
    mlmodel = (local / "MLmodel").read_text().replace("loader_module: ray_jobs.serving", "loader_module: evil.module")
    (local / "MLmodel").write_text(mlmodel)
    other = subprocess.run([LLMREC, "verify-model", str(local)], env=env, capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
    assert other.returncode == 3 and "evil.module" in other.stdout


def test_ingest_starts_from_the_published_set_after_a_failed_full_etl(sail, make_spec, tmp_path):
    """A full ETL that fails its checks has committed new bronze/silver versions: they are rolled back,
    and the next ingest builds on what was published, so the failed run's rows never reach readers."""
    landing = tmp_path / "landing"
    landing.mkdir()
    good = make_spec(landing={"path": str(landing)})
    run_etl(good, sail)
    published = published_versions(good)
    rows_before = DeltaTable(Lake.of(good).path("interactions"), version=published["interactions"]).count()
    (tmp_path / "bad.csv").write_text("u,i,t\nx1,y1,978300760\nx2,y1,978300761\nx3,,978300762\n,y2,978300763\n")
    failing = make_spec(landing={"path": str(landing)}, source={"kind": "generic", "path": str(tmp_path / "bad.csv"),
                                                                 "columns": {"user_id": "u", "item_id": "i", "ts": "t"}})
    summary = run_etl(failing, sail)  # half the rows quarantined: the share check fails, nothing is published
    assert summary.published is None and published_versions(good) == published
    assert {r["table"] for r in summary.repairs if r["action"] == "restored"} >= {"interactions_raw", "interactions"}
    (landing / "1998-04-23.csv").write_text("user_id,item_id,ts,value\n1,50,893289600,4\n")
    result = ingest_day(good, sail, "1998-04-23")
    assert result.silver.inserted == 1 and result.gold.published is not None
    silver = DeltaTable(Lake.of(good).path("interactions")).to_pyarrow_table()
    assert silver.num_rows == rows_before + 1  # the published rows plus the day: nothing of the failed run
    assert not {"x1", "x2"} & set(silver["user_id"].to_pylist())


@pytest.mark.slow
def test_a_credential_never_leaves_a_process_on_an_error_path(tmp_path, monkeypatch):
    """A canary credential in the tracking URI's password and in the object store's secret key, with
    the server and the store unreachable: the CLI, a job entry point, the metric reporter's warning,
    a Dagster run's event log and the failure sensor's summary all fail without it, and so does every
    file they leave."""
    import uuid
    import warnings

    from dagster import DagsterInstance, build_run_status_sensor_context, materialize

    from dagster_project.data_assets import lake_tables
    from dagster_project.deployment import build_definitions
    from dagster_project.resources import MLflowResource, RayResource, SparkResource, SpecResource
    from ray_jobs.tracking import MetricLogger
    canary = f"canary-{uuid.uuid4().hex}"
    env = {**os.environ, "LLMREC_CANARY": canary, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    monkeypatch.setenv("LLMREC_CANARY", canary)
    tracking = "tracking.uri=http://llmrec:${env:LLMREC_CANARY}@127.0.0.1:9"
    store = ("lake.storage_options={AWS_ACCESS_KEY_ID: key, AWS_SECRET_ACCESS_KEY: '${env:LLMREC_CANARY}', "
             "AWS_ENDPOINT_URL: 'http://127.0.0.1:9', AWS_REGION: us-east-1, AWS_ALLOW_HTTP: 'true'}")
    outputs = []
    for args, code in (([LLMREC, "report", "--spec", "movielens-100k-smoke", "--set", tracking], 2),
                       ([LLMREC, "etl", "--quiet", "--spec", "movielens-100k-smoke", "--set", "lake.root=s3://bucket/lake",
                         "--set", store], 2),
                       ([sys.executable, "-m", "ray_jobs.evaluate", "--spec", "movielens-100k-smoke", "--set", tracking,
                         "--set", f"lake.root={tmp_path}/lake", "--model", "models:/m@champion"], 1)):
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert "127.0.0.1:9" in proc.stderr  # the failure is told, its credential is not
        outputs.append(proc.stdout + proc.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricLogger(f"http://llmrec:{canary}@127.0.0.1:9", "run", flush_every=1, system_metrics_every=60,
                              final_wait=0)
        logger.log(1, {"train/loss": 1.0})
        logger.close()
    outputs += [str(w.message) for w in caught]
    assert any("MLflow tracking unreachable" in o for o in outputs)

    spec = SpecResource(spec_path="movielens-100k-smoke", overrides=["lake.root=s3://bucket/lake", store])
    instance = DagsterInstance.ephemeral()
    failed = materialize([lake_tables], resources={"spec": spec, "spark": SparkResource()}, instance=instance,
                         raise_on_error=False)
    assert not failed.success
    outputs += [str(e) for e in instance.all_logs(failed.run_id)]
    assert any("could not be written" in o for o in outputs[-5:] + [str(failed.all_events)])
    defs = build_definitions(spec, RayResource(address="http://127.0.0.1:1"), MLflowResource())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    event = next(e for e in instance.all_logs(failed.run_id)
                 if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE")
    ctx = build_run_status_sensor_context(sensor_name="run_failure_summary", dagster_instance=instance,
                                          dagster_run=instance.get_run_by_id(failed.run_id),
                                          dagster_event=event.dagster_event).for_run_failure()
    defs.get_sensor_def("run_failure_summary")._run_status_sensor_fn(ctx)
    files = [p.read_bytes().decode(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not [o for o in outputs + files if canary in o]
