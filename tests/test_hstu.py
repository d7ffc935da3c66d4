"""HSTU: forward/backward, causality and padding, the relative-position bias, checkpoint round trip,
and a seeded learning check on MovieLens-100K against popularity."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.spec import load_spec
from ray_jobs.checkpoint import ModelCheckpoint, load_model, save_model
from ray_jobs.data import load_sequences
from ray_jobs.metrics import evaluate
from ray_jobs.models import build_model
from ray_jobs.models.baselines import Popularity
from ray_jobs.models.hstu import HSTU, time_bucket
from ray_jobs.scoring import evaluate_split, load_for_catalogue, top_k
from ray_jobs.serving import Recommender, write_catalogue_file
from ray_jobs.train import train_local


def _model(**kw) -> HSTU:
    torch.manual_seed(0)
    model = HSTU(num_items=30, max_len=8, dim=16, blocks=2, heads=2, dropout=0.0, **kw)
    with torch.no_grad():  # a non-zero bias, so that its effect shows
        for layer in model.layers:
            layer.rel_pos.normal_(0, 0.5)
    return model.eval()


DAY = 86_400


def _timed_model(query_time: str = "event"):
    """A 64-bucket time-reading model with a non-zero time bias, six positions (two padded) and
    their times: the events', then the prediction's."""
    model = _model(time_buckets=64, query_time=query_time)
    with torch.no_grad():
        for layer in model.layers:
            layer.rel_time.normal_(0, 1.0)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    times = torch.tensor([[0, 0, 0, DAY, 2 * DAY, 3 * DAY, 9 * DAY]])
    return model, ids, times


def test_forward_backward_shapes_and_gradients():
    model = _model()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    out = model(ids)
    assert out.shape == (2, 6, 16) and torch.isfinite(out).all()
    assert torch.allclose(model(ids, last_only=True), out[:, -1:], atol=1e-6)
    assert torch.allclose(model.user_embeddings(ids), out[:, -1], atol=1e-6)
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.rel_pos"].abs().sum() > 0 and grads["layers.1.uvqk.weight"].abs().sum() > 0


@pytest.mark.parametrize("last_only", [False, True])
def test_scoring_without_gradients_computes_exactly_what_training_computes(last_only):
    """Without autograd the attention maps are built in place (one allocation per map, not five):
    the same operations in the same order, so the outputs are bit-identical — time bias included."""
    torch.manual_seed(0)
    model = HSTU(20, 6, dim=16, blocks=2, heads=2, time_buckets=64, query_time="target", dropout=0.0).eval()
    with torch.no_grad():  # non-zero biases (both start at zero here), so that adding them shows
        for layer in model.layers:
            layer.rel_pos.normal_(0, 0.5)
            layer.rel_time.normal_(0, 0.5)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    times = torch.tensor([[0, 0, 10, 70, 4_000, 90_000, 100_000], [5, 9, 60, 61, 3_600, 86_400, 86_500]])
    with_grad = model(ids, times, last_only=last_only)
    with torch.no_grad():
        scored = model(ids, times, last_only=last_only)
    assert with_grad.requires_grad and torch.equal(scored, with_grad.detach())


@pytest.mark.parametrize("block", ["pre_ln", "original"])
def test_a_later_item_never_changes_an_earlier_position_and_padding_is_inert(block):
    model = _model(block=block)
    a = torch.tensor([[0, 0, 3, 4, 5, 6]])
    b = torch.tensor([[0, 0, 3, 4, 5, 9]])  # only the last item differs
    assert torch.allclose(model(a)[:, :5], model(b)[:, :5], atol=1e-6)
    assert not torch.allclose(model(a)[:, 5], model(b)[:, 5])
    # more left padding (a shorter window) keeps the real positions' outputs: right-aligned positions
    # and masked padding keys, the same bias per distance
    longer = torch.tensor([[0, 0, 0, 0, 3, 4, 5, 6]])
    assert torch.allclose(model(a)[:, 2:], model(longer)[:, 4:], atol=1e-5)


def test_relative_position_bias_shape_and_effect():
    model = _model()
    layer = model.layers[0]
    bias = layer.relative_bias(5)
    assert bias.shape == (1, 2, 5, 5)
    assert torch.equal(bias[0, :, 4, 1], layer.rel_pos[:, 3]) and torch.equal(bias[0, :, 2, 2], layer.rel_pos[:, 0])
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids)
    with torch.no_grad():
        layer.rel_pos[:, 2] += 3.0  # only distance 2 changes
    after = model(ids)
    assert torch.allclose(before[:, :2], after[:, :2], atol=1e-6)  # positions 0, 1 have no key 2 back
    assert not torch.allclose(before[:, 2:], after[:, 2:])


def test_time_buckets_are_log_scaled_gaps():
    times = torch.tensor([[0, 1, 60, 86_400, 31_536_000, 31_536_000 * 40]])
    gaps = time_bucket(times, times, 64)
    assert gaps.shape == (1, 6, 6) and torch.all(gaps.diagonal(dim1=1, dim2=2) == 0)  # same second: bucket 0
    assert gaps[0, 1, 0] == 0 and gaps[0, 2, 0] == 13 and gaps[0, 3, 0] == 37 and gaps[0, 4, 0] == 57
    assert gaps[0, 5, 0] == 63 and time_bucket(times, times, 20)[0, 4, 0] == 19  # capped at buckets - 1
    assert torch.equal(gaps, gaps.transpose(1, 2))
    # queries at other times than the events: row i measures from query i
    later = time_bucket(times + 86_400, times, 64)
    assert later[0, 0, 0] == 37 and later[0, 1, 0] == 37 and later[0, 2, 2] == 37


def test_relative_time_bias_changes_what_the_gaps_change_and_needs_timestamps():
    model, ids, times = _timed_model()
    out = model(ids, times)
    layer = model.layers[0]
    bias = layer.relative_bias(6, time_bucket(times[:, :-1], times[:, :-1], 64))
    assert bias.shape == (1, 2, 6, 6)
    assert torch.equal(bias[0, :, 5, 3], layer.rel_pos[:, 2] + layer.rel_time[:, 40])  # 2 days: bucket 40
    # the last event a year later: only the last position sees a different gap
    later = times.clone()
    later[0, 5] = 365 * DAY
    moved = model(ids, later)
    assert torch.allclose(out[:, :5], moved[:, :5], atol=1e-6) and not torch.allclose(out[:, 5], moved[:, 5])
    # measured from each event (query_time: event), the prediction's time is read by nothing
    asked = times.clone()
    asked[0, 6] = 400 * DAY
    assert torch.allclose(out, model(ids, asked), atol=1e-6)
    # the same gaps at another absolute time: the same outputs (only differences are read)
    assert torch.allclose(out, model(ids, times + 1_000_000_000), atol=1e-6)
    assert torch.allclose(model.user_embeddings(ids, times), out[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="needs each event's timestamp"):
        model(ids)
    with pytest.raises(ValueError, match="followed by the time of the prediction"):
        model(ids, times[:, :-1])


def test_query_time_target_measures_each_positions_gaps_from_the_event_it_predicts():
    """generative-recommenders' bias: position i reads ts[i+1] - ts[j]; the last position reads the
    time the prediction is for. Items stay causal: a later item never changes an earlier position."""
    model, ids, times = _timed_model("target")
    out = model(ids, times)
    layer = model.layers[0]
    gaps = time_bucket(times[:, 1:], times[:, :-1], 64)
    assert gaps[0, 5, 3] == 44 and gaps[0, 4, 4] == 37  # 8 days from the prediction; a day to the next event
    # when the recommendation is asked for: only the last position changes
    asked = times.clone()
    asked[0, 6] = 400 * DAY
    moved = model(ids, asked)
    assert torch.allclose(out[:, :5], moved[:, :5], atol=1e-6) and not torch.allclose(out[:, 5], moved[:, 5])
    # event 5's time is position 4's query time: position 4 changes, earlier ones don't
    shifted = times.clone()
    shifted[0, 5] = 30 * DAY
    moved = model(ids, shifted)
    assert torch.allclose(out[:, :4], moved[:, :4], atol=1e-6) and not torch.allclose(out[:, 4], moved[:, 4])
    other = torch.tensor([[0, 0, 3, 4, 5, 9]])  # only the last item differs
    assert torch.allclose(model(other, times)[:, :5], out[:, :5], atol=1e-6)
    assert torch.allclose(model.user_embeddings(ids, times), out[:, -1], atol=1e-6)
    assert layer.rel_time.shape == (2, 64)
    with pytest.raises(ValueError, match="query_time"):
        HSTU(10, 8, dim=16, time_buckets=8, query_time="request")


def test_attention_dim_sets_the_width_of_u_v_q_k():
    model = _model(attention_dim=5)  # 2 heads x 5 on a 16-wide model (HSTU-large's ML-1M: 2 x 25 on 50)
    layer = model.layers[0]
    assert layer.uvqk.weight.shape == (40, 16) and layer.out.weight.shape == (16, 10)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    out = model(ids)
    assert out.shape == (1, 6, 16) and torch.allclose(model.user_embeddings(ids), out[:, -1], atol=1e-6)
    assert HSTU(10, 8, dim=15, heads=2, attention_dim=4).layers[0].width == 8  # dim need not split into heads


def test_original_block_has_the_reference_codes_details():
    """block="original" (generative-recommenders' HSTU code): plain LayerNorms and no final one,
    bias-free U/V/Q/K initialised N(0, 0.02), relative biases N(0, 0.02), positions from the first item."""
    torch.manual_seed(0)
    ours = HSTU(num_items=300, max_len=64, dim=50, blocks=2, heads=1, time_buckets=128, attention_dim=25)
    torch.manual_seed(0)
    ref = HSTU(num_items=300, max_len=64, dim=50, blocks=2, heads=1, time_buckets=128, attention_dim=25,
               block="original")
    names = {n for n, _ in ref.named_parameters()}
    assert {n for n, _ in ours.named_parameters()} - names == {
        "final_norm.weight", "final_norm.bias", *(f"layers.{i}.{p}" for i in range(2) for p in (
            "norm.weight", "norm.bias", "attn_norm.weight", "attn_norm.bias", "uvqk.bias"))}
    for a, b in zip(ours.layers, ref.layers):
        assert a.uvqk.weight.std().item() > 0.1  # Xavier-uniform on 50 -> 100
        assert b.uvqk.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert not a.rel_pos.any() and b.rel_pos.std().item() == pytest.approx(0.02, rel=0.2)
        assert not a.rel_time.any() and b.rel_time.std().item() == pytest.approx(0.02, rel=0.2)
    # positions: ours count from the window's right end (the last item is max_len - 1 whatever the
    # history's length), the reference's from the first item (0, 1, 2, ...)
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    for model, first_real in ((ours, [61, 59]), (ref, [0, 0])):
        model.eval()
        with torch.no_grad():
            x, _ = model.embed(ids)
        scale = 50 ** 0.5
        assert torch.allclose(x[0, 2], model.item_emb.weight[7] * scale + model.pos_emb.weight[first_real[0]])
        assert torch.allclose(x[1, 0], model.item_emb.weight[1] * scale + model.pos_emb.weight[first_real[1]])
        assert torch.allclose(x[0, 4], model.item_emb.weight[9] * scale + model.pos_emb.weight[
            2 if model is ref else 63]) and not x[0, :2].any()
    times = torch.arange(6)[None].repeat(2, 1) * 1000
    out = ref(ids, times)
    assert isinstance(ref.final_norm, torch.nn.Identity) and torch.isfinite(out).all()
    assert torch.allclose(ref.user_embeddings(ids, times), out[:, -1], atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in ref.parameters())
    spec = load_spec("movielens-100k-smoke", ["model.kind=hstu", "model.block=original", "model.dim=16"])
    assert isinstance(build_model(spec, [""] + ["t"] * 20).final_norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="model.block"):
        HSTU(10, 8, dim=16, block="post_ln")


def test_save_and_load_round_trip(tmp_path):
    spec = load_spec("movielens-100k-smoke", ["model.kind=hstu", "model.dim=16", "model.heads=2",
                                              "model.time_buckets=32"])
    items = [""] + [f"Title: {i}." for i in range(1, 21)]
    model = build_model(spec, items)
    assert isinstance(model, HSTU) and model.layers[0].rel_time.shape == (2, 32)
    path = save_model(str(tmp_path / "m.pt"), ModelCheckpoint(model.state_dict(), spec, items, {"item_index": 0}))
    again, ckpt = load_model(path)
    ids, times = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 10, 500, 90_000, 90_060]])
    assert ckpt.spec.model.kind == "hstu" and torch.allclose(model.eval()(ids, times), again.eval()(ids, times))


def test_hstu_with_time_bias_beats_popularity_on_movielens_100k(ml100k_lake, tmp_path):
    """Timestamps from the gold table through training batches, evaluation and the registered
    model's pyfunc."""
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml",
                     [f"lake.root={ml100k_lake}", f"train.checkpoint_dir={tmp_path}", "model.kind=hstu", "model.dim=32",
                      "model.heads=2", "model.time_buckets=64", "model.query_time=target", "model.attention_dim=8",
                      "train.lr=0.003", "train.batch_size=64",
                      "train.negatives=256", "train.epochs=20", "train.eval_every=5", "train.seed=7"])
    data = load_sequences(spec)
    assert [len(t) for t in data.train_times] == [len(s) for s in data.train]
    assert all(np.all(np.diff(t) >= 0) for t in data.train_times[:50])  # oldest first, as the items
    pop = evaluate(Popularity(data.popularity).score, data.valid.histories, data.valid.targets, data.num_items,
                   data.popularity).metrics["ndcg@10"]
    result = train_local(spec, data)
    assert result.best_metric > pop * 1.2, (result.best_metric, pop)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8
    model, _ = load_model(result.checkpoint)
    assert any(layer.rel_time.abs().sum() > 0 for layer in model.layers)  # the time bias was trained

    # scoring reads the timestamps: without them a clear error, with them the reported metric
    score = load_for_catalogue(result.checkpoint, data.catalogue).score_function()
    assert score.reads_time
    with pytest.raises(ValueError, match="timestamps"):
        score(data.valid.histories[:4])
    assert evaluate_split(spec, score, data, "valid").metrics["ndcg@10"] == pytest.approx(result.best_metric)
    # evaluation reads each target's timestamp as the time of the prediction: asked at other times,
    # the same histories score differently
    stamps = data.valid.stamps()
    assert [len(t) for t in stamps] == [len(h) + 1 for h in data.valid.histories]
    shifted = [np.append(t[:-1], t[-1] + 365 * DAY) for t in stamps[:8]]
    assert not torch.allclose(score(data.valid.histories[:8], stamps[:8]), score(data.valid.histories[:8], shifted))
    # `recommend` asks every user at the data's latest event: one time, the same on a rerun
    from ray_jobs.recommend import full_histories
    _, seqs, asked_at, _ = full_histories(data)
    assert all(len(t) == len(q) + 1 for q, t in zip(seqs, asked_at))
    assert {int(t[-1]) for t in asked_at} == {max(int(t[:-1].max()) for t in asked_at if len(t) > 1)}
    # the registered model's pyfunc takes `timestamps` and the `request_time` beside `history`
    folder = tmp_path / "registered"
    folder.mkdir()
    save_model(str(folder / "model.pt"), ModelCheckpoint.of(model.state_dict(), spec, data.catalogue, data.versions))
    write_catalogue_file(data.catalogue, str(folder / "catalogue.parquet"))
    rec = Recommender(str(folder))
    test_stamps = data.test.stamps()
    source_ids = data.catalogue.item_ids
    rows = pd.DataFrame({"history": [[source_ids[i] for i in h] for h in data.test.histories[:3]],
                         "timestamps": [t.tolist() for t in data.test.times[:3]],
                         "request_time": [int(t) for t in data.test.target_times[:3]]})
    out = rec.predict(rows, {"k": 5})
    ids, _ = top_k(score, data.test.histories[:3], 5, 64, test_stamps[:3], data.catalogue.active)
    assert out["item_ids"].tolist() == [[source_ids[i] for i in r] for r in ids]
    with pytest.raises(ValueError, match="`timestamps` column"):
        rec.predict(rows[["history"]])
    with pytest.raises(ValueError, match="`request_time` column"):
        rec.predict(rows[["history", "timestamps"]])


@pytest.mark.parametrize("heads", [3])
def test_width_must_split_into_heads(heads):
    with pytest.raises(ValueError, match="multiple of model.heads"):
        HSTU(10, 8, dim=16, heads=heads)
