"""Faults fed for real (reliability and security): model files and DeepSpeed shards that would run
code, credentials that must not leave the process, concurrent ETLs on one lake. The faults that need
a Ray head, a tracking server or the ETL live beside their subject (test_submit, test_etl,
test_distributed) and are listed in the failure table of docs/operator-guide.md."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from jobs.spec import load_spec
from ray_jobs.checkpoint import ModelCheckpoint, safe_deepspeed_loads, save_model
from ray_jobs.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CANARY = "canary-5e1f0c9d7a"


class Payload:
    """A pickle that writes a marker file when it is unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _tiny_checkpoint(spec, path: Path) -> str:
    items = ["", "Title: A.", "Title: B.", "Title: C.", "Title: D."]
    model = build_model(spec, items)
    return save_model(str(path), ModelCheckpoint({k: v.clone() for k, v in model.state_dict().items()}, spec, items,
                                                 {"item_index": 0, "sequences": 0}))


def test_a_crafted_deepspeed_shard_is_refused_and_runs_nothing(tmp_path):
    """DeepSpeed reads its shards with weights_only=False; an engine passed through
    `safe_deepspeed_loads` reads them as data: real shard contents load, a crafted one is refused."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    safe_deepspeed_loads(engine)
    shard = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                "state": {"exp_avg": torch.ones(3)}}, shard)
    back = engine.checkpoint_engine.load(str(shard), map_location="cpu")
    assert back["zero_stage"] == ZeroStageEnum.gradients and torch.equal(back["state"]["exp_avg"], torch.ones(3))

    marker = tmp_path / "marker"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match="refusing to load it"):
        engine.checkpoint_engine.load(str(evil), map_location="cpu")
    assert not marker.exists()


def test_alignment_refuses_a_saved_start_that_fitted_its_reward_items(tmp_path):
    """`alignment_start` judges the start by the training settings saved in its checkpoint: one trained
    on every training item (train.withhold 0) is refused for align.holdout 3, one trained with
    withhold 3 is taken, and align.allow_seen_rewards forces the first."""
    from ray_jobs.align import alignment_start
    spec = load_spec("movielens-100k-smoke", ["model.dim=8", "align.holdout=3", "align.allow_seen_rewards=false",
                                              f"train.storage_path={tmp_path}"])
    seen = _tiny_checkpoint(spec, tmp_path / "seen.pt")
    unseen = _tiny_checkpoint(spec.model_copy(update={"train": spec.train.model_copy(update={"withhold": 3})}),
                              tmp_path / "unseen.pt")

    def start(init: str, **kw):
        return alignment_start(spec.model_copy(update={"align": spec.align.model_copy(update={"init": init, **kw})}))[0]
    with pytest.raises(ValueError, match=r"has seen its reward items: its train.withhold=0 < align.holdout=3"):
        start(seen)
    assert start(unseen).align.init.startswith(f"{unseen}@sha256:")
    assert start(seen, allow_seen_rewards=True).align.init.startswith(f"{seen}@sha256:")


def test_the_registered_model_is_data_only_and_a_tampered_one_runs_nothing(tmp_path):
    """The pyfunc names an installed loader and carries model.pt: no pickle, no code; replacing its
    model.pt with a crafted pickle makes loading fail without running it."""
    from ray_jobs import serving, tracking
    from ray_jobs.registry_check import LOADERS
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec("movielens-100k-smoke", ["model.dim=8", f"tracking.uri={uri}", "name=data-only",
                                              f"train.storage_path={tmp_path / 'ray'}"])
    ckpt = _tiny_checkpoint(spec, tmp_path / "model.pt")
    run_id = tracking.start_run(spec, "data-only", "train")
    assert serving.log_recommender(spec, run_id, ckpt) == 1
    assert LOADERS == (serving.LOADER_MODULE, *serving.LEGACY_LOADER_MODULES)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/data-only@challenger", dst_path=str(tmp_path / "dl")))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".py"))], files
    assert yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["loader_module"] == \
        "ray_jobs.serving"
    model = mlflow.pyfunc.load_model("models:/data-only@challenger")
    assert [len(x) for x in model.predict(pd.DataFrame({"history": [["1", "2"]]}), params={"k": 2})["item_ids"]] == [2]
    as_numbers = model.predict(pd.DataFrame({"history": [[1, 2]]}), params={"k": 2})  # numbers are read as their text
    assert as_numbers["unknown_history_items"].tolist() == [0] and len(as_numbers["item_ids"][0]) == 2
    # an alignment run records the version the alias named (a file: with its digest), so a resume after
    # the alias moved or the file was rewritten is refused as another setting
    from ray_jobs.align import alignment_start
    from ray_jobs.loop import training_changes
    from ray_jobs.registry import resolve_model

    def aligned_from(init: str):
        return alignment_start(spec.model_copy(update={"align": spec.align.model_copy(update={
            "init": init, "allow_seen_rewards": True})}))[0]
    first = aligned_from("models:/data-only@challenger")
    assert first.align.init == "models:/data-only/1"
    assert serving.log_recommender(spec, tracking.start_run(spec, "data-only-2", "train"), ckpt) == 2
    moved = aligned_from("models:/data-only@challenger")
    assert training_changes(first, moved, "align") == ["align.init: 'models:/data-only/1' -> 'models:/data-only/2'"]
    pinned = aligned_from(str(ckpt)).align.init
    assert pinned.startswith(f"{ckpt}@sha256:") and resolve_model(spec, pinned).path == str(ckpt)
    copy = tmp_path / "copy.pt"
    shutil.copy(ckpt, copy)
    _tiny_checkpoint(spec.model_copy(update={"model": spec.model.model_copy(update={"dim": 4})}), Path(ckpt))
    with pytest.raises(ValueError, match="the file changed since it was pinned"):
        resolve_model(spec, pinned)
    rewritten = aligned_from(str(ckpt)).align.init
    assert rewritten.startswith(f"{ckpt}@sha256:") and rewritten != pinned
    shutil.copy(copy, ckpt)
    assert resolve_model(spec, pinned).path == str(ckpt)  # the same content again
    old = local.parent / "registered-before"  # a model registered while the loader lived in ray_jobs.tracking
    shutil.copytree(local, old)
    (old / "MLmodel").write_text((old / "MLmodel").read_text().replace("ray_jobs.serving", "ray_jobs.tracking"))
    assert mlflow.pyfunc.load_model(str(old)).predict(pd.DataFrame({"history": [["1", "2"]]}), params={"k": 2}).equals(
        model.predict(pd.DataFrame({"history": [["1", "2"]]}), params={"k": 2}))

    marker = tmp_path / "marker"
    [weights] = local.rglob("model.pt")
    torch.save({"format": "llmrec-checkpoint/1", "weights": Payload(str(marker))}, weights)
    with pytest.raises(ValueError, match="refusing to load it"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()


def test_literal_credentials_in_a_spec_are_masked_everywhere_they_go(tmp_path, monkeypatch):
    """A spec holding credentials as literal values: `llmrec spec`, the MLflow params and spec.yaml
    artifact, and a checkpoint show `***`; a literal credential on a job's command line is refused
    before anything is submitted; `${env:NAME}` is read from the environment where it is used."""
    from ray_jobs import tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec_file = tmp_path / "secret.yaml"
    spec_file.write_text(yaml.safe_dump({
        "base": str(ROOT / "jobs/specs/movielens-100k-smoke.yaml"), "name": "secret",
        "lake": {"storage_options": {"AWS_SECRET_ACCESS_KEY": CANARY, "AWS_REGION": "eu-west-1"}},
        "spark": {"conf": {"spark.hadoop.fs.s3a.secret.key": CANARY, "spark.sql.ansi.enabled": "true"}},
        "model": {"dim": 8}, "tracking": {"uri": uri}}))
    shown = subprocess.run([str(BIN / "llmrec"), "spec", "--spec", str(spec_file)], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert shown.returncode == 0 and CANARY not in shown.stdout + shown.stderr
    assert "AWS_SECRET_ACCESS_KEY: '***'" in shown.stdout and "AWS_REGION: eu-west-1" in shown.stdout

    spec = load_spec(spec_file)
    run_id = tracking.start_run(spec, "secret", "train")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.params["lake.storage_options.AWS_SECRET_ACCESS_KEY"] == "***"
    assert run.data.params["spark.conf.spark.hadoop.fs.s3a.secret.key"] == "***"
    ckpt = _tiny_checkpoint(spec, tmp_path / "model.pt")
    assert CANARY.encode() not in Path(ckpt).read_bytes()
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and f != spec_file and CANARY.encode() in f.read_bytes()]
    assert not leaks, leaks  # the sqlite store and the artifacts (spec.yaml) included

    refused = subprocess.run([str(BIN / "llmrec"), "submit", "train", "--address", "http://127.0.0.1:9",
                              "--spec", "movielens-100k-smoke", "--set", f"tracking.uri=http://llmrec:{CANARY}@mlflow:5000"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and "a credential would be written on the job's command line" in refused.stderr
    assert CANARY not in refused.stdout + refused.stderr

    from jobs.errors import SpecError

    from jobs.spec import storage_options, tracking_uri
    env_spec = load_spec("movielens-100k-smoke", ["lake.storage_options.AZURE_STORAGE_SAS_TOKEN=${env:LLMREC_SAS}",
                                                  "tracking.uri=http://llmrec:${env:LLMREC_TOKEN}@mlflow:5000"])
    with pytest.raises(SpecError, match="lake.storage_options.AZURE_STORAGE_SAS_TOKEN: environment variable LLMREC_SAS"):
        storage_options(env_spec)
    monkeypatch.setenv("LLMREC_SAS", "sv=1&sig=abc")
    monkeypatch.setenv("LLMREC_TOKEN", "t0k")
    assert storage_options(env_spec) == {"AZURE_STORAGE_SAS_TOKEN": "sv=1&sig=abc"}
    assert tracking_uri(env_spec) == "http://llmrec:t0k@mlflow:5000"


def test_every_user_gets_recommendations_short_histories_included(sail, make_spec, tmp_path, local_ray):
    """Only 5-star ratings, no k-core: many MovieLens-100K users keep 1-2 interactions and have no
    test row. Every user of user_index still gets K items, none of them already seen; the job counts
    how many users each case covered; a rerun replaces its own rows only."""
    import numpy as np
    from deltalake import DeltaTable

    from jobs.lake import table_path
    from jobs.schema import JobSpec
    from ray_jobs import recommend
    from ray_jobs.data import load_sequences
    from ray_jobs.train import train_local
    from spark.etl import run_etl
    spec = make_spec(min_value=5, kcore={"user": 0, "item": 0})
    run_etl(spec, sail)
    spec = JobSpec.model_validate({**spec.model_dump(), "name": "cold", "model": {"kind": "sasrec", "dim": 8},
                                   "train": {"epochs": 1, "checkpoint_dir": str(tmp_path / "ckpt")}})
    model = train_local(spec, resume=False).checkpoint
    data = load_sequences(spec)
    short = {int(u): set(s.tolist()) for u, s in zip(data.train_users, data.train) if int(u) not in set(data.test.users.tolist())}
    assert len(short) > 10 and all(len(s) <= 2 for s in short.values())
    out = recommend.run(spec, model, k=5)
    users = DeltaTable(table_path(spec, "user_index")).to_pandas()
    table = DeltaTable(table_path(spec, "recommendations")).to_pandas()
    assert set(table["user_idx"]) == set(users["user_idx"]) and len(table) == len(users) * 5
    silent = int((users["n_interactions"] == 0).sum())  # in the lineage's index, no 5-star rating: popular items
    assert silent > 0 and out.users_by_source == {"model": len(data.test.users), "model_short_history": len(short),
                                                     "popularity": silent}
    for u, seen in short.items():
        assert not set(table[table.user_idx == u]["item_idx"]) & seen
    history = {int(u): set(s.tolist()) for u, s in zip(data.train_users, data.train)}
    for u in data.test.users.tolist():  # the model's users too: nothing they have seen is recommended
        assert not set(table[table.user_idx == u]["item_idx"]) & history.get(int(u), set())
    # idempotent: the same model version's rows are replaced; the driver scored them (one node, no GPU),
    # two Ray tasks, as on a cluster, give the same lists (up to the order of items tied within 1e-5:
    # other batches, other rounding)
    from ray_jobs.runtime import scores_on_tasks
    assert not scores_on_tasks(spec)
    recommend.run(spec, model, k=5, tasks=True)
    again = DeltaTable(table_path(spec, "recommendations")).to_pandas()
    key = ["user_idx", "rank"]
    table, again = (t.sort_values(key).reset_index(drop=True) for t in (table, again))
    assert len(again) == len(users) * 5 and again[key].equals(table[key])
    assert np.allclose(again["score"], table["score"], atol=1e-5)
    moved = again["item_idx"] != table["item_idx"]
    tied = [np.isclose(table["score"], table.groupby("user_idx")["score"].shift(s), atol=1e-5) for s in (1, -1)]
    assert not (moved & ~tied[0] & ~tied[1]).any()


def test_popular_top_ranks_by_training_interactions():
    import numpy as np

    from ray_jobs.recommend import popular_top
    top, scores = popular_top(np.array([0, 5, 9, 9, 1]), 2, 3)
    assert top.tolist() == [[2, 3, 1]] * 2 and np.allclose(scores[0], [9 / 24, 9 / 24, 5 / 24])


@pytest.mark.slow
def test_a_tracking_outage_mid_run_loses_no_metric_and_raises_nothing(tmp_path, free_port):
    """The worker's metric logger against a real MLflow server that is stopped mid-run and started
    again: logging during the outage neither raises nor blocks for long, warns, and every metric
    arrives once the server is back."""
    import signal
    import time
    import urllib.request

    from ray_jobs.tracking import MetricLogger
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_PORT": str(port),
           "MLFLOW_DB": str(tmp_path / "server.db"), "MLFLOW_ARTIFACTS": str(tmp_path / "artifacts")}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([str(ROOT / "infra/local/mlflow-up.sh")], env=env, start_new_session=True,
                                stdout=open(tmp_path / "server.log", "a"), stderr=subprocess.STDOUT)
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                return proc
            except OSError:
                time.sleep(0.5)
        pytest.fail((tmp_path / "server.log").read_text()[-2000:])

    def stop(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)

    server = start()
    try:
        client = mlflow.MlflowClient(url)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        preset = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        logger = MetricLogger(url, run_id, flush_every=5, system_metrics_every=60, retry_after=0.0, final_wait=120)
        for step in range(10):
            logger.log(step, {"train/loss": 1.0 / (step + 1)})
        stop(server)
        with pytest.warns(RuntimeWarning, match="MLflow tracking unreachable"):
            for step in range(10, 20):
                logger.log(step, {"train/loss": 1.0 / (step + 1)})
        # the metrics are kept, and a flush against the dead server makes one attempt, not MLflow's
        # default backoff series, while the logger lives (its setting is taken back at close)
        assert logger.buffer and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == (preset or "1")
        server = start()
        with pytest.warns(RuntimeWarning, match="MLflow tracking back after"):
            logger.close()
        assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == preset
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(20))
    finally:
        stop(server)


@pytest.mark.slow
def test_a_resumed_run_links_the_run_it_resumes_whatever_became_of_it(tmp_path):
    """`start_run(resumes=...)`: a run left RUNNING is ended KILLED and both are tagged; a finished
    one keeps its status; a deleted or unknown one is let be — the new run starts either way."""
    from jobs.contracts import Tag
    from ray_jobs import tracking
    spec = load_spec("movielens-100k-smoke", [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    client = mlflow.MlflowClient(spec.tracking.uri)

    def finished_run() -> str:
        run_id = tracking.start_run(spec, "r", "train")
        tracking.end_open_runs("FINISHED")
        return run_id
    lost, done, deleted = finished_run(), finished_run(), finished_run()
    client.update_run(lost, status="RUNNING")  # as a driver that died leaves it
    client.delete_run(deleted)
    for previous, status in ((lost, "KILLED"), (done, "FINISHED")):
        new = tracking.start_run(spec, "r", "train", resumes=previous)
        assert client.get_run(new).data.tags[Tag.RESUMES] == previous and client.get_run(new).info.status == "RUNNING"
        old = client.get_run(previous)
        assert old.info.status == status and old.data.tags[Tag.RESUMED_BY] == new
    assert client.get_run(tracking.start_run(spec, "r", "train", resumes=deleted)).data.tags[Tag.RESUMES] == deleted
    with pytest.warns(RuntimeWarning, match="could not be linked"):
        tracking.start_run(spec, "r", "train", resumes="0" * 32)
    assert Tag.RESUMED_BY not in client.get_run(deleted).data.tags
    tracking.end_open_runs("FINISHED")


def test_a_local_ray_started_by_a_job_refuses_clients_without_its_token(tmp_path):
    """A job without a cluster address starts its own Ray with a fresh token (Ray's GCS and raylet
    listen on every interface): a client on the same machine without the token is refused, the job
    itself runs tasks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import subprocess, sys
from jobs.spec import load_spec
from ray_jobs.runtime import init_ray
init_ray(load_spec("movielens-100k-smoke", ["cluster.num_cpus=1"]))
import ray
assert ray.get(ray.remote(lambda: 41).remote()) + 1 == 42
address = ray.get_runtime_context().gcs_address
client = "import ray\\ntry:\\n    ray.init(address=%r)\\n    print('CONNECTED')\\nexcept Exception as e:\\n    print('REFUSED', type(e).__name__)" % address
out = subprocess.run([sys.executable, "-c", client], env={env!r}, capture_output=True, text=True, timeout=120)
print(out.stdout)
ray.shutdown()
""")
    done = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REFUSED" in done.stdout and "CONNECTED" not in done.stdout, done.stdout


def test_recommendations_replace_only_their_own_model_and_version_and_never_a_table_they_cannot_read(tmp_path):
    """Version 1 of model B does not delete version 1 of model A; a rerun replaces its own rows; a
    table that exists but can't be opened is an error, not an empty table to overwrite."""
    import numpy as np
    from deltalake import DeltaTable

    from jobs.lake import table_path
    from ray_jobs.recommend import recommendations_table, write_recommendations
    spec = load_spec("movielens-100k-smoke", [f"lake.root={tmp_path}"])
    users, items = np.array([1, 2]), ["", "a", "b", "c"]

    def rows(name: str, first: int):
        top = np.array([[first, 2], [3, first]])
        return recommendations_table(users, {1: "u1", 2: "u2"}, items, top, np.ones((2, 2), np.float32), name, "1")

    write_recommendations(spec, rows("A", 1), "A", "1")
    write_recommendations(spec, rows("B", 1), "B", "1")
    write_recommendations(spec, rows("A", 3), "A", "1")  # rerun of A v1 with other lists
    table = DeltaTable(table_path(spec, "recommendations")).to_pandas()
    assert sorted(table.groupby("model_name").size().items()) == [("A", 4), ("B", 4)]
    assert sorted(table[table.model_name == "A"]["item_idx"]) == [2, 3, 3, 3]
    log = Path(table_path(spec, "recommendations")) / "_delta_log"
    for f in log.glob("*.json"):
        f.write_text("{not json")
    before = sorted(p.name for p in Path(table_path(spec, "recommendations")).glob("*.parquet"))
    from deltalake.exceptions import DeltaError
    with pytest.raises(DeltaError, match="Json error"):
        write_recommendations(spec, rows("C", 1), "C", "1")
    assert sorted(p.name for p in Path(table_path(spec, "recommendations")).glob("*.parquet")) == before
