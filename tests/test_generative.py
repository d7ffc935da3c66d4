"""The generative semantic-id recommender: trie-constrained decoding, exact item scores, beam search,
consistency-oriented pruning."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ray_jobs.models.generative import SemanticGenerator, TokenTrie, corp
from ray_jobs.models.semantic_ids import TokenTable


def _generator(n: int = 40, m: int = 3, codes: int = 4, paths: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = TokenTable.of("mpq", codes, rng.integers(0, codes, size=(n, m)))
    torch.manual_seed(seed)
    g = SemanticGenerator(table, max_len=8, dim=16, blocks=1, heads=1, dropout=0.0, paths=paths, max_disambiguation=8)
    return g.eval(), table


def _by_hand(g: SemanticGenerator, state: torch.Tensor, item: int, order: int) -> float:
    """log P(item) stepping the decoder one token at a time, the allowed tokens read from the table."""
    tokens, trie = g.tokens.numpy(), g.tries[order]
    total, s = 0.0, state[None]
    for j, col in enumerate(trie.order):
        prefix = tokens[item, list(trie.order[:j])]
        allowed = {int(t[j]) for t in tokens[1:, list(trie.order)] if (t[:j] == prefix).all()}
        logits = g._logits(s, col)[0]
        mask = torch.full_like(logits, float("-inf"))
        mask[sorted(allowed)] = 0
        total += torch.log_softmax(logits + mask, -1)[tokens[item, col]].item()
        s = g._advance(s, col, torch.tensor([tokens[item, col]]))
    return total


@torch.no_grad()
def test_exact_item_scores_are_the_summed_token_log_probabilities_and_a_distribution():
    g, _ = _generator()
    states = torch.randn(3, 16)
    for order in range(len(g.orders)):
        lp = g.item_log_probs(states, order)
        assert lp[:, 0].isinf().all() and torch.isfinite(lp[:, 1:]).all()
        assert torch.allclose(lp[:, 1:].exp().sum(-1), torch.ones(3), atol=1e-5)  # one distribution over the items
        for u in range(3):
            for item in (1, 7, 40):
                assert lp[u, item].item() == pytest.approx(_by_hand(g, states[u], item, order), abs=1e-5)
    assert len(set(g.orders)) == 3 and all(o[-1] == 3 for o in g.orders)  # the disambiguation column last


@torch.no_grad()
def test_beam_search_with_room_for_every_item_equals_brute_force_and_never_emits_an_invalid_item():
    g, table = _generator()
    states = torch.randn(4, 16)
    for order in range(len(g.orders)):
        exact = g.item_log_probs(states, order)
        items, scores = g.beam(states, width=40, order=order)
        brute = exact[:, 1:].argsort(-1, descending=True) + 1
        assert torch.equal(items, brute)
        assert torch.allclose(scores, exact.gather(1, items), atol=1e-5)
    valid = {tuple(r) for r in table.tokens[1:].tolist()}
    for trial in range(50):
        state = torch.randn(2, 16) * (1 + trial % 5)
        width = 1 + trial % 9
        items, scores = g.beam(state, width, order=trial % 3)
        for row, srow in zip(items.tolist(), scores.tolist()):
            real = [i for i, s in zip(row, srow) if np.isfinite(s)]
            assert real and all(1 <= i <= 40 for i in real) and len(set(real)) == len(real)
            assert all(tuple(table.tokens[i]) in valid for i in real)
    seq = list(table.tokens[5, list(g.orders[0])])
    assert g.tries[0].is_item(seq) and not g.tries[0].is_item(seq[:-1]) and not g.tries[0].is_item([9, 0, 0, 0])


def test_the_training_loss_is_the_negative_log_likelihood_of_the_exact_scores():
    g, _ = _generator()
    states = torch.randn(5, 16)
    targets = torch.tensor([1, 3, 9, 27, 40])
    for order in range(3):
        loss = g.sequence_loss(states, targets, order)
        exact = g.item_log_probs(states, order).gather(1, targets[:, None]).sum()
        assert loss.item() == pytest.approx(-exact.item(), rel=1e-5)
    loss.backward()
    assert g.out.weight.grad.abs().sum() > 0 and g.cell.weight_hh.grad.abs().sum() > 0
    # the exact scores' gradient (what alignment follows) is the loss's, negated, in every weight
    grads = {k: p.grad.clone() for k, p in g.named_parameters() if p.grad is not None}
    g.zero_grad()
    (-g.item_log_probs(states, 2).gather(1, targets[:, None]).sum()).backward()
    for k, grad in grads.items():
        assert torch.allclose(g.get_parameter(k).grad, grad, atol=1e-5), k


def test_history_items_are_their_tokens_and_the_user_state_is_causal():
    g, _ = _generator()
    ids = torch.tensor([[0, 0, 3, 5, 9], [0, 4, 4, 2, 1]])
    v = g.item_vectors(ids)
    rows = g.tokens[5] + torch.arange(g.columns) * g.vocab
    assert torch.allclose(v[0, 3], g.col_emb.weight[rows].sum(0)) and (v[0, :2] == 0).all()
    with torch.no_grad():
        full = g(ids)
        changed = ids.clone()
        changed[:, -1] = 7
        assert torch.allclose(g(changed)[:, :-1], full[:, :-1], atol=1e-6)  # the future never reaches the past


def test_corp_prunes_the_disagreeing_order_and_averages_the_rest():
    lp = lambda *p: torch.log(torch.tensor([p]))  # noqa: E731
    agree1 = (torch.tensor([[5, 2, 9]]), lp(0.5, 0.3, 0.1))
    agree2 = (torch.tensor([[5, 9, 4]]), lp(0.4, 0.4, 0.1))
    other = (torch.tensor([[2, 5, 9]]), lp(0.9, 0.05, 0.01))  # decodes 2 first: pruned
    items, scores = corp([agree1, other, agree2])
    assert items[0].tolist() == [5, 9, 2, 4]
    assert scores[0].exp().tolist() == pytest.approx([0.45, 0.25, 0.15, 0.05])


def test_a_table_without_disambiguation_is_refused():
    tokens = np.array([[0, 0], [1, 2], [1, 2]])
    with pytest.raises(ValueError, match="share a token sequence"):
        TokenTrie(tokens, (0, 1), 4)


def test_a_generative_model_beats_popularity_on_movielens_100k_and_reloads(ml100k_lake, tmp_path, monkeypatch,
                                                                          warm_cache):
    """model.kind=generative through the one training loop: MPQ semantic ids from MiniLM text embeddings
    (trained once, cached), the generator trained on next-item likelihood; the saved best model scores
    every item of its catalogue (cold items included: their tokens come from text) and reproduces its
    validation figure; the token table travels with the weights."""
    from jobs.spec import load_spec
    from ray_jobs.checkpoint import read_model
    from ray_jobs.data import load_sequences
    from ray_jobs.metrics import evaluate
    from ray_jobs.models.baselines import Popularity
    from ray_jobs.scoring import evaluate_split, load_for_catalogue
    from ray_jobs.train import train_local
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [
        f"lake.root={ml100k_lake}", f"train.checkpoint_dir={tmp_path}", "train.epochs=6", "train.lr=0.006",
        "train.min_lr_ratio=1.0", "train.eval_every=6",  # valid NDCG@10 0.043 after 6 epochs (popularity 0.035)
        "train.batch_size=64", "model={kind: generative, dim: 32, paths: 2, tokenizer_steps: 200}",
        f"model.cache_dir={warm_cache}"])
    data = load_sequences(spec)
    pop = evaluate(Popularity(data.popularity).score, data.valid.histories, data.valid.targets, data.num_items,
                   data.popularity).metrics["ndcg@10"]
    result = train_local(spec, data)
    assert result.best_metric > pop, (result.best_metric, pop)
    ckpt = read_model(result.checkpoint)
    assert int(ckpt.weights["table_items"]) == 1682 and ckpt.weights["tokens"].shape == (1683, 4)
    loaded = load_for_catalogue(result.checkpoint, data.catalogue)
    assert loaded.scorable.sum() == 1682  # the 333 items outside the k-core too: tokens from their text
    assert loaded.model.table_hash == loaded.model.table().hash
    again = evaluate_split(spec, loaded.score_function(), data, "valid", scorable=loaded.scorable).metrics
    assert again["ndcg@10"] == pytest.approx(result.best_metric) and again["unscorable_items"] == 0
    state = loaded.model.user_embeddings(torch.tensor([[0, 0, 1, 50, 181]]))
    items, _ = loaded.model.beam(state, 10)
    assert ((items >= 1) & (items <= 1682)).all() and len(set(items[0].tolist())) == 10
    # a catalogue that grew by two items since training: they get tokens from their text through the
    # model's own tokenizer, no known item's tokens move, and they are decoded like any other
    import numpy as np
    from ray_jobs.catalogue import Catalogue
    c = data.catalogue
    grown = Catalogue(c.item_ids + ["9998", "9999"],
                      c.item_text + [c.item_text[50] + " (director's cut)", "Title: Galaxy Quest. Year: 1999. "
                                     "Genres: Comedy, Sci-Fi."],
                      np.append(c.active, [True, True]), np.append(c.kcore, [False, False]))
    model = ckpt.build(catalogue=grown)
    assert int(model.table_items) == 1684 and torch.equal(model.tokens[:1683], ckpt.weights["tokens"])
    rows = {tuple(r) for r in model.tokens[1:].tolist()}
    assert len(rows) == 1684  # the new items' token sequences are new ones
    scores = model.item_log_probs(state)
    assert torch.isfinite(scores[0, 1:]).all() and scores[0, 1:].exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    assert model.tries[0].is_item(model.tokens[1684, list(model.orders[0])].tolist())

    # registered with the grown catalogue: a data-only pyfunc that speaks source ids and serves the new
    # items by the tokens their text gave at registration — loading it embeds nothing
    import mlflow
    import pandas as pd

    from ray_jobs import serving, tracking
    from ray_jobs.models import llm
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reg = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": uri})})
    version = serving.log_recommender(reg, tracking.start_run(reg, "pyfunc", "train"), result.checkpoint, grown)

    def no_item_llm(*args, **kwargs):
        raise AssertionError("the registered generative model loaded an item LLM")
    monkeypatch.setattr(llm.ItemLLM, "__init__", no_item_llm)
    served = mlflow.pyfunc.load_model(f"models:/{reg.registered_model_name()}/{version}")
    out = served.predict(pd.DataFrame({"history": [["1", "50", "181", "not-an-item"]]}), params={"k": 1684})
    ids = out["item_ids"][0]
    assert out["unknown_history_items"][0] == 1 and len(ids) == 1684 - 3 and {"9998", "9999"} <= set(ids)
    assert "" not in ids and not {"1", "50", "181"} & set(ids) and np.isfinite(out["scores"][0]).all()


@torch.no_grad()
def test_beam_and_corp_decoding_give_catalogue_scores():
    """model.decode=beam: the beam's items keep their exact log-probabilities, the rest rank last (a
    beam as wide as the catalogue is the exact ranking); corp: every order's beam, merged."""
    g, _ = _generator()
    states = torch.randn(3, 16)
    exact = g.item_scores(states)
    assert torch.equal(exact, g.item_log_probs(states))
    g.decode, g.beam_width = "beam", 40
    assert torch.allclose(g.item_scores(states)[:, 1:], exact[:, 1:], atol=1e-5)
    g.beam_width = 5
    narrow = g.item_scores(states)
    finite = torch.isfinite(narrow)
    assert (finite.sum(-1) == 5).all() and torch.allclose(narrow[finite], exact[finite], atol=1e-5)
    g.decode = "corp"
    merged = g.item_scores(states)
    assert (torch.isfinite(merged).sum(-1) >= 5).all() and torch.isinf(merged[:, 0]).all()


def test_the_tokenizer_stage_resumes_reports_its_figures_and_is_read_once(ml100k_lake, tmp_path,
                                                                          ml100k_item_embeddings):
    """The tokenizer as its own stage of the one loop (`run_steps` over a `LocalBackend`): interrupted
    after 25 of 40 steps and rerun, it resumes from its step-20 checkpoint to the fit an uninterrupted
    run makes; its report has the reconstruction error, each codebook's perplexity and
    dead codes and the collision share; a second call reads the files; the generator is built from
    them (and refuses to build when the stage has not run)."""
    from conftest import copy_item_embeddings

    from jobs.spec import load_spec
    from ray_jobs.data import load_sequences
    from ray_jobs.loop import Reporter
    from ray_jobs.models import build_model
    from ray_jobs.models.generative import tokenizer_inputs
    from ray_jobs.tokenizer import fit_tokenizer

    class Crash(Reporter):
        def log(self, step, metrics):
            if step == 25 and "tokenizer/loss" in metrics:
                raise RuntimeError("worker lost")

    def spec(cache):
        return load_spec("jobs/specs/movielens-100k-smoke.yaml", [
            f"lake.root={ml100k_lake}", "model={kind: generative, dim: 16, books: 3, codes: 32, tokenizer_steps: 40, max_disambiguation: 256}",
            f"model.cache_dir={copy_item_embeddings(cache, ml100k_item_embeddings)}"])
    first, second = spec(tmp_path / "a"), spec(tmp_path / "b")
    data = load_sequences(first)
    with pytest.raises(FileNotFoundError, match="the tokenizer stage writes them"):
        build_model(first, data.item_text)
    with pytest.raises(RuntimeError, match="worker lost"):
        fit_tokenizer(first, data, Crash(), checkpoint_every=10)
    _, files = tokenizer_inputs(first.model, data.item_text)
    assert not files.complete and (tmp_path / "a" / "semantic-ids" / f"{files.key}.run" / "last.pt").exists()
    # the stage's folder is keyed by every setting of the fit: another generator resumes it
    resumed = fit_tokenizer(first.model_copy(update={"model": first.model.model_copy(update={"dim": 24}),
                                                     "train": first.train.model_copy(update={"lr": 0.01})}),
                            data, checkpoint_every=10)
    assert resumed["restarts"] == 1 and resumed["steps"] == 40 and files.complete
    assert not os.path.exists(files.run)  # the run folder goes once the table is written
    straight = fit_tokenizer(second, data, checkpoint_every=10)
    # the same fit: the resumed run continues from its step-20 checkpoint to exactly the table and figures
    # of a run that was never interrupted
    assert straight["restarts"] == 0
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "restarts")} == \
        {k: v for k, v in straight.items() if k not in ("seconds", "restarts")}
    _, other = tokenizer_inputs(second.model, data.item_text)
    assert np.array_equal(TokenTable.from_parquet(files.table).tokens, TokenTable.from_parquet(other.table).tokens)
    assert [r["step"] for r in straight["curve"]] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert straight["curve"][-1]["recon_mse"] < straight["curve"][0]["recon_mse"]
    assert {"book0_perplexity", "book2_dead_codes", "collision_share"} <= set(straight)
    assert 1 <= straight["book0_perplexity"] <= 32 and 0 <= straight["collision_share"] < 1
    assert fit_tokenizer(second, data) == straight  # read, not fitted again
    model = build_model(second, data.item_text)
    assert model.table().hash == straight["hash"]


def test_a_tokenizer_with_collaborative_factors_is_keyed_by_the_data_and_lifts_a_new_item_from_its_text(
        ml100k_lake, tmp_path, ml100k_item_embeddings):
    """model.collaborative: the stage joins every item's text embedding to its factors from the
    training interactions; its files are keyed by what names those interactions too (a generator built
    without them is refused, with them it reads the stage's table); a new item of a grown catalogue
    gets its tokens from its text alone, through the saved map."""
    from conftest import copy_item_embeddings

    from jobs.spec import load_spec
    from ray_jobs.data import load_sequences
    from ray_jobs.models import build_model
    from ray_jobs.models.generative import build_generator, interactions_of, tokenizer_inputs
    from ray_jobs.models.llm import minilm_item_embeddings
    from ray_jobs.tokenizer import fit_tokenizer

    cache = copy_item_embeddings(tmp_path / "c", ml100k_item_embeddings)
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [
        f"lake.root={ml100k_lake}",
        "model={kind: generative, dim: 16, books: 3, codes: 32, tokenizer_steps: 40, max_disambiguation: 256, "
        "collaborative: 16}", f"model.cache_dir={cache}"])  # (a model= override resets the section)
    data = load_sequences(spec)
    report = fit_tokenizer(spec, data)
    named = interactions_of(spec, data.versions)
    assert report["settings"]["collaborative"] == 16 and report["settings"]["interactions"] == named
    assert named["sequences"] == data.versions["sequences"] and named["withhold"] == 0
    text_only = spec.model.model_copy(update={"collaborative": 0})
    withheld = spec.model_copy(update={"train": spec.train.model_copy(update={"withhold": 1})})
    keys = {tokenizer_inputs(text_only, data.item_text)[1].key,
            tokenizer_inputs(spec.model, data.item_text, named)[1].key,
            tokenizer_inputs(spec.model, data.item_text, interactions_of(withheld, data.versions))[1].key}
    assert len(keys) == 3  # text only, and factors from two different sets of training interactions
    with pytest.raises(ValueError, match="interactions"):
        build_model(spec, data.item_text)
    model = build_model(spec, data.item_text, versions=data.versions)
    assert model.table().hash == report["hash"] and model.quantizer.lift.abs().sum() > 0
    # the catalogue's last item as a new one: its tokens from its text through the trained tokenizer
    known = model.tokens[:-1].clone()
    grown = build_generator(spec.model, data.item_text, spec.data.max_seq_len, known)
    grown.load_state_dict(model.state_dict() | {"tokens": grown.tokens, "table_items": grown.table_items,
                                                 "table_pin": grown.table_pin})
    q, text = model.quantizer, torch.from_numpy(minilm_item_embeddings(spec.model, data.item_text)[-1:])
    assert torch.equal(grown.tokens[-1, :-1], q(q.inputs(text)).codes[0])
    assert int(grown.table_items) == data.num_items


def test_a_generator_refuses_weights_of_another_token_table_and_an_edited_one():
    """The table's hash is pinned in the weights: weights trained on another tokenizer's table are
    refused by a generator built on this one (they would remap every item), an edited table is refused
    against its own pin, and weights saved before tables were pinned still load."""
    g, _ = _generator(seed=0)
    other, _ = _generator(seed=1)  # another table of the same shape
    with pytest.raises(ValueError, match="remap every item"):
        other.load_state_dict(g.state_dict())
    edited = {k: v.clone() for k, v in g.state_dict().items()}
    edited["tokens"][1, 0] = (edited["tokens"][1, 0] + 1) % 4
    with pytest.raises(ValueError, match="is not the one they pin"):
        _generator(seed=0)[0].load_state_dict(edited)
    old = {k: v for k, v in g.state_dict().items() if k != "table_pin"}
    again, _ = _generator(seed=0)
    again.load_state_dict(old)
    assert again.table_hash == g.table_hash
