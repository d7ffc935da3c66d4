"""Launch paths against a real local Ray head (infra/local/ray-up.sh, 127.0.0.1, stopped by pid):
`ray job submit` of the training job and the Jobs API (`llmrec submit`) for batch recommendations,
logging to a live MLflow server (infra/local/mlflow-up.sh); token authentication of local heads; a
cancelled Dagster run. (Alignment, evaluation and the rest go through the Jobs API in
test_dagster.py's whole-graph run.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from jobs.spec import load_spec
from ray_jobs.data import load_sequences

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path, free_port, local_server):
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_PORT": str(port),
           "MLFLOW_DB": str(tmp_path / "server.db"), "MLFLOW_ARTIFACTS": str(tmp_path / "artifacts")}
    url = f"http://127.0.0.1:{port}"
    local_server([str(ROOT / "infra/local/mlflow-up.sh")], url + "/health", env)
    return url


def test_ray_job_submit_and_jobs_api_against_a_local_head(ml100k_lake, tmp_path, ray_head, mlflow_server, ray_overrides):
    address, env = ray_head
    canary = env["LLMREC_TEST_TOKEN"]  # must appear in no MLflow param or artifact, checkpoint, log or command line
    lake = ml100k_lake
    authed = mlflow_server.replace("http://", "http://llmrec:${env:LLMREC_TEST_TOKEN}@")
    # one worker: the launch path is what this proves (two workers: test_distributed.py)
    overrides = ray_overrides(tmp_path, "dist-submit", "train.epochs=1", "train.workers=1", f"tracking.uri={authed}",
                              "lake.storage_options.AWS_SECRET_ACCESS_KEY=${env:LLMREC_TEST_TOKEN}")
    env = {**env, "RAY_AUTH_MODE": "token"}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "-m", "ray_jobs.train", "--spec", "jobs/specs/movielens-100k-smoke.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    for _ in range(40):  # a fresh head answers before its job agent is up: "No available agent"
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0 and "succeeded" in (done.stdout + done.stderr).lower(), done.stdout[-3000:] + done.stderr[-3000:]

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)  # an earlier in-process run may have set another registry
    client = mlflow.MlflowClient()
    run_ = client.search_runs([client.get_experiment_by_name("llmrec").experiment_id])[0]
    assert run_.data.params["name"] == "dist-submit" and "train/loss" in run_.data.metrics
    model = mlflow.pyfunc.load_model("models:/dist-submit@challenger")
    pred = model.predict(pd.DataFrame({"history": [["1", "2", "3"], ["50"]]}), params={"k": 5})
    assert [len(x) for x in pred["item_ids"]] == [5, 5] and "2" not in pred["item_ids"][0]

    # the Jobs API path (what Dagster uses): batch recommendations from the registered model
    rec = subprocess.run([str(BIN / "llmrec"), "submit", "recommend", "--address", address,
                          "--spec", "jobs/specs/movielens-100k-smoke.yaml", *sum((["--set", o] for o in overrides), []),
                          "--job-arg=--model=models:/dist-submit@challenger", "--job-arg=--k=10"],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-3000:]
    table = DeltaTable(f"{lake}/movielens-100k/gold/recommendations").to_pandas()
    table = table[table["model_name"] == "dist-submit"]  # the shared lake may hold other tests' models
    assert len(table) == 943 * 10 and set(table["model_version"]) == {"1"} and table["rank"].max() == 10
    seen = load_sequences(load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={lake}"])).test
    first = table[table.user_idx == int(seen.users[0])]
    history = set(np.append(seen.histories[0], seen.targets[0]).tolist())
    assert len(first) == 10 and not set(first["item_idx"]) & history
    # what that job uploaded: the code and specs, not the history, the measurements or the docs; its
    # commit travels as a variable
    from jobs.provenance import COMMIT_ENV, commit
    job = next(j for j in _jobs_api(address, "/api/jobs/") if "ray_jobs.recommend" in j["entrypoint"])
    assert job["runtime_env"]["env_vars"][COMMIT_ENV] == commit() != ""
    package = job["runtime_env"]["working_dir"].rsplit("/", 1)[-1].removesuffix(".zip")
    uploaded = next(Path(env["RAY_HEAD_DIR"]).rglob(f"working_dir_files/{package}"))
    assert (uploaded / "ray_jobs/recommend.py").is_file() and (uploaded / "jobs/specs/movielens-100k-smoke.yaml").is_file()
    assert [p for p in (".git", "bench", "docs") if (uploaded / p).exists()] == []

    # the credential reached the jobs (they logged through the authenticated URI, read the lake with
    # the storage option) and was written nowhere: MLflow's store and artifacts, checkpoints, Ray
    # storage, the head's logs, the jobs' output and command lines
    outputs = [done.stdout, done.stderr, rec.stdout, rec.stderr]
    outputs += [j["entrypoint"] for j in _jobs_api(address, "/api/jobs/")]
    assert any("${env:LLMREC_TEST_TOKEN}" in o for o in outputs[4:])
    assert not [o[max(o.find(canary) - 300, 0):o.find(canary) + 50] for o in outputs if canary in o]
    leaks = [str(f) for folder in (tmp_path, Path(env["RAY_HEAD_DIR"])) for f in folder.rglob("*")
             if f.is_file() and canary.encode() in f.read_bytes()]
    assert not leaks, leaks


def _token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser().read_text().strip()


def _jobs_api(address: str, path: str, token: bool = True):
    """GET on a head's Jobs API (with the head's token unless `token` is False)."""
    import json
    import urllib.request
    headers = {"Authorization": f"Bearer {_token()}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(address + path, headers=headers), timeout=10) as r:
        return json.loads(r.read())


def _group_alive(pgid: int) -> bool:
    """Some process of the group still runs (exited ones that wait to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_local_heads_require_the_token_and_stop_by_their_own_process_group(tmp_path, ray_head):
    """Two heads on one machine (a fresh one, a, and the module's, b): the Jobs API refuses a request
    without the token; ray-down.sh stops every process of its own head (by the recorded process
    group) and leaves the other running."""
    import urllib.error
    from conftest import head_env
    a, b = head_env(1), ray_head[1]
    try:
        up = subprocess.run([str(ROOT / "infra/local/ray-up.sh")], env=a, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr
        address = f"http://127.0.0.1:{a['RAY_DASHBOARD_PORT']}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            _jobs_api(address, "/api/jobs/", token=False)
        assert refused.value.code == 401
        assert _jobs_api(address, "/api/jobs/") == []
        pgid_a = int(Path(a["RAY_HEAD_DIR"], "head.pgid").read_text())
        pgid_b = int(Path(b["RAY_HEAD_DIR"], "head.pgid").read_text())
        assert oct(Path(a["RAY_HEAD_DIR"]).stat().st_mode & 0o777) == "0o700"
        record_b = Path(b["RAY_HEAD_DIR"], "head.record").read_text()
        subprocess.run([str(ROOT / "infra/local/ray-down.sh")], env=a, check=True, capture_output=True, timeout=120)
        assert not _group_alive(pgid_a)  # nothing of head a outlives ray-down.sh
        assert _group_alive(pgid_b)
        # planted or stale records under head a's folder stop nothing: head b's group with a wrong start
        # time, a record naming this test's own process, and the same again once the head is gone
        fields = dict(line.split("=", 1) for line in record_b.split())
        for planted in ({**fields, "start": "1"}, {**fields, "pid": str(os.getpid())},
                        {**fields, "pgid": str(os.getpgid(0))}):
            Path(a["RAY_HEAD_DIR"], "head.record").write_text("".join(f"{k}={v}\n" for k, v in planted.items()))
            down = subprocess.run([str(ROOT / "infra/local/ray-down.sh")], env=a, capture_output=True, text=True,
                                  timeout=120)
            assert down.returncode == 0 and "stopping nothing" in down.stdout, down.stdout + down.stderr
            assert _group_alive(pgid_b)
        assert isinstance(_jobs_api(f"http://127.0.0.1:{b['RAY_DASHBOARD_PORT']}", "/api/jobs/"), list)  # b answers
    finally:
        subprocess.run([str(ROOT / "infra/local/ray-down.sh")], env=a, capture_output=True, timeout=120)


def test_a_cancelled_dagster_run_stops_its_ray_job_and_the_mlflow_run_ends_killed(ml100k_lake, tmp_path, ray_head,
                                                                                   ray_overrides):
    """`dagster asset materialize` of trained_model against a local head, interrupted once training runs:
    dagster-ray stops the Ray job, the job's SIGTERM handler ends its MLflow run as KILLED (never left
    RUNNING), and the Ray job is STOPPED."""
    import signal

    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient
    address, env = ray_head
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ray_overrides(tmp_path, "cancelled", "train.epochs=200", "train.workers=1", f"tracking.uri={uri}",
                              "train.batch_size=32")
    config = {"resources": {"spec": {"config": {"spec_path": "jobs/specs/movielens-100k-smoke.yaml",
                                                "overrides": overrides}},
                            "ray": {"config": {"address": address}}, "mlflow": {"config": {"tracking_uri": uri}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    home = tmp_path / "dagster"
    home.mkdir()
    run_env = {**env, "DAGSTER_HOME": str(home), "RAY_AUTH_MODE": "token"}
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    earlier = {j.submission_id for j in JobSubmissionClient(address).list_jobs()}  # the head is shared
    proc = subprocess.Popen([str(BIN / "dagster"), "asset", "materialize", "-m", "dagster_project.definitions",
                             "--select", "trained_model", "-c", str(tmp_path / "run.yaml")],
                            cwd=ROOT, env=run_env, stdout=open(tmp_path / "dagster.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_ = None
    try:
        for _ in range(240):  # until the job's run has logged a training step
            exp = client.get_experiment_by_name("llmrec")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and "train/loss" in client.get_run(runs[0].info.run_id).data.metrics:
                run_ = runs[0]
                break
            assert proc.poll() is None, "the Dagster run ended before training started: " + \
                (tmp_path / "dagster.log").read_text()[-3000:]
            time.sleep(1)
        assert run_ is not None and run_.info.status == "RUNNING"
        os.killpg(proc.pid, signal.SIGINT)  # what terminating the run does to its process
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for _ in range(60):
        if client.get_run(run_.info.run_id).info.status != "RUNNING":
            break
        time.sleep(1)
    assert client.get_run(run_.info.run_id).info.status == "KILLED"
    jobs = [j for j in JobSubmissionClient(address).list_jobs() if j.submission_id not in earlier]
    training = [j for j in jobs if j.entrypoint and "ray_jobs.train" in j.entrypoint]
    for _ in range(60):  # the job's status follows the stop within seconds
        if all(j.status.is_terminal() for j in training):
            break
        time.sleep(1)
        training = [j for j in JobSubmissionClient(address).list_jobs() if j.submission_id in
                    {t.submission_id for t in training}]
    assert training and all(j.status == JobStatus.STOPPED for j in training), [(j.entrypoint, j.status) for j in jobs]
