"""Semantic-id quantizers: codes, collisions, utilisation, MPQ routing, the token table."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_jobs.models.semantic_ids import (ParallelQuantizer, ResidualQuantizer, TokenTable, utilisation,
                                          with_disambiguation)


def _items(n: int = 200, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g) * 3
    return centres[torch.randint(8, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _fit(q, x: torch.Tensor, steps: int = 60, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    q.init_codebooks(x, seed)
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        out = q(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.recon_loss.item())
    return losses


@pytest.mark.parametrize("make", [lambda: ResidualQuantizer(16, latent=8, levels=3, codes=16, hidden=32),
                                  lambda: ParallelQuantizer(16, latent=8, experts=3, codes=16, hidden=32)],
                         ids=["rq", "mpq"])
def test_codes_are_deterministic_for_a_seed_unique_after_disambiguation_and_training_reconstructs(make):
    x = _items()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        q = make()
        losses = _fit(q, x)
        with torch.no_grad():
            runs.append(q(x).codes.numpy())
    assert np.array_equal(runs[0], runs[1])
    assert losses[-1] < losses[0] * 0.7  # it learns to reconstruct
    table = TokenTable.of("rq", 16, runs[0])
    body = table.tokens[1:]
    assert len({tuple(r) for r in body.tolist()}) == len(body)  # every item a unique token sequence
    assert (table.tokens[0] == 0).all() and body[:, :-1].max() < 16


def test_disambiguation_numbers_shared_codes_in_row_order():
    codes = np.array([[1, 2], [3, 4], [1, 2], [1, 2], [3, 5]])
    assert with_disambiguation(codes)[:, -1].tolist() == [0, 0, 1, 2, 0]


def test_utilisation_by_hand():
    codes = np.array([[0, 1], [0, 1], [1, 1], [2, 0]])  # book 0 uses codes 0, 0, 1, 2 of 4; book 1 codes 1, 1, 1, 0
    u = utilisation(codes, 4)
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert u["books"][0] == {"perplexity": pytest.approx(math.exp(h0)), "dead_codes": 1}
    assert u["books"][1] == {"perplexity": pytest.approx(math.exp(h1)), "dead_codes": 2}
    assert u["collision_share"] == pytest.approx(0.5)  # rows 0 and 1 share (0, 1)


def test_mpq_routing_sums_to_one_and_gradients_reach_every_expert():
    torch.manual_seed(0)
    x = _items(64)
    q = ParallelQuantizer(16, latent=8, experts=4, codes=8, hidden=32)
    q.init_codebooks(x)
    q.codebooks.data += 0.01 * torch.randn_like(q.codebooks)  # off the k-means fixed point, where the VQ gradient is 0
    out = q(x)
    assert torch.allclose(out.gates.sum(-1), torch.ones(64), atol=1e-6) and (out.gates > 0).all()
    out.loss.backward()
    for enc in q.encoders:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    used = [set(out.codes[:, b].tolist()) for b in range(4)]
    for b in range(4):  # every expert's codebook gets gradient on the codes it used
        grad = q.codebooks.grad[b]
        assert all(grad[c].abs().sum() > 0 for c in used[b])
    assert q.router.weight.grad.abs().sum() > 0


def test_token_table_round_trips_as_parquet_and_refuses_another_table(tmp_path):
    table = TokenTable.of("mpq", 16, np.array([[1, 2, 3], [4, 5, 6], [1, 2, 3]]))
    path = str(tmp_path / "tokens.parquet")
    table.to_parquet(path)
    back = TokenTable.from_parquet(path)
    assert np.array_equal(back.tokens, table.tokens) and back.hash == table.hash and back.kind == "mpq"
    table.require(back.hash, "the generator")
    other = TokenTable("mpq", 16, table.tokens.copy())
    other.tokens[2, 0] = 9  # one item's token changed: a different table
    with pytest.raises(ValueError, match="trained on the token table"):
        other.require(table.hash, "the generator")


def test_the_codebook_gradient_is_bit_identical_across_backward_passes_on_several_threads():
    """The tokenizer stage's fits repeat exactly: the codebooks' gradient (rows gathered by code, many
    items per code) is summed in a fixed order on several CPU threads (indexing's backward adds with
    atomics there, and two fits of one seed differed in 5 % of items' codes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        torch.manual_seed(0)
        x = torch.randn(4000, 64)
        q = ParallelQuantizer(64, latent=16, experts=2, codes=8, hidden=32)
        q.init_codebooks(x)
        grads = []
        for _ in range(3):
            q.zero_grad()
            q(x).loss.backward()
            grads.append(q.codebooks.grad.clone())
        assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    finally:
        torch.set_num_threads(threads)


def test_collaborative_factors_group_items_by_their_users_and_predict_an_unseen_item_from_its_text():
    """Two user communities with their own items and two users between them: past the trivial
    singular vector, the first factor puts each community's items on one side; item 9, which no one
    has, takes the factor its text predicts (its text is that of community B's items); the
    quantizer's input joins the factors to the text, and an item without factors given is lifted
    from its text by the saved map."""
    from ray_jobs.models.semantic_ids import collaborative_factors
    rng = np.random.default_rng(0)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    train = [rng.choice(a, 3, replace=False) for _ in range(20)] + [rng.choice(b, 3, replace=False) for _ in range(20)]
    train += [np.array([1, 5]), np.array([2, 6])]            # the bridge: one connected graph
    text = np.zeros((9, 6), np.float32)
    text[:4, :3] = rng.normal(size=(4, 3)) + [2, 0, 0]       # community A's texts near one direction
    text[4:, 3:] = rng.normal(size=(5, 3)) + [0, 2, 0]       # B's (and item 9's) near another
    factors, lift = collaborative_factors(train, 9, text, k=1, seed=0)
    assert factors.shape == (9, 1) and lift.shape == (6, 1)
    side = factors[:, 0]
    assert np.allclose(np.abs(side), 1, atol=1e-5)            # unit rows
    assert len(set(side[:4].round(3))) == 1 and len(set(side[4:8].round(3))) == 1 and side[0] == -side[4]
    assert side[8] == pytest.approx(side[4])                  # the unseen item lands with the items its text resembles
    assert np.allclose(collaborative_factors(train, 9, text, k=1, seed=0)[0], factors)  # deterministic
    assert collaborative_factors(train, 9, text, k=3, seed=0)[0].shape == (9, 3)
    q = ParallelQuantizer(6 + 1, latent=4, experts=2, codes=4, hidden=8, collaborative=1)
    q.lift.copy_(torch.from_numpy(lift))
    q.cf_scale.fill_(3.0)
    t = torch.from_numpy(text)
    joined = q.inputs(t, torch.from_numpy(factors))
    assert torch.equal(joined[:, :6], t) and torch.allclose(joined[:, 6:], 3 * torch.from_numpy(factors))
    assert torch.allclose(q.inputs(t)[8], joined[8], atol=1e-5)  # the unseen item's factors are its text's
    assert set(q.state_dict()) >= {"lift", "cf_scale"}  # the map travels with the tokenizer's weights
    with pytest.raises(ValueError, match="at most"):
        collaborative_factors(train, 9, text, k=8)


def test_collaborative_factors_skip_one_trivial_vector_per_connected_part():
    """Three parts without a bridge: items 1-4 (two pairs joined by one user), 5-7 and 8-10 (every
    user has all of them). Past the three trivial vectors the first factor is the split of the
    first part's pairs, whatever order the solver returns the trivial ones in; asking for more
    factors than the graph has is refused by name."""
    from ray_jobs.models.semantic_ids import collaborative_factors
    train = [np.array([1, 2])] * 5 + [np.array([3, 4])] * 5 + [np.array([2, 3])]
    train += [np.array([5, 6, 7])] * 5 + [np.array([8, 9, 10])] * 5
    text = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    factors, _ = collaborative_factors(train, 10, text, k=1, seed=0)
    side = np.sign(factors[:4, 0])
    assert side[0] == side[1] and side[2] == side[3] and side[0] != side[2]
    with pytest.raises(ValueError, match="at most 6 factors .* in 3 connected parts"):
        collaborative_factors(train, 10, text, k=7)


@pytest.mark.parametrize("kind", ["rq", "mpq"])
def test_centred_text_embeddings_leave_the_codes_to_what_tells_items_apart(kind):
    """Templated item texts embed with a large common part: the tokenizer stage subtracts the
    catalogue's mean (`fit_center`), saved with the quantizer and applied by `inputs` to new items
    too; the same fit on the raw embeddings collides more. A quantizer saved without `center` loads
    with zeros: it reads raw embeddings, as it was fitted."""
    def make():
        return (ResidualQuantizer(16, latent=8, levels=2, codes=16, hidden=32) if kind == "rq"
                else ParallelQuantizer(16, latent=8, experts=2, codes=16, hidden=32))
    offset = 25.0 * torch.randn(16, generator=torch.Generator().manual_seed(1))  # what every text shares
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) + offset
    distinct = {}
    for centred in (False, True):
        torch.manual_seed(0)
        q = make()
        if centred:
            assert torch.allclose(q.fit_center(x), x - x.mean(0)) and torch.allclose(q.center, x.mean(0))
        _fit(q, q.inputs(x), steps=30)
        with torch.no_grad():
            distinct[centred] = len(np.unique(q.eval()(q.inputs(x)).codes.numpy(), axis=0))
    assert distinct[True] > 4 * distinct[False], distinct  # measured: 96 vs 1 (rq), 110 vs 16 (mpq)
    assert torch.allclose(q.inputs(x[:3]), x[:3] - x.mean(0))  # a new item's text is centred the same way
    old = {k: v for k, v in q.state_dict().items() if k != "center"}
    again = make()
    again.load_state_dict(old)
    assert torch.equal(again.center, torch.zeros(16))
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.center, q.center)
