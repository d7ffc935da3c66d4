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
from ray_jobs.scoring import evaluate_split, scorer, top_k
from ray_jobs.tracking import Recommender
from ray_jobs.train import train_local


def _model(**kw) -> HSTU:
    torch.manual_seed(0)
    model = HSTU(num_items=30, max_len=8, dim=16, blocks=2, heads=2, dropout=0.0, **kw)
    with torch.no_grad():  # a non-zero bias, so that its effect shows
        for layer in model.layers:
            layer.rel_pos.normal_(0, 0.5)
    return model.eval()


def test_forward_backward_shapes_and_gradients():
    model = _model()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    out = model(ids)
    assert out.shape == (2, 6, 16) and torch.isfinite(out).all()
    assert torch.allclose(model(ids, last_only=True), out[:, -1:]) and torch.allclose(model.user_embeddings(ids), out[:, -1])
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.rel_pos"].abs().sum() > 0 and grads["layers.1.uvqk.weight"].abs().sum() > 0


def test_a_later_item_never_changes_an_earlier_position_and_padding_is_inert():
    model = _model()
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
    gaps = time_bucket(times, 64)
    assert gaps.shape == (1, 6, 6) and torch.all(gaps.diagonal(dim1=1, dim2=2) == 0)  # same second: bucket 0
    assert gaps[0, 1, 0] == 0 and gaps[0, 2, 0] == 13 and gaps[0, 3, 0] == 37 and gaps[0, 4, 0] == 57
    assert gaps[0, 5, 0] == 63 and time_bucket(times, 20)[0, 4, 0] == 19  # capped at buckets - 1
    assert torch.equal(gaps, gaps.transpose(1, 2))


def test_relative_time_bias_changes_what_the_gaps_change_and_needs_timestamps():
    model = _model(time_buckets=64)
    with torch.no_grad():
        for layer in model.layers:
            layer.rel_time.normal_(0, 1.0)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    day = 86_400
    times = torch.tensor([[0, 0, 0, day, 2 * day, 3 * day]])
    out = model(ids, times)
    layer = model.layers[0]
    bias = layer.relative_bias(6, time_bucket(times, 64))
    assert bias.shape == (1, 2, 6, 6)
    assert torch.equal(bias[0, :, 5, 3], layer.rel_pos[:, 2] + layer.rel_time[:, 40])  # 2 days: bucket 40
    # the last event a year later: only the last position sees a different gap
    later = times.clone()
    later[0, 5] = 365 * day
    moved = model(ids, later)
    assert torch.allclose(out[:, :5], moved[:, :5], atol=1e-6) and not torch.allclose(out[:, 5], moved[:, 5])
    # the same gaps at another absolute time: the same outputs (only differences are read)
    assert torch.allclose(out, model(ids, times + 1_000_000_000), atol=1e-6)
    assert torch.allclose(model.user_embeddings(ids, times), out[:, -1])
    with pytest.raises(ValueError, match="needs each event's timestamp"):
        model(ids)


def test_save_and_load_round_trip(tmp_path):
    spec = load_spec("movielens-100k-smoke", ["model.kind=hstu", "model.dim=16", "model.heads=2",
                                              "model.time_buckets=32"])
    items = [""] + [f"Title: {i}." for i in range(1, 21)]
    model = build_model(spec, items)
    assert isinstance(model, HSTU) and model.layers[0].rel_time.shape == (2, 32)
    path = save_model(str(tmp_path / "m.pt"), ModelCheckpoint(model.state_dict(), spec, items, {"item_index": 0}))
    again, ckpt = load_model(path)
    ids, times = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 10, 500, 90_000]])
    assert ckpt.spec.model.kind == "hstu" and torch.allclose(model.eval()(ids, times), again.eval()(ids, times))


def test_hstu_with_time_bias_beats_popularity_on_movielens_100k(ml100k_lake, tmp_path):
    """Timestamps from the gold table through training batches, evaluation and the registered
    model's pyfunc."""
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml",
                     [f"lake.root={ml100k_lake}", f"train.checkpoint_dir={tmp_path}", "model.kind=hstu", "model.dim=32",
                      "model.heads=2", "model.time_buckets=64", "train.lr=0.003", "train.batch_size=64",
                      "train.negatives=256", "train.epochs=20", "train.eval_every=5", "train.seed=7"])
    data = load_sequences(spec)
    assert [len(t) for t in data.train_times] == [len(s) for s in data.train]
    assert all(np.all(np.diff(t) >= 0) for t in data.train_times[:50])  # oldest first, as the items
    pop = evaluate(Popularity(data.popularity).score, data.valid.histories, data.valid.targets, data.num_items,
                   data.popularity)["metrics"]["ndcg@10"]
    result = train_local(spec, data)
    assert result.best_metric > pop * 1.2, (result.best_metric, pop)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8
    model, _ = load_model(result.checkpoint)
    assert any(layer.rel_time.abs().sum() > 0 for layer in model.layers)  # the time bias was trained

    # scoring reads the timestamps: without them a clear error, with them the reported metric
    score = scorer(model, spec.data.max_seq_len)
    assert score.reads_time
    with pytest.raises(ValueError, match="timestamps"):
        score(data.valid.histories[:4])
    assert evaluate_split(spec, score, data, "valid")["metrics"]["ndcg@10"] == pytest.approx(result.best_metric)
    # the registered model's pyfunc takes a `timestamps` column beside `history`
    folder = tmp_path / "registered"
    folder.mkdir()
    save_model(str(folder / "model.pt"), ModelCheckpoint(model.state_dict(), spec, data.item_text, data.versions))
    rec = Recommender(str(folder))
    rows = pd.DataFrame({"history": [h.tolist() for h in data.test.histories[:3]],
                         "timestamps": [t.tolist() for t in data.test.times[:3]]})
    out = rec.predict(rows, {"k": 5})
    ids, _ = top_k(score, data.test.histories[:3], 5, 64, data.test.times[:3])
    assert out["item_ids"].tolist() == ids.tolist()
    with pytest.raises(ValueError, match="`timestamps` column"):
        rec.predict(rows[["history"]])


@pytest.mark.parametrize("heads", [3])
def test_width_must_split_into_heads(heads):
    with pytest.raises(ValueError, match="multiple of model.heads"):
        HSTU(10, 8, dim=16, heads=heads)


def test_alignment_refuses_a_start_model_that_reads_timestamps():
    from ray_jobs.loop import alignment_state
    spec = load_spec("movielens-100k-smoke", ["model.kind=hstu", "model.time_buckets=8"])
    with pytest.raises(ValueError, match="reads event timestamps"):
        alignment_state(spec, HSTU(10, 8, dim=16, time_buckets=8), None, torch.device("cpu"))
