"""Semantic ids: each item as a few discrete tokens learned from its content embedding, the
vocabulary of the generative family (`model.kind: generative`).

Two quantizers over item embeddings x (n, d), both trained as auto-encoders (reconstruct x from
its quantized latent) with a straight-through estimator:

ResidualQuantizer (RQ, TIGER's ordered codes): an encoder MLP gives z; level l = 1..L picks the
    code nearest to the residual r_l (r_1 = z, r_{l+1} = r_l - e_l) from its own codebook of K;
    the decoder reconstructs x from sum_l e_l. Codes are ordered: level 1 is the coarsest.
ParallelQuantizer (MPQ, after REG4Rec's MoE-based parallel quantization): M experts, each with its
    own encoder head z_m and codebook, pick one code each from the same item; a router
    g(x) = softmax(W x) (M weights summing to 1) gates the experts' quantized vectors, and the
    decoder reconstructs x from their concatenation [M g_1 e_1, ..., M g_M e_M] (a uniform router
    passes them unscaled). Concatenated, each expert's slot reaches the decoder on its own, so the
    experts learn complementary codes (a weighted sum lets each one learn the whole item alone, and
    their codes collide). The M tokens come from parallel codebooks: no order among them is implied.

Loss per quantized vector (level or expert): ||sg(r) - e||^2 (moves the code) + beta ||r - sg(e)||^2
(commitment), plus the reconstruction MSE. Codebooks start from k-means of the first latents (no
dead codes at the start).

Input: the item's text embedding, or it joined with collaborative factors from the training
interactions (`collaborative_factors`; `_Quantizer.inputs`, which predicts them from the text for an
item without interactions through a map saved with the quantizer).

Collisions: items whose codes are all equal get one more token, a disambiguation index 0, 1, ... in
item-index order (TIGER's rule); an item with a unique code gets 0. That last token is ordered: it
is generated after the M (or L) tokens and means nothing on its own, so the parallel tokens stay
unordered among themselves.

The `TokenTable` (item index -> tokens) belongs to the trained tokenizer, is saved as Parquet (data,
no code) and carries a content hash that a generator pins.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """k centroids of the rows of x (Lloyd's algorithm from k distinct random rows; an empty
    cluster takes the row farthest from its centroid)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().float()
    c = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    if len(c) < k:  # fewer rows than codes: repeat with a little noise
        c = torch.cat([c, c[torch.randint(len(c), (k - len(c),), generator=gen)]
                       + 1e-3 * torch.randn(k - len(c), x.shape[1], generator=gen)])
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
            else:
                far = torch.cdist(x, c).min(1).values.argmax()
                c[j] = x[far]
    return c


def nearest(r: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(r.float(), codebook.float()).argmin(-1)


@dataclass
class Quantized:
    codes: torch.Tensor          # (n, L or M) code index per level / expert
    recon: torch.Tensor          # (n, d) reconstruction of the input
    loss: torch.Tensor           # reconstruction + codebook + commitment
    recon_loss: torch.Tensor
    gates: torch.Tensor | None = None  # (n, M) router weights (MPQ)


class _Quantizer(nn.Module):
    def __init__(self, dim: int, latent: int, books: int, codes: int, hidden: int, beta: float,
                 collaborative: int = 0) -> None:
        """`dim`: the input's width, the text embedding's plus `collaborative` factors (`inputs`)."""
        super().__init__()
        self.books, self.codes, self.beta = books, codes, beta
        self.codebooks = nn.Parameter(torch.randn(books, codes, latent) * 0.1)
        self.decoder = mlp([latent, hidden, dim])
        self.initialised = False
        self.collaborative = collaborative
        # the catalogue's mean text embedding, set by the tokenizer stage (`fit_center`): text embeddings
        # of templated item texts share a large common part, which would leave little for the codes
        self.register_buffer("center", torch.zeros(dim - collaborative))
        if collaborative:  # fitted with the tokenizer (`collaborative_factors`), saved with its weights
            self.register_buffer("lift", torch.zeros(dim - collaborative, collaborative))
            self.register_buffer("cf_scale", torch.ones(()))

    def fit_center(self, text: torch.Tensor) -> torch.Tensor:
        """Set `center` to the mean of the catalogue's text embeddings; returns them centred."""
        self.center.copy_(text.mean(0))
        return text - self.center

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a quantizer saved before `center` existed read the text embeddings as they are
        state_dict.setdefault(prefix + "center", torch.zeros_like(self.center))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def inputs(self, text: torch.Tensor, factors: torch.Tensor | None = None) -> torch.Tensor:
        """What the quantizer reads for items with these text embeddings: the text less `center`,
        alone or joined with their unit collaborative factors times `cf_scale` — given, or predicted
        from the centred text by the fitted linear map `lift` (an item without training interactions,
        a new item)."""
        text = text - self.center
        if not self.collaborative:
            return text
        if factors is None:
            factors = F.normalize(text @ self.lift, dim=-1)
        return torch.cat([text, self.cf_scale * factors], -1)

    def _vq(self, r: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Code of each row of r in codebook b, the straight-through quantized vector, the VQ loss."""
        book = self.codebooks[b]
        idx = nearest(r.detach(), book)
        # an embedding lookup, not book[idx]: the same values, but its backward sums each code's rows in a
        # fixed order, where indexing's adds them with atomics on several CPU threads (two fits of one
        # seed differed)
        e = F.embedding(idx, book)
        loss = F.mse_loss(e, r.detach()) + self.beta * F.mse_loss(r, e.detach())
        return idx, r + (e - r).detach(), loss


class ResidualQuantizer(_Quantizer):
    """RQ-VAE: L ordered levels of K codes over the residuals of one latent."""

    def __init__(self, dim: int, latent: int = 32, levels: int = 3, codes: int = 256, hidden: int = 256,
                 beta: float = 0.25, collaborative: int = 0) -> None:
        super().__init__(dim, latent, levels, codes, hidden, beta, collaborative)
        self.encoder = mlp([dim, hidden, latent])

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0) -> None:
        r = self.encoder(x)
        for b in range(self.books):
            self.codebooks.data[b] = kmeans(r, self.codes, seed=seed + b)
            r = r - self.codebooks.data[b][nearest(r, self.codebooks.data[b])]
        self.initialised = True

    def forward(self, x: torch.Tensor) -> Quantized:
        z = self.encoder(x)
        r, total, codes, vq = z, torch.zeros_like(z), [], 0.0
        for b in range(self.books):
            idx, q, loss = self._vq(r, b)
            codes.append(idx)
            total = total + q.detach()
            r = r - q.detach()
            vq = vq + loss
        recon = self.decoder(z + (total - z).detach())  # straight through once: the encoder gets one gradient
        rl = F.mse_loss(recon, x)
        return Quantized(torch.stack(codes, 1), recon, rl + vq, rl)


class ParallelQuantizer(_Quantizer):
    """MPQ: M experts (encoder head + codebook of K) quantize the item in parallel; a router mixes them."""

    def __init__(self, dim: int, latent: int = 32, experts: int = 4, codes: int = 256, hidden: int = 256,
                 beta: float = 0.25, collaborative: int = 0) -> None:
        super().__init__(dim, latent, experts, codes, hidden, beta, collaborative)
        self.encoders = nn.ModuleList(mlp([dim, hidden, latent]) for _ in range(experts))
        self.router = nn.Linear(dim, experts)
        self.decoder = mlp([experts * latent, hidden, dim])

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0) -> None:
        for b, enc in enumerate(self.encoders):
            self.codebooks.data[b] = kmeans(enc(x), self.codes, seed=seed + b)
        self.initialised = True

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.router(x), dim=-1)

    def forward(self, x: torch.Tensor) -> Quantized:
        g = self.gates(x)
        slots, codes, vq = [], [], 0.0
        for b, enc in enumerate(self.encoders):
            idx, q, loss = self._vq(enc(x), b)
            codes.append(idx)
            slots.append(self.books * g[:, b:b + 1] * q)
            vq = vq + loss
        recon = self.decoder(torch.cat(slots, -1))
        rl = F.mse_loss(recon, x)
        return Quantized(torch.stack(codes, 1), recon, rl + vq, rl, g)


def collaborative_factors(train: list[np.ndarray], num_items: int, text: np.ndarray, k: int,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit item factors (num_items, k) of items 1..n from the training sequences, and the linear map
    (d, k) that predicts them from the items' text embeddings `text` (num_items, d).

    Factors: the left singular vectors of the item x user matrix (1 where the user has the item in
    training), both sides normalised by the square root of their degree, past the trivial ones (at
    singular value 1, sqrt(degree) on each connected part of the graph: as many as the graph has
    parts with an edge, counted on the graph) the next k, scaled by the square roots of
    their singular values, each row then scaled to unit length — items that the same users have get
    close factors. The map: ridge regression from text to factors over the items with training
    interactions and non-vanishing factors; the others take its prediction (unit length too)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import svds
    users = np.repeat(np.arange(len(train)), [len(s) for s in train])
    items = np.concatenate(train).astype(np.int64) - 1 if len(train) else np.zeros(0, np.int64)
    a = sp.csr_matrix((np.ones(len(items)), (items, users)), shape=(num_items, len(train)))
    a.data[:] = 1.0  # duplicates summed: presence
    di, du = np.asarray(a.sum(1)).ravel(), np.asarray(a.sum(0)).ravel()
    norm = sp.diags(1 / np.sqrt(np.maximum(di, 1))) @ a @ sp.diags(1 / np.sqrt(np.maximum(du, 1)))
    # one trivial vector (singular value 1) per connected part of the item-user graph that has an edge
    graph = sp.bmat([[None, a], [a.T, None]], format="csr")
    _, part = connected_components(graph, directed=False)
    trivial = int((np.bincount(part) > 1).sum())
    if k + trivial >= min(norm.shape):
        raise ValueError(f"model.collaborative={k}: at most {min(norm.shape) - 1 - trivial} factors for {num_items} "
                         f"items and {len(train)} users in {trivial} connected parts")
    u, sv, _ = svds(norm, k=k + trivial, random_state=seed)
    top = np.argsort(-sv)[trivial:]
    factors = u[:, top] * np.sqrt(sv[top])
    factors *= np.sign(factors[np.abs(factors).argmax(0), np.arange(k)])  # a fixed sign per factor
    length = np.linalg.norm(factors, axis=1)
    seen = (di > 0) & (length > 1e-6 * length.max())
    if not seen.any():
        raise ValueError("collaborative factors: no item has a training interaction with non-vanishing factors")
    factors[seen] /= length[seen, None]
    x = np.asarray(text, dtype=np.float64)
    gram = x[seen].T @ x[seen]
    lift = np.linalg.solve(gram + 0.1 * np.trace(gram) / len(gram) * np.eye(len(gram)), x[seen].T @ factors[seen])
    cold = x[~seen] @ lift
    factors[~seen] = cold / np.linalg.norm(cold, axis=1, keepdims=True).clip(1e-12)
    return factors.astype(np.float32), lift.astype(np.float32)


def with_disambiguation(codes: np.ndarray) -> np.ndarray:
    """(n, B) codes -> (n, B + 1): a last token numbering the items that share a code, in row order
    (0 for an item whose code is unique), so every row is unique."""
    codes = np.asarray(codes, dtype=np.int64)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    suffix = np.zeros(len(codes), dtype=np.int64)
    sorted_groups = inverse[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_groups))[0] + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    suffix[order] = np.arange(len(order)) - run_start
    return np.concatenate([codes, suffix[:, None]], axis=1)


def utilisation(codes: np.ndarray, codes_per_book: int) -> dict:
    """Per codebook: perplexity exp(H(p)) of the code usage p (K = every code used equally, 1 = one
    code for all) and the number of dead (never used) codes; and the share of items whose code
    collides with another's before disambiguation."""
    codes = np.asarray(codes)
    books = []
    for b in range(codes.shape[1]):
        counts = np.bincount(codes[:, b], minlength=codes_per_book).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        books.append({"perplexity": float(np.exp(-(p * np.log(p)).sum())), "dead_codes": int((counts == 0).sum())})
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return {"books": books, "collision_share": float((counts[inverse.reshape(-1)] > 1).mean())}


@dataclass
class TokenTable:
    """Item index -> its semantic tokens (row 0 is padding, all zeros). `kind` is rq or mpq; `codes`
    the codebook size (token values of the first B columns), the last column the disambiguation."""
    kind: str
    codes: int
    tokens: np.ndarray  # (num_items + 1, B + 1) int64

    @property
    def hash(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.codes}:{self.tokens.shape}".encode())
        h.update(np.ascontiguousarray(self.tokens, dtype=np.int64).tobytes())
        return h.hexdigest()

    def require(self, pinned: str, what: str) -> None:
        """Refuse a table that is not the one `what` was trained with (a retrained tokenizer would
        silently remap every item)."""
        if pinned != self.hash:
            raise ValueError(f"{what} was trained on the token table {pinned[:12]}, but this table is "
                             f"{self.hash[:12]}: the tokens name other items; use the table saved with it")

    def to_parquet(self, path: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.table({"item_idx": np.arange(len(self.tokens)), "tokens": list(self.tokens)})
        pq.write_table(table.replace_schema_metadata({"kind": self.kind, "codes": str(self.codes), "hash": self.hash}),
                       path)

    @classmethod
    def from_parquet(cls, path: str) -> "TokenTable":
        import pyarrow.parquet as pq
        t = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
        tokens = np.stack([np.asarray(x, dtype=np.int64) for x in t.column("tokens").to_pylist()])
        table = cls(meta["kind"], int(meta["codes"]), tokens[np.argsort(t.column("item_idx").to_numpy())])
        table.require(meta["hash"], f"the token table file {path}")  # the file is what it says it is
        return table

    def extended(self, codes: np.ndarray, max_disambiguation: int) -> "TokenTable":
        """This table with items appended (their codes (k, B), in item order): each new item's
        disambiguation token is one past the largest its code already has (0 for a new code), so
        every known item keeps its tokens."""
        body = self.tokens[1:]
        nxt: dict[tuple, int] = {}
        for row in body.tolist():
            key = tuple(row[:-1])
            nxt[key] = max(nxt.get(key, 0), row[-1] + 1)
        rows = []
        for c in np.asarray(codes, dtype=np.int64).tolist():
            suffix = nxt.get(tuple(c), 0)
            if suffix >= max_disambiguation:
                raise ValueError(f"a new item's code {tuple(c)} is shared by {suffix} items already: more than "
                                 f"max_disambiguation={max_disambiguation}")
            nxt[tuple(c)] = suffix + 1
            rows.append(c + [suffix])
        new = np.asarray(rows, dtype=np.int64).reshape(-1, self.tokens.shape[1])
        return TokenTable(self.kind, self.codes, np.concatenate([self.tokens, new]))

    @classmethod
    def of(cls, kind: str, codes_per_book: int, codes: np.ndarray) -> "TokenTable":
        """From the codes of items 1..n (row i - 1 = item i)."""
        body = with_disambiguation(codes)
        return cls(kind, codes_per_book, np.concatenate([np.zeros((1, body.shape[1]), np.int64), body]))
