"""The generative semantic-id recommender (REG4Rec family): a causal transformer reads the history as
items made of semantic tokens (`semantic_ids.TokenTable`) and generates the next item's tokens.

History: an item's input vector is the sum of its tokens' embeddings (one per token column), so the
attention cost grows with the number of items, not of tokens; the user encoder is SASRec's
(`SASRec.encode_vectors`). Decoding the next item: a GRU cell walks the item's T tokens in a
*reasoning order* (a permutation of the M parallel token columns, the disambiguation column last);
at each step it predicts the next column's token from its state plus that column's query embedding,
over the tokens the trie allows after the prefix (a softmax restricted to real continuations), so

    log P(item | user, order) = sum_j log softmax_{allowed(prefix_j)}(logits_j)[token_j]

is a proper distribution over the catalogue, every decoded sequence is a real item, and the same
quantity trains the model (next-item cross-entropy, token by token) and scores it. Orders: the
canonical one (columns 0..M-1, then the disambiguation) and `paths - 1` more drawn with a fixed seed;
training uses one of them per target, drawn at random; the exhaustive item score is the canonical
order's log-probability.

Inference: `item_log_probs` scores every item exactly (level by level over the trie's unique
prefixes); `beam` decodes the top items under one order by beam search over the trie (it can only
emit real items); `corp` merges several orders' beams: the item most orders decode first is the
consensus, an order whose first item disagrees is pruned (consistency-oriented pruning, after
REG4Rec's CORP), and the surviving orders' probabilities are averaged into one ranked list.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jobs.schema import GenerativeSpec, JobSpec
from jobs.spec import absolute_path
from ray_jobs.models.sasrec import SASRec
from ray_jobs.models.semantic_ids import ParallelQuantizer, ResidualQuantizer, TokenTable


class TokenTrie:
    """The items' token sequences in one column order as a prefix tree in arrays: `child[j]` (nodes
    at depth j, vocabulary) -> the node at depth j + 1 (-1: no item continues that way), `leaf_item`
    (nodes at depth T) -> item index, and each item's node at every depth."""

    def __init__(self, tokens: np.ndarray, order: tuple[int, ...], vocab: int) -> None:
        seqs = np.asarray(tokens)[1:, list(order)]           # items 1..n, columns in this order
        n, depth = seqs.shape
        self.order, self.depth = order, depth
        self.node = np.zeros((depth + 1, n), dtype=np.int64)  # node of each item's prefix at each depth
        self.child = []
        for j in range(depth):
            pairs = self.node[j] * vocab + seqs[:, j]
            uniq, nxt = np.unique(pairs, return_inverse=True)
            self.node[j + 1] = nxt.reshape(-1)
            table = np.full((int(self.node[j].max()) + 1, vocab), -1, dtype=np.int64)
            table[uniq // vocab, uniq % vocab] = np.arange(len(uniq))
            self.child.append(table)
        leaves = self.node[depth]
        if len(np.unique(leaves)) != n:
            raise ValueError("token table: two items share a token sequence (a table needs its disambiguation column)")
        self.leaf_item = np.zeros(n, dtype=np.int64)
        self.leaf_item[leaves] = np.arange(1, n + 1)

    def is_item(self, sequence) -> bool:
        if len(sequence) != self.depth:
            return False
        node = 0
        for j, t in enumerate(sequence):
            if t < 0 or t >= self.child[j].shape[1]:
                return False
            node = self.child[j][node, t]
            if node < 0:
                return False
        return True


def pin_of(table_hash: str) -> torch.Tensor:
    """A table's hash as a tensor that travels with the weights (32 bytes)."""
    return torch.tensor(list(bytes.fromhex(table_hash)), dtype=torch.uint8)


def hash_of(pin: torch.Tensor) -> str:
    return bytes(pin.cpu().tolist()).hex()


class SemanticGenerator(nn.Module):
    reads_time = False
    reads_catalogue = False

    decodes_items = True

    def __init__(self, table: TokenTable, max_len: int, dim: int = 64, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2, paths: int = 1, max_disambiguation: int = 64, seed: int = 0,
                 num_items: int | None = None, quantizer: nn.Module | None = None,
                 pending: torch.Tensor | None = None, decode: str = "exact", beam_width: int = 50) -> None:
        """`table`: the tokens of items 1..n; `num_items` (default n): the catalogue, which may extend
        the table — items past it have no tokens: they are never decoded (score -inf) and read as
        padding in a history. `quantizer`: the trained tokenizer (frozen; its weights travel with the
        model's); `pending` (num_items - n, d): the text embeddings of the items past the table, which
        the quantizer tokenizes once its trained weights are loaded (`load_state_dict`)."""
        super().__init__()
        self.quantizer = quantizer
        if quantizer is not None:
            quantizer.requires_grad_(False)
        self.pending = pending
        self.max_disambiguation = max_disambiguation
        self.decode, self.beam_width = decode, beam_width
        tokens = np.asarray(table.tokens, dtype=np.int64)
        self.columns = tokens.shape[1]
        m = self.columns - 1
        if int(tokens[:, -1].max()) >= max_disambiguation:
            raise ValueError(f"token table: {int(tokens[:, -1].max()) + 1} items share one code, more than "
                             f"max_disambiguation={max_disambiguation}")
        self.table_kind, self.codes = table.kind, table.codes
        self.vocab = max(table.codes, max_disambiguation)
        self.num_items = len(tokens) - 1 if num_items is None else num_items
        if self.num_items < len(tokens) - 1:
            raise ValueError(f"token table of {len(tokens) - 1} items for a catalogue of {self.num_items}")
        full = np.zeros((self.num_items + 1, self.columns), dtype=np.int64)
        full[:len(tokens)] = tokens
        # both travel with the weights: the table is the model's vocabulary, not the ETL's
        self.register_buffer("tokens", torch.from_numpy(full))
        self.register_buffer("table_items", torch.tensor(len(tokens) - 1))
        # the hash of the table the weights were trained with (`TokenTable.hash`), pinned in the weights:
        # a load checks the table it brings against it and against the table this generator holds
        self.register_buffer("table_pin", pin_of(table.hash))
        self.col_emb = nn.Embedding(self.columns * self.vocab, dim)  # column c, token t -> row c * vocab + t
        self.query = nn.Embedding(self.columns, dim)
        self.user = SASRec(None, max_len, dim, blocks, heads, dropout)
        self.cell = nn.GRUCell(dim, dim)
        self.out = nn.Linear(dim, self.columns * self.vocab)
        nn.init.normal_(self.col_emb.weight, std=dim ** -0.5)
        rng = np.random.default_rng(seed)
        perms = [tuple(range(m))] + [tuple(int(c) for c in p) for p in
                                     (rng.permutation(m) for _ in range(10 * paths))]
        orders = list(dict.fromkeys(perms))[:paths]
        if len(orders) < paths and m <= 6:  # few columns: take the distinct permutations there are
            orders = list(dict.fromkeys(orders + list(itertools.permutations(range(m)))))[:paths]
        self.orders = [o + (m,) for o in orders]
        self._loaded = False
        self._held: str | None = None
        self._rebuild()
        self.register_load_state_dict_pre_hook(SemanticGenerator._before_load)
        self.register_load_state_dict_post_hook(lambda module, keys: module._after_load())

    def _before_load(self, state: dict, prefix: str, *args) -> None:
        self._held = self.table().hash
        if prefix + "table_pin" not in state and prefix + "tokens" in state:  # saved before tables were pinned
            n = int(state[prefix + "table_items"])
            state[prefix + "table_pin"] = pin_of(TokenTable(self.table_kind, self.codes,
                                                            state[prefix + "tokens"][:n + 1].cpu().numpy()).hash)

    def _after_load(self) -> None:
        """Refuse weights whose table is not the one they pin (an edited table), or not the one this
        generator holds (weights trained on another tokenizer's table: it would remap every item)."""
        loaded = self.table().hash
        if loaded != hash_of(self.table_pin):
            raise ValueError(f"generative weights: their token table (hash {loaded[:12]}) is not the one they pin "
                             f"({hash_of(self.table_pin)[:12]})")
        if self._held is not None and loaded != self._held:
            raise ValueError(f"generative weights trained on token table {loaded[:12]} loaded into a generator built "
                             f"on table {self._held[:12]}: another tokenizer's table would remap every item")
        self._held = None
        self._loaded = True
        self._rebuild()

    @torch.no_grad()
    def tokenize_pending(self) -> None:
        """Give the items past the table their tokens from their text embeddings through the trained
        quantizer (new items of a grown catalogue: cold start without retraining the tokenizer)."""
        if self.quantizer is None:
            raise ValueError("this generative model has no tokenizer to give new items tokens")
        n, k = int(self.table_items), len(self.pending)
        self.quantizer.eval()
        codes = self.quantizer(self.quantizer.inputs(self.pending.float().to(self.tokens.device))).codes.cpu().numpy()
        grown = self.table().extended(codes, self.max_disambiguation)
        self.tokens[n + 1:n + 1 + k] = torch.from_numpy(grown.tokens[n + 1:]).to(self.tokens.device)
        self.table_items.fill_(n + k)
        self.pending = None

    def _rebuild(self) -> None:
        """The tries and the hash of the table now held (after construction and after loading weights);
        pending items are tokenized first, by the loaded quantizer."""
        if self.pending is not None and len(self.pending) and self._loaded:
            self.tokenize_pending()
        table = self.table()
        self.table_pin.copy_(pin_of(table.hash))  # the grown table, once new items have their tokens
        self.tries = [TokenTrie(table.tokens, o, self.vocab) for o in self.orders]

    def prefix_groups(self) -> torch.Tensor:
        """(T + 1, n + 1): each item's group at every depth of its tokens in the canonical order (depth
        0: one group, depth T: the item itself; items without tokens and the padding share the all-zero
        row's groups, and never carry probability) — the token prefixes align.method=pars credits."""
        tokens = self.tokens[:, list(self.orders[0])].cpu().numpy()
        groups = [np.zeros(len(tokens), dtype=np.int64)]
        for t in range(1, tokens.shape[1] + 1):
            groups.append(np.unique(tokens[:, :t], axis=0, return_inverse=True)[1].reshape(-1))
        return torch.from_numpy(np.stack(groups))

    @property
    def table_hash(self) -> str:
        """The hash of the token table the generator holds (what its weights pin)."""
        return hash_of(self.table_pin)

    def table(self) -> TokenTable:
        return TokenTable(self.table_kind, self.codes, self.tokens[:int(self.table_items) + 1].cpu().numpy())

    @classmethod
    def of(cls, m: GenerativeSpec, table: TokenTable, num_items: int, max_len: int, quantizer: nn.Module | None = None,
           pending: torch.Tensor | None = None) -> "SemanticGenerator":
        return cls(table, max_len, m.dim, m.blocks, m.heads, m.dropout, m.paths, m.max_disambiguation, m.seed,
                   num_items, quantizer, pending, m.decode, m.beam_width)

    # ------------------------------------------------------------------ the user side
    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids -> (B, L, dim): the sum of each item's token embeddings (0 for padding)."""
        toks = self.tokens[ids]                                                     # (B, L, T)
        rows = toks + torch.arange(self.columns, device=ids.device) * self.vocab
        known = (ids != 0) & (ids <= self.table_items)
        return self.col_emb(rows).sum(-2) * known.unsqueeze(-1)

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L) left-padded histories -> (B, L, dim) user states (position t decodes item t + 1)."""
        return self.user.encode_vectors(self.item_vectors(ids), ids, last_only)

    def user_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(ids, last_only=True)[:, -1]

    # ------------------------------------------------------------------ one decoding step
    def _logits(self, state: torch.Tensor, col: int) -> torch.Tensor:
        """(..., dim) -> (..., vocab) logits of column `col`'s token."""
        w = self.out.weight[col * self.vocab:(col + 1) * self.vocab]
        b = self.out.bias[col * self.vocab:(col + 1) * self.vocab]
        return F.linear(state + self.query.weight[col], w, b)

    def _advance(self, state: torch.Tensor, col: int, token: torch.Tensor) -> torch.Tensor:
        x = self.col_emb(token + col * self.vocab) + self.query.weight[col]
        return self.cell(x.reshape(-1, x.shape[-1]), state.reshape(-1, state.shape[-1])).reshape(state.shape)

    @staticmethod
    def _masked_log_softmax(logits: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the allowed tokens (child >= 0); -inf elsewhere, and on rows with none."""
        allowed = child >= 0
        logp = torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.where(allowed, logp, torch.full_like(logp, float("-inf")))

    # ------------------------------------------------------------------ training
    def sequence_loss(self, states: torch.Tensor, targets: torch.Tensor, order: int = 0) -> torch.Tensor:
        """Summed next-item negative log-likelihood of `targets` (N,) (ids >= 1) from `states` (N, dim),
        token by token along reasoning order `order`."""
        trie = self.tries[order]
        idx = (targets - 1).cpu().numpy()
        state, loss = states, states.new_zeros((), dtype=torch.float32)
        for j, col in enumerate(trie.order):
            child = torch.from_numpy(trie.child[j][trie.node[j][idx]]).to(states.device)   # (N, vocab)
            tok = self.tokens[targets, col]
            logp = self._masked_log_softmax(self._logits(state, col), child)
            loss = loss - logp.gather(1, tok[:, None]).sum()
            if j + 1 < len(trie.order):
                state = self._advance(state, col, tok)
        return loss

    # ------------------------------------------------------------------ inference
    def item_log_probs(self, state: torch.Tensor, order: int = 0) -> torch.Tensor:
        """Exact log P(item | user) of every item, (B, n + 1) (-inf at padding): level by level over
        the trie's prefixes, each prefix's state computed once per user. Two savings, exact both: a
        prefix with one continuation (most disambiguation steps) contributes log 1 = 0 without its
        logits, and the GRU's input gates of the prefixes, the same for every user, are computed once."""
        trie, b, device = self.tries[order], state.shape[0], state.device
        states, scores = state[:, None, :], state.new_zeros((b, 1), dtype=torch.float32)   # the root
        for j, col in enumerate(trie.order):
            child = torch.from_numpy(trie.child[j]).to(device)                           # (nodes_j, vocab)
            allowed = child >= 0
            parent, token = torch.nonzero(allowed, as_tuple=True)
            order_ = child[parent, token].argsort()                                     # children by node id
            parent, token = parent[order_], token[order_]
            branching = allowed.sum(1) > 1
            step = scores.new_zeros((b, len(parent)))
            if bool(branching.any()):
                nodes = torch.nonzero(branching, as_tuple=True)[0]
                logp = self._masked_log_softmax(self._logits(states[:, nodes], col), child[nodes][None])
                slot = torch.full((len(child),), -1, dtype=torch.long, device=device)
                slot[nodes] = torch.arange(len(nodes), device=device)
                edge = branching[parent]
                step[:, edge] = logp[:, slot[parent[edge]], token[edge]]
            scores = scores[:, parent] + step
            if j + 1 < len(trie.order):
                states = self._advance_shared(states[:, parent], col, token)
        out = torch.full((b, self.num_items + 1), float("-inf"), device=device)
        out[:, torch.from_numpy(trie.leaf_item).to(device)] = scores
        return out

    def _advance_shared(self, state: torch.Tensor, col: int, token: torch.Tensor) -> torch.Tensor:
        """`_advance` for (B, E, dim) states whose E tokens are the same for every user: the GRU cell's
        equations (gates r, z, n as `nn.GRUCell` orders them) with the input side computed once per token."""
        x = self.col_emb(token + col * self.vocab) + self.query.weight[col]
        gi = F.linear(x, self.cell.weight_ih, self.cell.bias_ih)                        # (E, 3 dim)
        gh = F.linear(state, self.cell.weight_hh, self.cell.bias_hh)                    # (B, E, 3 dim)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (state - n)

    def item_scores(self, state: torch.Tensor) -> torch.Tensor:
        """(B, n + 1) scores of the catalogue by `decode`: exact log-probabilities, or the log-probabilities
        of the items a beam (or CORP over every order's beam) decodes, -inf for the rest."""
        if self.decode == "exact":
            return self.item_log_probs(state)
        if self.decode == "beam":
            items, scores = self.beam(state, self.beam_width)
        else:
            items, scores = corp([self.beam(state, self.beam_width, o) for o in range(len(self.orders))])
        out = torch.full((state.shape[0], self.num_items + 1), float("-inf"), device=scores.device)
        out.scatter_(1, items.to(out.device), scores.to(out.device))
        out[:, 0] = float("-inf")  # padding entries of a short beam
        return out

    def beam(self, state: torch.Tensor, width: int, order: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search over the trie in reasoning order `order`: (B, width) item ids, best first, and
        their log-probabilities (fewer real items than `width`: the rest are id 0 at -inf)."""
        trie, b, device = self.tries[order], state.shape[0], state.device
        nodes = torch.zeros((b, 1), dtype=torch.long, device=device)
        scores = torch.zeros((b, 1), device=device)
        states = state[:, None, :]
        for j, col in enumerate(trie.order):
            child = torch.from_numpy(trie.child[j]).to(device)[nodes.clamp(min=0)]       # (B, W, vocab)
            child = torch.where((nodes >= 0)[..., None], child, torch.full_like(child, -1))
            logp = self._masked_log_softmax(self._logits(states, col), child)
            total = (scores[..., None] + logp).reshape(b, -1)                             # (B, W * vocab)
            k = min(width, total.shape[1])
            scores, flat = total.topk(k, dim=-1)
            beam_of, token = flat // self.vocab, flat % self.vocab
            nodes = child.reshape(b, -1).gather(1, flat)
            nodes = torch.where(torch.isfinite(scores), nodes, torch.full_like(nodes, -1))
            if j + 1 < len(trie.order):
                states = self._advance(states.gather(1, beam_of[..., None].expand(-1, -1, states.shape[-1])),
                                       col, token)
        items = torch.from_numpy(trie.leaf_item).to(device)[nodes.clamp(min=0)]
        items = torch.where(nodes >= 0, items, torch.zeros_like(items))
        if items.shape[1] < width:
            pad = width - items.shape[1]
            items = F.pad(items, (0, pad))
            scores = F.pad(scores, (0, pad), value=float("-inf"))
        return items, scores


TOKENIZER_VERSION = 4  # part of the cache key: a changed quantizer or stage never reads an older table
MINILM_DIM = 384       # the text embeddings the tokenizer reads (all-MiniLM-L6-v2)


def new_quantizer(m: GenerativeSpec, text_dim: int) -> nn.Module:
    """The untrained quantizer of `model.quantizer` over text embeddings of width `text_dim` (joined with
    `model.collaborative` factors)."""
    kind = ParallelQuantizer if m.quantizer == "mpq" else ResidualQuantizer
    return kind(text_dim + m.collaborative, m.latent, m.books, m.codes, m.quantizer_hidden, m.commitment,
                m.collaborative)


def interactions_of(spec: JobSpec, versions: dict) -> dict:
    """What names a run's training interactions, the same in a driver and in its workers (whose data
    is a shard): the lake, the dataset, the versions of its sequences and item index, the split the
    model fits on and what it withholds — the key of a tokenizer with collaborative factors."""
    return {"lake": absolute_path(spec.lake.root),
            "data": spec.data.name, "sequences": versions.get("sequences"), "item_index": versions.get("item_index"),
            "fit_on": spec.train.fit_on, "withhold": spec.train.withhold}


def build_generator(m: GenerativeSpec, item_text: list[str], max_len: int,
                    known: torch.Tensor | None = None, interactions: dict | None = None) -> SemanticGenerator:
    """A generative model for a catalogue: a fresh one (the token table and tokenizer the tokenizer
    stage fitted on the catalogue's text, `token_table`), or, with `known` (a checkpoint's token table), one whose trained
    weights are loaded next — items past the known table get their tokens from their text then.
    `interactions`: what names the training interactions (`interactions_of`; collaborative factors)."""
    from ray_jobs.models.llm import minilm_item_embeddings
    if known is None:
        table, quantizer = token_table(m, item_text, interactions)
        return SemanticGenerator.of(m, table, len(item_text) - 1, max_len, quantizer)
    new_text = item_text[len(known):]  # only the items past the known table are embedded, if any
    x = minilm_item_embeddings(m, [""] + new_text)[1:] if new_text else np.zeros((0, MINILM_DIM), np.float32)
    pending = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return SemanticGenerator.of(m, TokenTable(m.quantizer, m.codes, known.numpy()), len(item_text) - 1, max_len,
                                new_quantizer(m, MINILM_DIM), pending)


@dataclass
class TokenizerFiles:
    """Where a catalogue's semantic ids live under `model.cache_dir/semantic-ids/`, keyed by the
    items' embeddings and the tokenizer settings: the token table (Parquet), the trained quantizer
    (safetensors), the tokenizer stage's report (JSON) and its resumable run folder."""
    key: str
    settings: dict
    table: str
    weights: str
    report: str
    run: str

    @property
    def complete(self) -> bool:
        return os.path.exists(self.table) and os.path.exists(self.weights)


def tokenizer_inputs(m: GenerativeSpec, item_text: list[str],
                     interactions: dict | None = None) -> tuple[np.ndarray, TokenizerFiles]:
    """The items' MiniLM text embeddings (items 1..n) and where their tokenizer's files are: keyed by
    the embeddings, the settings and, with collaborative factors, what names the training
    interactions (`interactions_of`: the same for a driver and its workers)."""
    from ray_jobs.models.llm import minilm_item_embeddings
    x = np.ascontiguousarray(minilm_item_embeddings(m, item_text)[1:], dtype=np.float32)
    settings = {"version": TOKENIZER_VERSION, **{k: getattr(m, k) for k in (
        "quantizer", "books", "codes", "latent", "quantizer_hidden", "commitment", "tokenizer_steps", "tokenizer_lr",
        "seed")}}
    if m.collaborative:
        if interactions is None:
            raise ValueError(f"model.collaborative={m.collaborative}: the tokenizer's files are keyed by the training "
                             "interactions its factors come from, and none were named (build the model with its data)")
        settings |= {"collaborative": m.collaborative, "interactions": interactions}
    key = hashlib.sha256(x.tobytes() + json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    base = os.path.join(m.cache_dir, "semantic-ids", key)
    return x, TokenizerFiles(key, settings, f"{base}.parquet", f"{base}.safetensors", f"{base}.json", f"{base}.run")


def token_table(m: GenerativeSpec, item_text: list[str],
                interactions: dict | None = None) -> tuple[TokenTable, nn.Module]:
    """The semantic ids of a catalogue's items and the trained quantizer of `model.quantizer`, as the
    tokenizer stage (`ray_jobs.tokenizer`, run by training before any generator is built) wrote them:
    every worker and every rerun reads the same table."""
    from safetensors.torch import load_file
    x, files = tokenizer_inputs(m, item_text, interactions)
    if not files.complete:
        raise FileNotFoundError(
            f"model.quantizer={m.quantizer}: no semantic ids for these {len(x)} items under "
            f"{os.path.dirname(files.table)} (key {files.key}): the tokenizer stage writes them "
            "(ray_jobs.tokenizer.fit_tokenizer; `llmrec train` runs it before training a fresh generative model; "
            "on a cluster, model.cache_dir must be storage the driver and every worker see)")
    torch.manual_seed(m.seed)
    q = new_quantizer(m, x.shape[1])
    q.load_state_dict(load_file(files.weights))
    return TokenTable.from_parquet(files.table), q.eval()


class GenerativeLoss(nn.Module):
    """The training module of a generative model: the summed next-item negative log-likelihood of
    every target, token by token, each target along a reasoning order drawn at random (seeded by
    the loop's per-step seed). Same call as `losses.SequenceLoss` (negatives are not used: the
    decoder's softmax runs over the tokens that continue a real item)."""

    def __init__(self, model: SemanticGenerator, universe: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("universe", universe, persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None = None,
                reduction: str = "sum", stamps: torch.Tensor | None = None) -> torch.Tensor:
        states = self.model(inputs)
        valid = (targets != 0) & (targets <= self.model.table_items)  # an item without tokens cannot be decoded
        h, t = states[valid], targets[valid]
        orders = torch.randint(len(self.model.orders), (len(t),))
        loss = states.new_zeros((), dtype=torch.float32)
        for o in range(len(self.model.orders)):
            pick = orders == o
            if pick.any():
                loss = loss + self.model.sequence_loss(h[pick.to(h.device)], t[pick.to(t.device)], o)
        if reduction == "mean":
            return loss / valid.sum().clamp(min=1)
        return loss


def corp(paths: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-oriented pruning of several reasoning orders' beams, per user: [(items (B, W),
    log-probs (B, W)) per order] -> (items, scores) (B, W') ranked. The consensus is the item the most
    orders decode first (a tie goes to the larger summed probability); an order whose first item
    differs is dropped; an item's score is log of its mean probability over the surviving orders (0
    in an order whose beam lacks it)."""
    b = paths[0][0].shape[0]
    out_items, out_scores = [], []
    for u in range(b):
        firsts = [int(items[u, 0]) for items, _ in paths]
        votes: dict[int, list[float]] = {}
        for (items, logp), first in zip(paths, firsts):
            votes.setdefault(first, []).append(float(logp[u, 0].exp()))
        consensus = max(votes, key=lambda i: (len(votes[i]), sum(votes[i])))
        kept = [(items[u], logp[u]) for (items, logp), first in zip(paths, firsts) if first == consensus]
        prob: dict[int, float] = {}
        for items, logp in kept:
            for i, lp in zip(items.tolist(), logp.tolist()):
                if i != 0:
                    prob[i] = prob.get(i, 0.0) + float(np.exp(lp)) / len(kept)
        ranked = sorted(prob.items(), key=lambda kv: -kv[1])
        out_items.append([i for i, _ in ranked])
        out_scores.append([float(np.log(p)) if p > 0 else float("-inf") for _, p in ranked])
    width = max(len(r) for r in out_items)
    items = torch.zeros((b, width), dtype=torch.long)
    scores = torch.full((b, width), float("-inf"))
    for u, (i, s) in enumerate(zip(out_items, out_scores)):
        items[u, :len(i)] = torch.tensor(i, dtype=torch.long)
        scores[u, :len(s)] = torch.tensor(s)
    return items, scores
