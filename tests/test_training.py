"""Data feeding, SASRec and the single-process trainer on real gold tables (MovieLens-100K)."""
import numpy as np
import pytest
import torch

from jobs.lake import published_versions
from jobs.spec import load_spec
from ray_jobs.checkpoint import load_model
from ray_jobs.data import left_pad, load_sequences, train_batches, training_windows, window_bounds
from ray_jobs.losses import InfoNCE, draw_negatives, sequence_loss
from ray_jobs.metrics import evaluate
from ray_jobs.models.baselines import Popularity
from ray_jobs.models.sasrec import SASRec
from ray_jobs.scoring import evaluate_split, load_for_catalogue, scorer
from ray_jobs.train import train_local


def test_windows_train_every_transition_once():
    s = np.arange(1, 8)
    windows = training_windows([s, np.array([9]), np.array([3, 4])], max_len=3)
    assert [w.tolist() for w in windows] == [[4, 5, 6, 7], [1, 2, 3, 4], [3, 4]]
    pairs = [(a, b) for w in windows for a, b in zip(w[:-1], w[1:])]
    assert sorted(pairs) == sorted([(i, i + 1) for i in range(1, 7)] + [(3, 4)])
    assert left_pad([np.array([1, 2]), np.array([5, 6, 7, 8])], 3).tolist() == [[0, 1, 2], [6, 7, 8]]
    recent = training_windows([s, np.array([9]), np.array([3, 4])], max_len=3, kind="recent")
    assert [w.tolist() for w in recent] == [[4, 5, 6, 7], [3, 4]]  # one window per user, the latest
    with pytest.raises(ValueError, match="train.windows"):
        training_windows([s], max_len=3, kind="latest")
    # the index from lengths alone, for many lengths: the windows an item-by-item cut gives
    lengths = np.arange(0, 30)
    seqs = [np.arange(1, n + 1) for n in lengths]
    for kind in ("all", "recent"):
        by_index = training_windows(seqs, 4, kind)
        by_hand = []
        for q in seqs:
            end = len(q)
            while end > 1:
                by_hand.append(q[max(0, end - 5):end])
                end = max(0, end - 5) + 1
                if kind == "recent":
                    break
        assert [w.tolist() for w in by_index] == [w.tolist() for w in by_hand]


def test_withheld_items_never_reach_a_training_batch_and_alignment_refuses_a_model_that_saw_them(ml100k_lake):
    """train.withhold=2: an epoch's targets are exactly the items of every user's train sequence from
    the second to the third-last (each once), and no input is one of a user's last two; the
    evaluation histories keep them. The alignment check refuses a start model whose withhold is
    smaller than align.holdout, unless allowed."""
    from collections import Counter
    from ray_jobs.align import check_rewards_unseen
    from ray_jobs.loop import epoch_batches, fit_windows
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={ml100k_lake}", "train.withhold=2",
                                                               "train.length_buckets=4"])
    data = load_sequences(spec)
    batches = list(epoch_batches(spec, data, fit_windows(spec, data), np.random.default_rng(0), reads_time=True))
    targets = Counter(int(x) for _, t, _ in batches for x in t[t != 0].tolist())
    assert targets == Counter(int(x) for q in data.train for x in q[1:len(q) - 2].tolist())
    # every window (inputs, then the last target) is a run of some user's sequence ending before its last two
    starts = {}
    for u, q in enumerate(data.train):
        for p in range(len(q) - 1):
            starts.setdefault((int(q[p]), int(q[p + 1])), []).append((u, p))
    for inputs, targets_, _ in batches:
        for x, y in zip(inputs.tolist(), targets_.tolist()):
            w = [a for a in x if a] + [y[-1]]
            runs = [(u, p) for u, p in starts[(w[0], w[1])] if data.train[u][p:p + len(w)].tolist() == w]
            assert runs and all(p + len(w) <= len(data.train[u]) - 2 for u, p in runs), w
    assert all(len(h) == len(q) for h, q in zip(data.valid.histories, data.train))  # evaluation keeps them
    assert [len(s) for s in data.fit_sequences("train", times=True, withhold=2)] == [len(q) - 2 for q in data.train]
    check_rewards_unseen(spec.align.model_copy(update={"holdout": 2, "allow_seen_rewards": False}), spec.train, "m")
    with pytest.raises(ValueError, match="has seen its reward items: its train.withhold=2 < align.holdout=3"):
        check_rewards_unseen(spec.align.model_copy(update={"holdout": 3, "allow_seen_rewards": False}), spec.train, "m")
    check_rewards_unseen(spec.align.model_copy(update={"holdout": 3, "allow_seen_rewards": True}), spec.train, "m")
    strict = spec.align.model_copy(update={"holdout": 2, "allow_seen_rewards": False})
    with pytest.raises(ValueError, match="warm-started from models:/m@champion"):
        check_rewards_unseen(strict, spec.train.model_copy(update={"init_from": "models:/m@champion"}), "m")
    with pytest.raises(ValueError, match="an aligned model"):
        check_rewards_unseen(strict, spec.train, "m", aligned=True)
    # Dagster's request to warm-start (a first run has no champion, so none happened) is not a warm start
    check_rewards_unseen(strict, spec.train.model_copy(update={"warm_start_from_champion": True}), "m")
    with pytest.raises(ValueError, match="train.withhold=2 needs train.fit_on=train"):
        load_spec("jobs/specs/movielens-100k-smoke.yaml", ["train.withhold=2", "train.fit_on=train_valid"])


def test_workers_read_their_shard_and_train_on_the_single_process_batches(ml100k_lake):
    """Two shards of the ML-100K sequences: disjoint users covering the table; the same global window
    index; every global batch split between them exactly as one process would train it; their
    evaluation shards merge into the single-process metrics."""
    from ray_jobs.loop import fit_windows
    from ray_jobs.scoring import evaluate_split, merge_shards, rank_shard
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={ml100k_lake}", "train.length_buckets=4"])
    whole = load_sequences(spec)
    shards = [load_sequences(spec, shard=(r, 2), batch_rows=97) for r in range(2)]  # many small record batches
    assert sorted(u for d in shards for u in d.train_users.tolist()) == whole.train_users.tolist()
    assert all((d.train_users % 2 == r).all() for r, d in enumerate(shards))
    for d in shards:
        assert np.array_equal(d.popularity, whole.popularity) and d.sizes == whole.sizes
        assert np.array_equal(d.lengths["train"], whole.lengths["train"])
        assert all(np.array_equal(whole.train[g], q) for g, q in zip(d.rows["train"], d.train))
    index = fit_windows(spec, whole)
    assert len(index) == len(training_windows(whole.train, spec.data.max_seq_len))
    single = train_batches(index, whole.fit_rows(), spec.data.max_seq_len, 64, np.random.default_rng(5), 4)
    parts = [train_batches(fit_windows(spec, d), d.fit_rows(), spec.data.max_seq_len, 64, np.random.default_rng(5), 4)
             for d in shards]
    single, parts = list(single), [list(p) for p in parts]
    assert len(single) > 0 and all(len(p) == len(single) for p in parts)  # no batch missing on either side
    for (inputs, targets, _), *ranks in zip(single, *parts):
        rows = lambda x: sorted(tuple(r[r != 0].tolist()) for r in x)  # noqa: E731
        assert rows(targets) == sorted(rows(ranks[0][1]) + rows(ranks[1][1]))
        assert rows(inputs) == sorted(rows(ranks[0][0]) + rows(ranks[1][0]))
    pop = whole.popularity.astype(np.float32)
    score = lambda h: torch.from_numpy(np.tile(pop, (len(h), 1)))  # noqa: E731  popularity: a model-free scorer
    merged = merge_shards(spec, whole, "test", [rank_shard(spec, score, d, "test") for d in shards])
    assert merged == evaluate_split(spec, score, whole, "test")
    with pytest.raises(ValueError, match="shard rank 2"):
        load_sequences(spec, shard=(2, 2))


def test_length_buckets_cover_every_window_once_and_trimming_keeps_the_loss():
    rng = np.random.default_rng(0)
    windows = [np.arange(1, n + 2) % 40 + 1 for n in rng.integers(1, 30, size=53)]
    index, seqs = window_bounds([len(w) for w in windows], 30), dict(enumerate(windows))  # one window per row
    plain = list(train_batches(index, seqs, 30, 8, np.random.default_rng(1)))
    bucketed = list(train_batches(index, seqs, 30, 8, np.random.default_rng(1), length_buckets=3))
    assert len(bucketed) == len(plain) == 7  # ceil(53 / 8) either way
    # with timestamps: the window's, one column wider — each input's time, then the last target's, so
    # column i + 1 is the time of the event position i predicts
    stamps = {r: 1_000 * np.arange(1, len(w) + 1) for r, w in seqs.items()}
    timed = list(train_batches(index, seqs, 30, 8, np.random.default_rng(1), length_buckets=3, times=stamps))
    for (i, tg, _), (ti, ttg, ts) in zip(bucketed, timed):
        assert torch.equal(i, ti) and torch.equal(tg, ttg) and ts.shape == (i.shape[0], i.shape[1] + 1)
        assert torch.equal((ts[:, :-1] > 0), (i > 0)) and torch.all(ts[:, 1:][tg > 0] > 0)
        assert torch.all(ts[:, 1:][tg > 0] - ts[:, :-1][tg > 0] == 1_000)  # a target is its input's next event
    assert all(i.shape[1] == 30 for i, _, _ in plain) and min(i.shape[1] for i, _, _ in bucketed) < 10
    rows = sorted(tuple(t[t != 0].tolist()) for _, tg, _ in bucketed for t in tg)
    assert rows == sorted(tuple(w[1:].tolist()) for w in windows)
    model = SASRec(num_items=41, max_len=30, dim=8, blocks=1).eval()
    negatives = torch.arange(1, 20)
    i, tg, _ = bucketed[0]
    wide_i, wide_t = left_pad([r[r != 0].numpy() for r in i], 30), left_pad([r[r != 0].numpy() for r in tg], 30)
    with torch.no_grad():
        assert sequence_loss(model, InfoNCE(), i, tg, negatives).item() == pytest.approx(
            sequence_loss(model, InfoNCE(), wide_i, wide_t, negatives).item(), rel=1e-5)


def test_per_position_negatives_are_drawn_per_position_and_replayable():
    from jobs.schema import TrainSpec
    t = TrainSpec(negatives=16, negative_sampling="per_position")
    targets = torch.ones(4, 7, dtype=torch.long)
    universe = torch.arange(1, 501)
    a = draw_negatives(t, universe, targets, step=3)
    assert a.shape == (4, 7, 16) and a.min() >= 1 and a.max() <= 500
    assert not torch.equal(a[0, 0], a[0, 1])  # every position has its own draw
    assert torch.equal(a, draw_negatives(t, universe, targets, step=3))  # a resumed run redraws the same
    assert not torch.equal(a, draw_negatives(t, universe, targets, step=4))
    assert draw_negatives(TrainSpec(negatives=16), universe, targets, step=3).shape == (16,)
    some = torch.tensor([3, 9, 40])  # only the training items are drawn
    assert set(draw_negatives(t, some, targets, step=3).unique().tolist()) <= {3, 9, 40}


@pytest.mark.parametrize("block", ["pre_ln", "original"])
def test_sasrec_is_causal_and_padding_safe(block):
    torch.manual_seed(0)
    model = SASRec(num_items=20, max_len=6, dim=8, blocks=2, heads=2, dropout=0.0, block=block).eval()
    a = torch.tensor([[0, 0, 3, 4, 5, 6]])
    b = torch.tensor([[0, 0, 3, 4, 9, 11]])  # differs only after position 3
    oa, ob = model(a), model(b)
    assert torch.isfinite(oa).all()
    assert torch.allclose(oa[:, :4], ob[:, :4], atol=1e-6) and not torch.allclose(oa[:, 4:], ob[:, 4:])
    # all-padding rows and short inputs stay finite (no fully blocked attention row)
    assert torch.isfinite(model(torch.zeros(1, 6, dtype=torch.long))).all()
    assert model(torch.tensor([[3, 4]])).shape == (1, 2, 8)
    # scoring computes only the top block's last position: same vectors as the full forward
    batch = torch.cat([a, b, torch.tensor([[0, 0, 0, 0, 0, 7]])])
    assert torch.allclose(model.user_embeddings(batch), model(batch)[:, -1], atol=1e-6)


@pytest.fixture
def ml100k(ml100k_lake):
    return ml100k_lake


def _spec(lake, tmp_path, *extra):
    return load_spec("jobs/specs/movielens-100k-smoke.yaml",
                     [f"lake.root={lake}", f"train.checkpoint_dir={tmp_path}", "model.dim=32", "train.lr=0.003",
                      "train.batch_size=64", "train.negatives=256", "train.eval_every=5", *extra])


def test_sequences_from_gold_tables(ml100k, tmp_path):
    spec = _spec(ml100k, tmp_path)
    data = load_sequences(spec)
    assert data.num_items == 1682 and len(data.train) == 943  # the index holds every catalogue item
    assert len(data.training_items()) == 1349 and data.catalogue.active[1:].all()  # the k-core's are trained on
    assert len(data.valid.targets) == len(data.test.targets) == 943
    # the test history is the valid history plus the valid target
    assert all(np.array_equal(t, np.append(v, vt)) for t, v, vt in
               zip(data.test.histories, data.valid.histories, data.valid.targets))
    assert data.popularity.sum() == sum(len(s) for s in data.train) and data.popularity[0] == 0
    # what a run records it read: the whole published version set (all at version 0 after one ETL)
    assert data.item_text[1].startswith("Title: ") and data.versions == published_versions(spec)
    assert set(data.versions) >= {"sequences", "item_index", "user_index"} and set(data.versions.values()) == {0}


def test_sasrec_beats_popularity_on_movielens_100k(ml100k, tmp_path):
    spec = _spec(ml100k, tmp_path, "train.epochs=15")  # validation NDCG@10 0.047 at epoch 15, popularity 0.035
    data = load_sequences(spec)
    pop = evaluate(Popularity(data.popularity).score, data.valid.histories, data.valid.targets, data.num_items,
                   data.popularity).metrics["ndcg@10"]
    result = train_local(spec, data)
    assert result.best_metric > pop, (result.best_metric, pop)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8
    model, ckpt = load_model(result.checkpoint)
    assert ckpt.progress.best_epoch == result.best_epoch
    loaded = load_for_catalogue(result.checkpoint, data.catalogue)
    assert loaded.scorable.sum() == 1349  # an ID model scores the items it trained on, not the 333 cold ones
    again = evaluate_split(spec, loaded.score_function(), data, "valid", scorable=loaded.scorable).metrics
    assert again["ndcg@10"] == pytest.approx(result.best_metric)  # the saved best model reproduces its score
    assert (again["candidates"], again["unscorable_items"]) == (1682, 333)


def test_resume_continues_exactly(ml100k, tmp_path):
    straight = _spec(ml100k, tmp_path / "a", "train.epochs=3", "train.eval_every=1")
    full = train_local(straight)
    resumed_spec = _spec(ml100k, tmp_path / "b", "train.epochs=3", "train.eval_every=1")
    first = train_local(resumed_spec, stop_after_epoch=2)
    assert first.stopped == "interrupted" and first.epochs_run == 2
    second = train_local(resumed_spec)
    assert second.epochs_run == 3 and second.steps == full.steps
    assert [h["loss"] for h in second.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
    a, _ = load_model(str(tmp_path / "a" / straight.name / "last.pt"))
    b, _ = load_model(str(tmp_path / "b" / straight.name / "last.pt"))
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_a_run_resumes_only_with_its_own_training_settings(ml100k, tmp_path):
    """A rerun under the same name with another learning rate (or model) is another run: refused, naming
    what changed, before any step; one with a larger budget continues the run."""
    from ray_jobs.loop import RunMismatch
    spec = _spec(ml100k, tmp_path, "train.epochs=1", "train.eval_every=1")
    first = train_local(spec)
    before = (tmp_path / spec.name / "last.pt").read_bytes()
    with pytest.raises(RunMismatch, match=r"train\.lr: 0\.003 -> 0\.005.*another name") as refused:
        train_local(_spec(ml100k, tmp_path, "train.epochs=1", "train.eval_every=1", "train.lr=0.005"))
    assert "model." not in str(refused.value)  # only what changed is named
    with pytest.raises(RunMismatch, match=r"model\.dim: 32 -> 48"):
        train_local(_spec(ml100k, tmp_path, "train.epochs=1", "train.eval_every=1", "model.dim=48"))
    assert (tmp_path / spec.name / "last.pt").read_bytes() == before  # a refused rerun wrote nothing
    longer = train_local(_spec(ml100k, tmp_path, "train.epochs=2", "train.eval_every=1", "train.max_minutes=30"))
    assert longer.epochs_run == 2 and longer.steps == 2 * first.steps  # the budget grew: the run went on


def test_an_alignment_run_keeps_its_align_settings_and_may_change_its_budget(ml100k):
    """Which settings a resume must keep depend on the stage: an alignment run's `align` section and
    the few `train` settings alignment reads (workers, DeepSpeed config, clipping), a training run's
    `train` section; budgets may change."""
    from ray_jobs.loop import training_changes
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={ml100k}"])

    def edited(**sections):
        return spec.model_copy(update={k: getattr(spec, k).model_copy(update=v) for k, v in sections.items()})
    assert training_changes(spec, edited(align={"lr": 0.5}), "align") == [f"align.lr: {spec.align.lr!r} -> 0.5"]
    assert training_changes(spec, edited(align={"steps": 999, "max_minutes": 3}), "align") == []
    assert training_changes(spec, edited(train={"lr": 0.5}), "align") == []
    assert training_changes(spec, edited(train={"grad_clip": 0.5}), "align") == \
        [f"train.grad_clip: {spec.train.grad_clip!r} -> 0.5"]
    assert training_changes(spec, edited(train={"lr": 0.5}), "train") == [f"train.lr: {spec.train.lr!r} -> 0.5"]
    assert training_changes(spec, edited(align={"lr": 0.5}), "train") == []
    assert training_changes(spec, edited(data={"max_seq_len": 7}), "align") == \
        [f"data.max_seq_len: {spec.data.max_seq_len!r} -> 7"]


def test_evaluate_cli_for_baselines(ml100k, tmp_path, warm_cache):
    """`llmrec evaluate` for popularity and the transition graph reports exactly what the baselines
    score in this process (both are deterministic)."""
    import json
    import subprocess
    import sys

    from jobs.schema import GraphSpec
    from ray_jobs.models.baselines import TransitionGraph
    from ray_jobs.models.llm import minilm_item_embeddings
    spec = load_spec("movielens-100k-smoke", [f"lake.root={ml100k}", f"model.cache_dir={tmp_path / 'cache'}"])
    data = load_sequences(spec)
    emb = minilm_item_embeddings(spec.model, data.item_text)
    graph = GraphSpec(kind="graph")  # the defaults the CLI's graph baseline runs with
    expected = {"pop": Popularity(data.popularity).score,
                "graph": TransitionGraph(data.train, data.num_items, emb, data.popularity, graph.graph_hops,
                                         graph.graph_last_items).score}
    for kind, score in expected.items():
        out = tmp_path / f"{kind}.json"
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--spec", "movielens-100k-smoke",
                               "--set", f"lake.root={ml100k}", "--set", f"model.kind={kind}",
                               "--set", f"model.cache_dir={tmp_path / 'cache'}", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(out.read_text())
        want = evaluate_split(spec, score, data, "test", emb)
        assert result["metrics"] == pytest.approx(want.metrics, rel=1e-12)
        assert result["beyond_accuracy"] == pytest.approx(want.beyond_accuracy, rel=1e-6)
        assert result["metrics"]["users"] == 943 and "| " + kind in proc.stdout
    # the popularity figure by hand: the test target's rank among unseen items ordered by train counts
    ranks = []
    for h, y in zip(data.test.histories, data.test.targets):
        seen = set(h.tolist()) | {0}
        better = sum(1 for i in range(1, data.num_items + 1) if i not in seen and data.popularity[i] >= data.popularity[y])
        ranks.append(better - 1)
    assert json.loads((tmp_path / "pop.json").read_text())["metrics"]["hr@10"] == pytest.approx(np.mean(np.array(ranks) < 10))


def test_scorer_length_chunks_equal_full_window_scoring():
    """The evaluator's scorer trims each length-sorted chunk to its longest history: the scores
    must equal encoding every user in the full left-padded window, in the caller's order."""
    torch.manual_seed(0)
    model = SASRec(40, 12, 16, 2, 2, 0.0).eval()
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 41, size=int(n)) for n in rng.integers(1, 20, size=23)]  # some longer than 12
    got = scorer(model, 12, chunk=4)(histories)
    with torch.no_grad():
        user = torch.nn.functional.normalize(model.user_embeddings(left_pad(histories, 12)), dim=-1)
        want = user @ torch.nn.functional.normalize(model.all_item_embeddings(), dim=-1).T
    assert torch.allclose(got, want, atol=1e-5)


def test_the_driver_refuses_a_ray_run_name_whose_resumed_checkpoint_has_other_settings(ml100k, tmp_path):
    """`check_previous_run` reads the checkpoint Ray Train would resume from (its snapshot's latest,
    not the newest folder name) before any worker starts: other settings or another stage are refused;
    the same settings, no run yet, or a record being written pass (the workers check again). It returns
    the MLflow run that wrote that checkpoint (the resuming run links to it)."""
    import json

    from ray_jobs.loop import RunMismatch, TrainState, run_folder_doc
    from ray_jobs.runtime import check_previous_run
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={ml100k}",
                                                              f"train.storage_path={tmp_path}"])
    data = load_sequences(spec)
    run = tmp_path / "r"
    assert check_previous_run(spec, "r", "train") is None  # nothing there yet
    for name, lr in (("checkpoint_2026-01-01_00-00-00.000000", 0.001), ("checkpoint_2026-01-02_00-00-00.000000", 0.5)):
        (run / name).mkdir(parents=True)
        saved = spec.model_copy(update={"train": spec.train.model_copy(update={"lr": lr})})
        state = TrainState(spec=saved, module=None, optimizer=None, scheduler=None, catalogue=data.catalogue,
                           versions={}, run_id=f"run-{lr}")
        (run / name / "catalogue.json").write_text(json.dumps(run_folder_doc(state)))
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text('{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-00.000000"}')
    assert check_previous_run(spec, "r", "train") is None  # a snapshot being written: left to the workers
    latest = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-00.000000"}}
    snapshot.write_text(json.dumps(latest))
    current = spec.model_copy(update={"train": spec.train.model_copy(update={"lr": 0.001})})
    # the resumed checkpoint (not the newest folder) has these settings, and was written by this run
    assert check_previous_run(current, "r", "train") == "run-0.001"
    with pytest.raises(RunMismatch, match=r"train\.lr: 0\.001 -> 0\.003"):
        check_previous_run(current.model_copy(update={"train": current.train.model_copy(update={"lr": 0.003})}),
                           "r", "train")
    with pytest.raises(RunMismatch, match="holds a run of stage 'train', this one is of stage 'align'"):
        check_previous_run(current, "r", "align")
