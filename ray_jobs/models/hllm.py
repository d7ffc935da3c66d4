"""HLLM: an item LLM turns each item's text into an embedding, a user
LLM reads the sequence of item embeddings and predicts the next one (Chen et al., 2024, "HLLM").

- Item LLM: any Hugging Face model — a hub id, a local folder, a `.gguf` file, the packaged offline
  all-MiniLM-L6-v2 (`minilm`) or SmolLM2-135M-Instruct GGUF (`smollm2`), or a random-initialised `random:llama` / `random:qwen2` of a given
  size. Pooling (`model.item_pooling`): encoders mean-pool the text tokens; a causal LM that trains
  (end_to_end, lora) reads a learned [ITEM] embedding appended after the text; a frozen causal LM
  (cached mode) mean-pools too — an [ITEM] token that never trains would be a random probe.
- User model (`model.user_model`): a causal LLM fed `inputs_embeds` (random-initialised, or
  pretrained — `user_llm_layers` keeps the first k layers of one), or HSTU units (`user_hstu`: the
  ID HSTU's units, relative position and time biases, reading the item vectors in place of ID
  embeddings). The item side projects to its width.
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

from contextlib import contextmanager

import torch
from torch import nn

from jobs.schema import HLLMSpec
from ray_jobs.models.llm import ItemLLM, cached_item_table, load_backbone


class HLLM(nn.Module):
    """A `SequenceRecommender` (`ray_jobs.models`) whose items are their text."""
    reads_time = False
    query_time = "event"
    reads_catalogue = True  # scoring may hand user_embeddings the catalogue it already computed
    decodes_items = False

    def __init__(self, spec: HLLMSpec, item_text: list[str], max_len: int,
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
        self.user_llm = self.user_hstu = None
        if spec.user_model == "hstu":
            from ray_jobs.models.hstu import HSTU
            h = spec.user_hstu
            self.user_hstu = HSTU(None, max_len, h.dim, h.blocks, h.heads, spec.user_dropout, h.time_buckets,
                                  h.query_time, h.attention_dim, h.block)  # its input dropout is user_dropout
            self.reads_time, self.query_time = self.user_hstu.reads_time, h.query_time
            self.input_dropout, user_dim = nn.Identity(), h.dim
        else:
            self.user_llm, _ = load_backbone(spec.user_llm, spec.user_llm_size, vocab_for_random=8,
                                             attention_dropout=spec.user_dropout, layers=spec.user_llm_layers)
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
        if self.mode == "cached":  # in the adapter's precision: a bf16 engine casts parameters, not this buffer
            enc = self.item_table[uniq].to(self.adapter[0].weight.dtype)
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

    def forward(self, ids: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """ids: (B, L) left-padded item ids -> (B, L, user_dim); position t predicts item t+1. times:
        an HSTU user model with a time bias reads them (`HSTU.forward`)."""
        if self.user_hstu is not None:
            return self.user_hstu.encode(self.item_embeddings(ids), ids != 0, times)
        mask = (ids != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.user_llm(inputs_embeds=self.input_dropout(self.item_embeddings(ids)), attention_mask=mask,
                             position_ids=positions).last_hidden_state

    def user_embeddings(self, ids: torch.Tensor, times: torch.Tensor | None = None,
                        catalogue: torch.Tensor | None = None) -> torch.Tensor:
        """The next-item query of each history, (B, user_dim). Scoring a Llama user LLM (eval mode)
        or HSTU units runs the last layer for the last position only: the keys and values still come
        from every position, the queries, attention output and MLP of the other positions are never
        read; and given `catalogue` (all_item_embeddings() of these weights) the histories' item
        vectors are read from it instead of going through the item side again."""
        if self.user_hstu is not None:
            x = self.item_embeddings(ids) if catalogue is None else catalogue[ids]
            return self.user_hstu.encode(x, ids != 0, times, last_only=True)[:, -1]
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
