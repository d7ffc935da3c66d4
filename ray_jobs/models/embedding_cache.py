"""Item embeddings of a frozen item model, cached by content: per item, by a hash of its rendered
text, in a folder named by the item-model settings. A rebuilt lake, another dataset or a grown
catalogue reuses every embedding whose text and settings match and computes only the rest; nothing
is keyed by table version or row count, so nothing stale can be served for another catalogue.

Stored as safetensors (tensors only: loading it runs no code), rewritten atomically under a lock
file that is never followed through a symbolic link.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Callable

import torch

from jobs.files import open_nofollow, write_atomic

FILE = "embeddings.safetensors"


def settings_digest(settings: str) -> str:
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def text_digests(texts: list[str]) -> torch.Tensor:
    """(N, 32) uint8: sha256 of each text."""
    return torch.tensor([list(hashlib.sha256(t.encode()).digest()) for t in texts], dtype=torch.uint8).reshape(-1, 32)


class EmbeddingCache:
    """`<folder>/items-<settings digest>/embeddings.safetensors`: rows of (text hash, vector)."""

    def __init__(self, folder: str, settings: str) -> None:
        self.settings = settings
        self.dir = os.path.join(folder, f"items-{settings_digest(settings)}")
        self.path = os.path.join(self.dir, FILE)
        self.computed = 0  # texts embedded (not found in the cache) by the last `table` call

    def _read(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not os.path.exists(self.path):
            return None
        from safetensors.torch import load_file
        stored = load_file(self.path)
        return stored["hashes"], stored["vectors"]

    def table(self, texts: list[str], embed: Callable[[list[int]], torch.Tensor],
              seed: tuple[list[str], torch.Tensor] | None = None) -> torch.Tensor:
        """(len(texts), d) float32: row i is the embedding of `texts[i]`; row 0 (padding) is zeros.
        Texts neither in the cache nor in `seed` (texts and their rows, e.g. a checkpoint's table,
        computed with these settings) are embedded by `embed(rows)` (rows: positions in `texts`), and
        what was not stored is added (a read-only cache, e.g. a registered model's, is left as it is)."""
        digests = text_digests(texts)
        keys = [bytes(d.tolist()) for d in digests]
        stored = self._read()
        rows: dict[bytes, torch.Tensor] = {} if stored is None else \
            {bytes(h.tolist()): v for h, v in zip(stored[0], stored[1])}
        seeded = {} if seed is None else {bytes(h.tolist()): v for h, v in zip(text_digests(seed[0][1:]), seed[1][1:])}
        missing = [i for i in range(1, len(texts)) if keys[i] not in rows and keys[i] not in seeded]
        self.computed = len(missing)
        fresh = dict(zip(missing, embed(missing).float())) if missing else {}
        dim = next(iter([*rows.values(), *seeded.values(), *fresh.values()])).shape[0] if len(texts) > 1 else 0
        out = torch.zeros((len(texts), dim), dtype=torch.float32)
        for i in range(1, len(texts)):
            out[i] = fresh[i] if i in fresh else rows.get(keys[i], seeded.get(keys[i]))
        new = [i for i in range(1, len(texts)) if keys[i] not in rows]
        if new:
            try:
                self._add(digests[new], out[new])
            except OSError as exc:
                import warnings
                warnings.warn(f"item-embedding cache {self.dir} not written ({exc}); the embeddings are used "
                              "without being cached", RuntimeWarning)
        return out

    def _add(self, hashes: torch.Tensor, vectors: torch.Tensor) -> None:
        """Append rows under the folder's lock (another process may be adding its own)."""
        from safetensors.torch import save_file
        os.makedirs(self.dir, exist_ok=True)
        fd = open_nofollow(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stored = self._read()
            if stored is not None:
                have = {bytes(h.tolist()) for h in stored[0]}
                keep = [i for i, h in enumerate(hashes) if bytes(h.tolist()) not in have]
                hashes = torch.cat([stored[0], hashes[keep]])
                vectors = torch.cat([stored[1], vectors[keep]])
            tensors = {"hashes": hashes.contiguous(), "vectors": vectors.contiguous()}
            write_atomic(self.path, lambda tmp: save_file(tensors, tmp))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def export(self, texts: list[str], folder: str) -> str:
        """A cache under `folder` holding exactly the embeddings of `texts` (all must be in this one):
        what a registered model ships, so serving embeds nothing it was registered with."""
        def absent(rows: list[int]) -> torch.Tensor:
            raise FileNotFoundError(f"item-embedding cache {self.path}: {len(rows)} of the catalogue's items were never "
                                    "embedded here")
        table = self.table(texts, absent)
        target = EmbeddingCache(folder, self.settings)
        target._add(text_digests(texts[1:]), table[1:])
        os.remove(os.path.join(target.dir, ".lock"))  # what ships is data only
        return target.path
