"""Models across catalogue versions on MovieLens-100K: a day-0 SASRec and a day-0 cached HLLM meet a
landed day that brings one new item (watched by 8 known users, with its metadata) and one new user.
Evaluation, recommendations, alignment, the registered pyfunc and warm start all take the grown
catalogue: the HLLM scores and recommends the new item from its text, the ID model counts it as
unscorable; warm start keeps every known row and initialises the new ones by their rule."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import copy_item_embeddings
from jobs.lake import published_versions
from jobs.spec import load_spec
from ray_jobs.checkpoint import read_model
from ray_jobs.data import load_sequences
from ray_jobs.models import build_model
from ray_jobs.next_day import evaluate_next_day, list_metrics, load_next_day
from ray_jobs.scoring import evaluate_split, load_for_catalogue, top_k
from ray_jobs.train import train_local
from spark.etl import ingest_day

SMOKE = "jobs/specs/movielens-100k-smoke.yaml"
NEW_ITEM, NEW_USER, DAY = "9999", "5000", "1998-04-23"  # the day after ML-100K's last rating
WATCHERS = ["1", "2", "5", "6", "7", "10", "13", "15"]
MORE = [("1", ("286", "294")), ("2", ("181", "121"))]  # known movies users 1 and 2 had not rated
DAY_TS = 893_289_600  # 1998-04-23 00:00 UTC
LANDING_ITEMS = {"columns": {"item_id": "item_id", "title": "title", "categories": "genres", "attributes": ["year"]}}


def overrides(lake, tmp, *extra) -> list[str]:
    return [f"lake.root={lake}", f"train.checkpoint_dir={tmp}/ckpt", f"model.cache_dir={tmp}/cache",
            f"data.landing={{path: {tmp}/landing, items: {LANDING_ITEMS}}}", "train.batch_size=128",
            "train.eval_every=1", *extra]


@pytest.fixture(scope="module")
def grown(tmp_path_factory, ml100k_lake, ml100k_item_embeddings, engines):
    """Day-0 models on a copy of the shared lake, then the landed day that grows the catalogue."""
    tmp = tmp_path_factory.mktemp("grown")
    lake = tmp / "lake"
    shutil.copytree(ml100k_lake, lake)
    (tmp / "landing").mkdir()
    copy_item_embeddings(tmp / "cache", ml100k_item_embeddings)
    sasrec = load_spec(SMOKE, overrides(lake, tmp, "name=day0-sasrec", "model.kind=sasrec", "model.dim=16", "model.dropout=0.0",
                                        "train.epochs=2", "train.lr=0.003"))
    hllm = load_spec(SMOKE, overrides(lake, tmp, "name=day0-hllm", "model.kind=hllm", "model.item_id_embedding=true",
                                      "train.epochs=2", "train.lr=0.005", "train.negatives=512"))
    generative = load_spec(SMOKE, overrides(lake, tmp, "name=day0-generative", "model={kind: generative, dim: 16, "
                                            "books: 3, codes: 32, tokenizer_steps: 40, max_disambiguation: 256}",
                                            f"model.cache_dir={tmp}/cache", "train.epochs=1", "train.lr=0.003"))
    day0 = {"sasrec": train_local(sasrec, resume=False).checkpoint, "hllm": train_local(hllm, resume=False).checkpoint,
            "generative": train_local(generative, resume=False).checkpoint}
    before = load_sequences(sasrec)
    rows = [f"{u},{NEW_ITEM},{DAY_TS + 60 * k},{4 + k % 2}" for k, u in enumerate(WATCHERS)]
    rows += [f"{NEW_USER},{item},{DAY_TS + 1000 + k},{4 + k % 2}" for k, item in enumerate((NEW_ITEM, 50, 181, 100, 258))]
    # two watchers go on to two known movies that day: tonight those are their validation and test
    # targets, and the new movie one of their training items
    rows += [f"{u},{item},{DAY_TS + 3000 + 60 * k},4" for u, items in MORE for k, item in enumerate(items)]
    (tmp / "landing" / f"{DAY}.csv").write_text("user_id,item_id,ts,value\n" + "\n".join(rows) + "\n")
    (tmp / "landing" / f"{DAY}.items.csv").write_text("item_id,title,genres,year\n"
                                                      f"{NEW_ITEM},Galaxy Quest,Comedy|Sci-Fi,1999\n")
    result = ingest_day(sasrec, engines.get("sail"), DAY)
    assert result.gold.published is not None and result.gold.gold.new_items == 1 and result.gold.gold.new_users == 1
    return {"tmp": tmp, "sasrec": sasrec, "hllm": hllm, "generative": generative, "day0": day0, "before": before,
            "after": load_sequences(sasrec)}


def test_day0_models_score_the_grown_catalogue(grown):
    before, after = grown["before"], grown["after"]
    new = after.catalogue.index_of()[NEW_ITEM]
    assert after.num_items == before.num_items + 1 == new and after.item_text[new].startswith("Title: Galaxy Quest")
    assert after.item_text[:new] == before.item_text  # every known index names what it named
    sasrec = load_for_catalogue(grown["day0"]["sasrec"], after.catalogue)
    hllm = load_for_catalogue(grown["day0"]["hllm"], after.catalogue)
    assert sasrec.extension.new_items == hllm.extension.new_items == 1
    assert not sasrec.scorable[new] and hllm.scorable[new]
    ev = evaluate_split(grown["sasrec"], sasrec.score_function(), after, "test", scorable=sasrec.scorable).metrics
    assert ev["unscorable_items"] == 333 + 1 and ev["candidates"] == after.num_items  # cold items + the new one
    eh = evaluate_split(grown["hllm"], hllm.score_function(), after, "test", scorable=hllm.scorable).metrics
    assert eh["unscorable_items"] == 0 and eh["users"] == 944  # the new user has a test row (3 items)
    # the HLLM ranks the new item from its text alone (two epochs of training: within some users' top
    # 200 of 1,683); the ID model never lists it
    histories = after.test.histories
    ids, scores = top_k(hllm.score_function(), histories, 200, 256, candidates=after.catalogue.active)
    assert (ids == new).any() and np.isfinite(scores).all()
    ids, _ = top_k(sasrec.score_function(), histories, 200, 256, candidates=after.catalogue.active)
    assert not (ids == new).any()
    # a fusion HLLM gives the new item a zero ID vector: its representation is its text's alone
    assert torch.all(hllm.model.id_emb.weight[new] == 0)
    cached = read_model(grown["day0"]["hllm"]).weights["item_table"]
    assert torch.equal(hllm.model.item_table[:new], cached)  # known items' embeddings as trained, bit for bit


def test_warm_start_extends_exactly(grown, tmp_path):
    from ray_jobs.loop import training_state, warm_start
    after = grown["after"]
    new = after.catalogue.index_of()[NEW_ITEM]
    for kind in ("sasrec", "hllm"):
        spec = grown[kind].model_copy(update={"train": grown[kind].train.model_copy(update={
            "init_from": grown["day0"][kind], "checkpoint_dir": str(tmp_path)})})
        start = warm_start(spec, after)
        assert start.path == grown["day0"][kind] and start.tag.startswith("extended (+1 items, 0 texts changed)")
        state = training_state(spec, after, torch.device("cpu"), start.path)
        trained = read_model(grown["day0"][kind]).weights
        weights = state.model.state_dict()
        for key, value in trained.items():
            if value.shape == weights[key].shape:
                assert torch.equal(weights[key], value), key  # every other weight as trained
            else:
                assert torch.equal(weights[key][:new], value), key  # known rows bit-equal
        if kind == "sasrec":  # the model's own initialisation: the row a cold start of this run would have
            torch.manual_seed(spec.train.seed)
            fresh = build_model(spec, after.item_text).state_dict()["item_emb.weight"][new]
            assert torch.equal(weights["item_emb.weight"][new], fresh) and fresh.abs().sum() > 0
        else:
            assert torch.all(weights["id_emb.weight"][new] == 0)
        assert all(not s for s in state.optimizer.state.values())  # the optimizer starts afresh
    after.catalogue.item_ids[3], kept = "renumbered", after.catalogue.item_ids[3]
    try:
        spec = grown["sasrec"].model_copy(update={"train": grown["sasrec"].train.model_copy(update={
            "init_from": grown["day0"]["sasrec"]})})
        fallback = warm_start(spec, after)
        assert fallback.path is None and fallback.tag.startswith("fresh start:") and "index 3" in fallback.tag
    finally:
        after.catalogue.item_ids[3] = kept


def test_the_registered_pyfunc_speaks_source_ids_over_the_grown_catalogue(grown, tmp_path, local_server, free_port):
    """A day-0 HLLM registered with today's catalogue: raw ids in and out, unknown history items
    skipped and counted, the new item recommendable from its text, never padding or an inactive item
    — in process and through a real `mlflow models serve` on 127.0.0.1."""
    import mlflow

    from ray_jobs import serving, tracking
    after = grown["after"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = grown["hllm"].model_copy(update={"tracking": grown["hllm"].tracking.model_copy(update={"uri": uri})})
    run_id = tracking.start_run(spec, "pyfunc", "train")
    version = serving.log_recommender(spec, run_id, grown["day0"]["hllm"], after.catalogue)
    model = mlflow.pyfunc.load_model(f"models:/{spec.registered_model_name()}/{version}")
    ids = after.catalogue.item_ids
    histories = [[ids[i] for i in h] for h in after.test.histories[:40]]
    ranked = top_k(load_for_catalogue(grown["day0"]["hllm"], after.catalogue).score_function(), after.test.histories,
                   200, 256, candidates=after.catalogue.active)[0]
    histories = [[ids[i] for i in after.test.histories[j]] for j in np.flatnonzero((ranked == len(ids) - 1).any(1))][:40]
    out = model.predict(pd.DataFrame({"history": [h + ["not-an-item"] for h in histories]}), params={"k": 200})
    assert out["unknown_history_items"].tolist() == [1] * len(histories)
    assert all(len(r) == 200 and "" not in r and not set(r) & set(h) for r, h in zip(out["item_ids"], histories))
    assert any(NEW_ITEM in r for r in out["item_ids"]) and all(np.isfinite(s).all() for s in out["scores"])

    import json
    import os
    import sys
    import urllib.request
    from pathlib import Path
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    local_server([mlflow_bin, "models", "serve", "-m", f"models:/{spec.registered_model_name()}/{version}",
                  "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                 f"http://127.0.0.1:{port}/ping", env)
    body = json.dumps({"dataframe_split": {"columns": ["history"], "data": [[histories[0] + ["not-an-item"]]]},
                       "params": {"k": 10}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"][0]
    assert answer["item_ids"] == out["item_ids"][0][:10] and answer["unknown_history_items"] == 1
    assert all(isinstance(i, str) for i in answer["item_ids"])


def test_next_day_metrics_of_the_models_that_served_the_day(grown):
    """Day 1's queries from the lake: users active that day, their history before it, the day's new
    items as targets; the new user's history is empty (popular items); Recall/NDCG by hand."""
    spec, after = grown["sasrec"], grown["after"]
    q = load_next_day(spec, published_versions(spec), DAY)
    new = after.catalogue.index_of()[NEW_ITEM]
    assert len(q) == 9 and q.new_item[new] and q.new_user.sum() == 1  # 8 watchers + the new user
    assert all(new in t for t in q.targets) and sum(len(h) == 0 for h in q.histories) == 1
    for kind in ("sasrec", "hllm"):
        loaded = load_for_catalogue(grown["day0"][kind], after.catalogue)
        r = evaluate_next_day(loaded.score_function(), q, after.catalogue.active, loaded.scorable, 50)
        assert r.metrics["users"] == 9 and 0 <= r.metrics["ndcg@10"] <= 1
        assert r.slices["new_users"]["users"] == 1 and r.slices["new_items"]["users"] == 9
        assert r.metrics["unscorable_items"] == (334 if kind == "sasrec" else 0)
    top = np.array([[5, 7, 9], [2, 3, 4]])
    m = list_metrics(top, [np.array([7, 4, 8]), np.array([1])], ks=(3,))
    dcg = 1 / np.log2(3)  # user 0: hit at rank 2 of 3 relevant
    assert m["recall@3"] == pytest.approx((1 / 3 + 0) / 2) and m["hr@3"] == 0.5
    assert m["ndcg@3"] == pytest.approx((dcg / (1 + 1 / np.log2(3) + 1 / np.log2(4))) / 2)


def test_a_generative_warm_start_keeps_its_token_table_and_tokenizes_the_new_item(grown, tmp_path):
    """A warm start never refits the tokenizer (it would remap every item): the day-0 model's table and
    quantizer come from its checkpoint, the landed item gets tokens from its text through them, and
    the run trains from there."""
    from ray_jobs.loop import training_state, warm_start
    after = grown["after"]
    new = after.catalogue.index_of()[NEW_ITEM]
    spec = grown["generative"].model_copy(update={"train": grown["generative"].train.model_copy(update={
        "init_from": grown["day0"]["generative"], "checkpoint_dir": str(tmp_path), "epochs": 1})})
    start = warm_start(spec, after)
    assert start.tag.startswith("extended (+1 items")
    state = training_state(spec, after, torch.device("cpu"), start.path)
    trained = read_model(grown["day0"]["generative"]).weights
    tokens = state.model.tokens
    assert torch.equal(tokens[:new], trained["tokens"][:new]) and int(state.model.table_items) == new
    assert tokens[new].abs().sum() > 0 and tuple(tokens[new].tolist()) not in {tuple(r) for r in tokens[1:new].tolist()}
    assert state.model.table_hash == state.model.table().hash
    result = train_local(spec, after)
    assert result.epochs_run == 1 and np.isfinite(result.history[-1]["loss"])


def test_recommend_and_align_take_a_day0_model_over_the_grown_catalogue(grown, local_ray, tmp_path):
    from deltalake import DeltaTable

    from ray_jobs import recommend
    from ray_jobs.align import run as align
    spec = grown["hllm"].model_copy(update={"train": grown["hllm"].train.model_copy(update={
        "storage_path": str(tmp_path / "ray"), "workers": 1, "max_failures": 0}),
        "tracking": grown["hllm"].tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/mlflow.db"})})
    out = recommend.run(spec, grown["day0"]["hllm"], k=200, workers=1)
    table = DeltaTable(out.table).to_pandas()
    mine = table[table["model_version"] == out.model_version]
    assert NEW_USER in set(mine["user_id"]) and (mine["item_id"] == NEW_ITEM).any()
    assert np.isfinite(mine["score"]).all() and (mine["item_idx"] > 0).all() and out.unscorable_items == 0
    # aligned on the landed day's interactions (the next-day reward source): the day-0 model never saw
    # them — its data ends before the day (checked) — and only the two users with a reward left after
    # their validation and test targets are aligned (the holdout would give a batch of 16)
    a = spec.align.model_copy(update={"init": grown["day0"]["hllm"], "steps": 1, "users_per_step": 16, "rollouts": 4,
                                      "eval_every": 0, "checkpoint_every": 0, "reward_day": DAY,
                                      "allow_seen_rewards": False})
    aligned = align(spec.model_copy(update={"align": a}), register=False)
    assert aligned.steps == 1 and np.isfinite(aligned.last_step["reward_mean"]) and aligned.last_step["users"] == 2
    assert read_model(aligned.model_file).num_items == grown["after"].num_items  # aligned on today's catalogue


def test_pars_is_refused_before_ray_starts_for_a_start_model_without_tokens(grown):
    from ray_jobs.align import with_init_model
    spec = grown["sasrec"].model_copy(update={"align": grown["sasrec"].align.model_copy(update={"method": "pars"})})
    with pytest.raises(ValueError, match="align.method=pars .* model.kind='sasrec' has none"):
        with_init_model(spec, read_model(grown["day0"]["sasrec"]), "day0", None)
    generative = grown["generative"].model_copy(update={"align": spec.align})
    assert with_init_model(generative, read_model(grown["day0"]["generative"]), "day0", None).model.kind == "generative"


def user_idx(spec, source_ids: list[str]) -> list[int]:
    from deltalake import DeltaTable

    from jobs.lake import table_path
    users = DeltaTable(table_path(spec, "user_index")).to_pandas()
    return [int(users.loc[users.user_id == u, "user_idx"].iloc[0]) for u in source_ids]


def test_the_reward_day_aligns_the_users_of_the_day_and_refuses_a_model_that_saw_it(grown):
    from ray_jobs.align import align_data, check_trained_before, with_init_model
    from ray_jobs.alignment.aligner import AlignData
    from ray_jobs.next_day import day_start
    after = grown["after"]
    new = after.catalogue.index_of()[NEW_ITEM]
    spec = grown["hllm"].model_copy(update={"align": grown["hllm"].align.model_copy(update={
        "reward_day": DAY, "allow_seen_rewards": False, "list_size": 10})})
    data = align_data(spec, after, after.versions, reads_time=True)
    # of the 8 watchers, the two who went on that day: the others' one item of the day is their test
    # target, which a reward never is; the new user has no history before the day
    index = after.catalogue.index_of()
    assert sorted(data.users.tolist()) == sorted(user_idx(spec, [u for u, _ in MORE]))
    assert data.relevant.tolist() == [[new], [new]]
    assert not {index[i] for _, items in MORE for i in items} & set(data.relevant.flatten().tolist())
    assert all(s[-1] == day_start(DAY) and len(s) == len(c) + 1 for s, c in zip(data.stamps, data.contexts))
    assert all(not (c == new).any() for c in data.contexts)
    with pytest.raises(ValueError, match="pinned versions name no interactions"):
        align_data(spec, after, {k: v for k, v in after.versions.items() if k != "interactions"}, reads_time=False)
    init = read_model(grown["day0"]["hllm"])
    check_trained_before(with_init_model(spec, init, "day0", None), init, "day0")  # its data ends the day before
    init.versions = dict(after.versions)  # a model trained on the tables that include the day
    with pytest.raises(ValueError, match="has seen its reward day: its data runs to 1998-04-23"):
        check_trained_before(spec, init, "tonight's")
    hand = AlignData.of_day(np.array([3, 4]), [np.array([5, 6]), np.array([], np.int64)],
                            [np.array([7]), np.array([8, 9])], 20, 5)
    assert hand.users.tolist() == [3] and hand.relevant.tolist() == [[7]] and hand.stamps is None
