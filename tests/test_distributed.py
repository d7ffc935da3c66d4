"""Ray Train + DeepSpeed jobs on real Ray, real DeepSpeed (CPU, gloo) and real MLflow, MovieLens-100K.

In process, on the session's local Ray: two workers against one process (SASRec, and HSTU with its
time bias in a refit stopped by its budget), a worker killed mid-run, a run resumed by name, distributed
evaluation against the single-process evaluator, HLLM on ZeRO-3, alignment. The launch paths
(`ray job submit`, the Jobs API) are in test_submit.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from jobs.contracts import Tag
from jobs.spec import load_spec, tracking_uri
from ray_jobs.checkpoint import load_model, read_model
from ray_jobs.data import load_sequences
from ray_jobs.scoring import evaluate_split, load_for_catalogue, scorer
from ray_jobs.train import run, train_local

SMOKE = "jobs/specs/movielens-100k-smoke.yaml"
pytestmark = pytest.mark.slow
TIMING = {"seconds", "seq_per_s", "tokens_per_s", "peak_rss_gib"}


def _same_history(a: list[dict], b: list[dict], metric_tol: float) -> None:
    """Equal records but for timings: the loss within float noise, ranking metrics within
    `metric_tol` (weights that differ by float noise can swap a near-tie)."""
    assert [sorted(set(r) - TIMING) for r in a] == [sorted(set(r) - TIMING) for r in b]
    for x, y in zip(a, b):
        for k in set(x) - TIMING:
            tol = 1e-4 if k in ("loss", "lr") else metric_tol
            assert x[k] == pytest.approx(y[k], rel=tol, abs=tol), (k, x[k], y[k])


def _close_weights(a: dict, b: dict, max_tol: float = 3e-3) -> None:
    # Adam turns float-noise gradients (e.g. attention key biases, whose true gradient is zero) into
    # lr-sized steps, so single weights may drift by ~lr; the bulk of the weights agree.
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().ravel() for k in a])
    assert diffs.median() < 1e-6 and diffs.max() < max_tol, (diffs.median(), diffs.max())


def test_the_local_instances_detached_helper_actors_start_quiet(local_ray):
    """Ray Train's PlacementGroupCleaner (a detached actor of the job) polls the State API, which a
    local instance without the dashboard lacks: every worker process of the job, detached ones
    included, starts with that logger at ERROR (`worker_setup.quiet_state_api_pollers`), and with Ray
    Train's preemption watcher off (a process per run, with no other machine to watch)."""
    import logging

    import ray

    from ray_jobs.worker_setup import PLACEMENT_GROUP_CLEANER

    @ray.remote(num_cpus=0)
    class Probe:
        def level(self) -> int:
            return logging.getLogger(PLACEMENT_GROUP_CLEANER).getEffectiveLevel()
        def preemption_watcher(self) -> str | None:
            return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    probe = Probe.options(lifetime="detached").remote()
    try:
        assert ray.get(probe.level.remote()) == logging.ERROR
        assert ray.get(probe.preemption_watcher.remote()) == "0"  # no watcher process per run on one machine
    finally:
        ray.kill(probe)


def test_zero2_two_workers_match_single_process(tmp_path, local_ray, ray_overrides):
    spec = load_spec(SMOKE, ray_overrides(tmp_path, "dist-eq", "train.epochs=2", "train.deepspeed=zero2"))
    out = run(spec)
    assert out.epochs_run == 2 and out.steps == 2 * 19 and out.best_epoch in (1, 2)

    # the same spec in one process, same seeds, same global batches, same negative pool per step
    single = train_local(spec, resume=False)
    assert single.steps == out.steps
    dist_model, ckpt = load_model(out.model_file)
    local_model, local_ckpt = load_model(single.checkpoint)
    assert ckpt.progress.best_epoch == single.best_epoch
    _close_weights(ckpt.weights, local_ckpt.weights)
    data = load_sequences(spec)
    hist = data.valid.histories[:200]
    assert torch.allclose(scorer(dist_model, 50)(hist), scorer(local_model, 50)(hist), atol=1e-3)
    _same_history(ckpt.progress.history, single.history, metric_tol=5e-3)
    assert ckpt.progress.history[1]["loss"] < ckpt.progress.history[0]["loss"]

    # distributed evaluation of the saved model equals the single-process evaluator exactly
    loaded = load_for_catalogue(out.model_file, data.catalogue)
    reference = evaluate_split(spec, loaded.score_function(), data, "test", scorable=loaded.scorable).metrics
    assert out.test == reference and reference["unscorable_items"] == 333  # the cold items an ID model never saw
    # the job scored its shards in the driver (one node, no GPU); on Ray tasks, as on a cluster: the same
    from ray_jobs.runtime import evaluate_distributed
    assert evaluate_distributed(spec, out.model_file, ("test",), 2, data, tasks=True)["test"].metrics == reference

    # MLflow: params, per-step metrics from rank 0, the registered pyfunc behind the challenger alias
    mlflow.set_tracking_uri(spec.tracking.uri)
    mlflow.set_registry_uri(spec.tracking.uri)
    client = mlflow.MlflowClient()
    run_ = client.get_run(out.run_id)
    assert run_.data.params["train.workers"] == "2" and run_.data.params["delta_version.sequences"] == "0"
    assert run_.data.tags["llmrec.kind"] == "train" and len(run_.data.tags["git.commit"]) >= 7
    assert len(client.get_metric_history(out.run_id, "train/loss")) == out.steps
    assert run_.data.metrics["final_test/hr_at_10"] == pytest.approx(reference["hr@10"])
    assert "system/cpu_utilization_percentage" in run_.data.metrics
    artifacts = {a.path for a in client.list_artifacts(out.run_id, "plots")}
    assert artifacts == {"plots/metrics_vs_k.png", "plots/training_curves.png"}
    version = client.get_model_version_by_alias("dist-eq", "challenger")
    assert int(version.version) == out.model.model_version == 1
    model = mlflow.pyfunc.load_model("models:/dist-eq@challenger")
    history = data.test.histories[0]
    ids = data.catalogue.item_ids
    pred = model.predict(pd.DataFrame({"history": [[ids[i] for i in history] + ["no-such-item"]]}), params={"k": 20})
    items, scores = pred["item_ids"][0], pred["scores"][0]
    assert pred["unknown_history_items"][0] == 1  # skipped and counted
    assert len(items) == 20 and not set(items) & {ids[i] for i in history} and scores == sorted(scores, reverse=True)
    expected = torch.topk(loaded.score_function()([history])[0].index_fill(0, torch.as_tensor(np.append(history, 0)),
                                                                           float("-inf")), 20).indices.tolist()
    assert items == [ids[i] for i in expected]


def test_hstu_with_its_time_bias_on_two_workers_matches_single_process(tmp_path, local_ray, ray_overrides):
    """HSTU under Ray Train + DeepSpeed as SASRec: each worker's shard carries its events' timestamps
    (and, with the target-time bias, the time of each prediction) beside the item ids. Also the one
    loop's other stop: a refit (no validation split) stopped by its time budget in epoch 1, which is
    evaluated (on test) and shipped, the same on Ray as in one process."""
    spec = load_spec(SMOKE, ray_overrides(tmp_path, "dist-hstu", "model.kind=hstu", "model.time_buckets=64",
                                          "model.query_time=target", "model.attention_dim=8", "model.block=original",
                                          "train.epochs=3", "train.eval_every=2", "train.deepspeed=zero2",
                                          "train.fit_on=train_valid", "train.max_minutes=0.000001"))
    out = run(spec, register=False)
    single = train_local(spec, resume=False)
    dist_model, ckpt = load_model(out.model_file)
    local_model, local_ckpt = load_model(single.checkpoint)
    assert single.stopped == out.stopped == "time_budget" and single.epochs_run == out.epochs_run == 1
    assert "test_ndcg@10" in single.history[0] and single.best_epoch == ckpt.progress.best_epoch == 1
    assert out.steps == single.steps > 0 and ckpt.spec.model.block == "original"
    _close_weights(ckpt.weights, local_ckpt.weights)
    _same_history(ckpt.progress.history, single.history, metric_tol=5e-3)
    data = load_sequences(spec)
    stamps = data.valid.stamps()[:200]
    assert torch.allclose(scorer(dist_model, 50)(data.valid.histories[:200], stamps),
                          scorer(local_model, 50)(data.valid.histories[:200], stamps), atol=1e-3)


def test_worker_killed_mid_run_restarts_from_checkpoint_and_rerun_resumes(tmp_path, local_ray, ray_overrides):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    spec = load_spec(SMOKE, ray_overrides(tmp_path, "dist-ft", "train.epochs=2", "train.checkpoint_every=5",
                                          "train.max_failures=2", "train.deepspeed=zero1"))
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.append(run(spec, pid_dir=str(pid_dir), register=False)))
    thread.start()
    snapshot = tmp_path / "ray" / "dist-ft" / "checkpoint_manager_snapshot.json"

    def registered() -> list:
        try:
            return json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            return []

    # kill once the controller has registered a checkpoint (a folder alone may still be uploading)
    deadline = time.time() + 600
    while time.time() < deadline and not registered() and thread.is_alive():
        time.sleep(0.1)
    assert registered() and thread.is_alive(), "no mid-run checkpoint was registered"
    victim = int((pid_dir / "rank1.pid").read_text())
    assert "libjemalloc" in Path(f"/proc/{victim}/maps").read_text()  # cluster.cpu_allocator=auto, a CPU run
    os.kill(victim, signal.SIGKILL)
    thread.join(900)
    assert outcomes, "the run did not finish after the worker was killed"
    result = outcomes[0]
    assert result.restarts >= 1 and result.steps == 2 * 19 and result.epochs_run == 2

    # started again under the same name with another learning rate: another run, refused by the driver
    # before any worker starts (the checkpoint records the run's spec), naming the change
    from ray_jobs.loop import RunMismatch
    with pytest.raises(RunMismatch, match=r"train\.lr: .* -> 0\.0123"):
        run(load_spec(SMOKE, ray_overrides(tmp_path, "dist-ft", "train.epochs=3", "train.deepspeed=zero1",
                                           "train.lr=0.0123")), register=False)
    # the machine goes away: the run's newest checkpoint, kept elsewhere (without DeepSpeed's scripts),
    # is restored into a fresh storage; started again under the same name with a longer schedule, the
    # run resumes from it and trains only epoch 3
    from ray_jobs.runtime import keep_run_progress, restore_run_progress
    longer = load_spec(SMOKE, ray_overrides(tmp_path, "dist-ft", "train.epochs=3", "train.deepspeed=zero1"))
    assert keep_run_progress(longer, "dist-ft", tmp_path / "kept")["epoch"] == 2
    assert not list((tmp_path / "kept").rglob("*.py"))
    shutil.rmtree(tmp_path / "ray" / "dist-ft")
    assert restore_run_progress(longer, "dist-ft", tmp_path / "kept")
    assert not restore_run_progress(longer, "dist-ft", tmp_path / "kept")  # the storage holds the run now
    # its MLflow run left RUNNING, as a driver lost with its machine leaves it: the resumed run links to
    # it (the kept checkpoint names it) and ends it KILLED
    client = mlflow.MlflowClient(tracking_uri(longer))
    client.update_run(result.run_id, status="RUNNING")
    again = run(longer, register=False)
    history = read_model(again.model_file).progress.history
    assert again.steps == 3 * 19 and [h["epoch"] for h in history] == [1, 2, 3]
    assert again.restarts == result.restarts + 1
    first = client.get_run(result.run_id)
    assert again.run_id != result.run_id and client.get_run(again.run_id).data.tags[Tag.RESUMES] == result.run_id
    assert first.info.status == "KILLED" and first.data.tags[Tag.RESUMED_BY] == again.run_id


def test_hllm_cached_on_two_workers_ships_its_item_cache_and_links_the_parent_run(tmp_path, warm_cache, local_ray,
                                                                                  ray_overrides):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("llmrec")
    with mlflow.start_run(run_name="dagster-parent") as parent:
        pass
    spec = load_spec(SMOKE, ray_overrides(tmp_path, "dist-hllm", "train.epochs=1", "model.kind=hllm",
                                          f"model.cache_dir={tmp_path}/cache", f"tracking.parent_run_id={parent.info.run_id}",
                                          "tracking.dagster_run_id=abc123", "train.deepspeed=zero3"))
    out = run(spec)
    client = mlflow.MlflowClient()
    tags = client.get_run(out.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["dagster.run_id"] == "abc123"
    local = mlflow.artifacts.download_artifacts(f"runs:/{out.run_id}/model", dst_path=str(tmp_path / "dl"))
    shipped = list(Path(local).rglob("items-*/embeddings.safetensors"))
    assert len(shipped) == 1 and list(Path(local).rglob("catalogue.parquet"))
    # the registered model loads and scores with the shipped cache only (the original cache is gone)
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    model = mlflow.pyfunc.load_model("models:/dist-hllm@challenger")
    pred = model.predict(pd.DataFrame({"history": [["1", "2", "3"]]}), params={"k": 7})
    assert len(pred["item_ids"][0]) == 7 and not list((tmp_path / "cache").iterdir())
    assert out.test["hr@10"] > 0


def test_a_generative_model_on_two_workers_reads_the_drivers_tokenizer_and_recommends(tmp_path, warm_cache, local_ray,
                                                                                      ray_overrides):
    """model.kind=generative on Ray: the driver runs the tokenizer stage once (its figures in the MLflow
    run, its report as an artifact), both workers build the generator from those files, the shipped
    model pins that table, and the recommend job ranks with it (only real, unseen items). On ZeRO-3
    at a width whose decoder weights are partitioned (above stage3_param_persistence_threshold),
    which the decoding steps read as attributes inside the training module's forward."""
    from deltalake import DeltaTable

    from ray_jobs import recommend
    spec = load_spec(SMOKE, ray_overrides(tmp_path, "dist-gen", "model.kind=generative", "model.dim=64",
                                          "model.tokenizer_steps=60", f"model.cache_dir={warm_cache}",
                                          "train.epochs=1", "train.deepspeed=zero3"))
    out = run(spec, register=False)  # (registration and the pyfunc: test_generative)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    report = json.loads(Path(client.download_artifacts(out.run_id, "tokenizer.json", str(tmp_path))).read_text())
    assert report["steps"] == 60 and report["restarts"] == 0 and len(report["curve"]) == 11
    history = client.get_metric_history(out.run_id, "tokenizer_eval/recon_mse")
    assert [m.step for m in history] == [r["step"] for r in report["curve"]]
    assert len(list((warm_cache / "semantic-ids").glob("*.parquet"))) == 1  # fitted once, by the driver
    model = read_model(out.model.model_file).build()
    assert model.table_hash == report["hash"] and out.test["hr@10"] > 0
    rec = recommend.run(spec, out.model.model_file, k=10, workers=1)
    table = DeltaTable(rec.table).to_pandas()
    table = table[table["model_name"] == rec.model_name]  # the shared lake may hold other tests' models
    data = load_sequences(spec)
    assert len(table) == rec.users * 10 and table["item_idx"].between(1, data.num_items).all()
    seen = dict(zip(data.train_users.tolist(), data.train))
    user = int(data.test.users[0])
    assert not set(table[table.user_idx == user]["item_idx"]) & set(seen[user].tolist())


def test_alignment_raises_training_reward_within_kl_and_resumes(tmp_path, local_ray, ray_overrides):
    """BLADE on 2 workers (ZeRO-2) from a briefly trained SASRec: the mean rollout reward rises,
    the KL to the reference stays bounded, a rerun with the same name resumes, the aligned model
    is evaluated against the start, logged and registered; it ships the evaluated step the gate's
    metric picks (`align.ship: gate`), and the driver's evaluation of the shipped file repeats that
    step's validation figures."""
    from ray_jobs.align import gate_step
    from ray_jobs.align import run as align
    base = ray_overrides(tmp_path, "align-smoke", "train.epochs=4", "train.negatives=512", "train.lr=0.005")
    result = train_local(load_spec(SMOKE, base))
    overrides = base + [f"align.init={result.checkpoint}", "align.method=blade", "align.lr=0.001", "align.beta=0.05",
                        "align.kl_target=1.0", "align.kl_rate=0.3",
                        "align.users_per_step=64", "align.rollouts=8", "align.eval_every=10", "align.checkpoint_every=10",
                        "align.ship=gate",
                        "align.rewards.ndcg=1.0", "align.rewards.tail=0.5"]
    first = align(load_spec(SMOKE, overrides + ["align.steps=20"]), register=False)
    assert first.steps == 20 and first.stopped == "steps"
    out = align(load_spec(SMOKE, overrides + ["align.steps=40"]), run_name=first.run_name)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps = client.get_metric_history(out.run_id, "align/reward_mean")
    assert sorted(m.step for m in steps) == list(range(21, 41))  # resumed at step 20, not started over
    history = json.loads(Path(client.download_artifacts(out.run_id, "alignment_curves.json", str(tmp_path))).read_text())
    rewards = [h["reward_mean"] for h in history["steps"]]
    assert len(rewards) == 40 and np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.005
    kls = [h["kl"] for h in history["steps"]]
    betas = [h["beta"] for h in history["steps"]]
    # adaptive KL control holds the policy near align.kl_target: beta rose while KL was above it
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and max(kls[-5:]) < 2.5 and kls[-1] < max(kls)
    assert max(betas) > betas[0]
    assert out.results["aligned_test"]["users"] == out.results["base_test"]["users"] == 943 and "ild@10" in out.results["aligned_test"]
    assert out.model.model_version == 1 and client.get_run(out.run_id).data.tags["llmrec.align.method"] == "blade"
    assert [e["step"] for e in out.evals] == [0, 10, 20, 30, 40]
    shipped = gate_step(load_spec(SMOKE, overrides).gate, out.evals)
    assert client.get_run(out.run_id).data.tags["shipped_step"] == str(shipped) == str(out.shipped["step"])
    figures = next(e for e in out.evals if e["step"] == shipped)
    assert out.results["aligned_valid"]["ndcg@10"] == pytest.approx(figures["ndcg@10"], abs=1e-5)
    model = mlflow.pyfunc.load_model("models:/align-smoke@challenger")
    pred = model.predict(pd.DataFrame({"history": [["1", "2", "3"]]}), params={"k": 5})
    assert len(pred["item_ids"][0]) == 5


def test_a_failed_run_is_marked_failed_in_mlflow(tmp_path, warm_cache, local_ray, ray_overrides):
    """A worker that cannot build its model fails the run; the MLflow run says FAILED, not RUNNING.
    (The items' embeddings come from a warm cache: the driver would embed every item first.)"""
    spec = load_spec(SMOKE, ray_overrides(tmp_path, "dist-fail", "train.epochs=1", "train.workers=1",
                                          "model.kind=hllm", f"model.cache_dir={warm_cache}",
                                          f"model.user_llm={tmp_path}/no-such-model"))
    with pytest.raises(RuntimeError, match="training run dist-fail failed"):
        run(spec, register=False)
    client = mlflow.MlflowClient(spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("llmrec").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
