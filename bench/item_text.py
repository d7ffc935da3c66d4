"""Item-text embeddings on one spec's catalogue: does an item's MiniLM vector depend on anything but
its text, and how well does the semantic-id tokenizer spread the items over its codes?

For each `model.item_text_padding` (left, right):
  alone       cosine between each of `--sample` items' vector in the catalogue batch (what the cache
              stores) and the same text embedded by itself
  grown       cosine between each item's vector before and after one longer text joins the catalogue
              (what a landed day with a new item does when the cache must embed it beside the rest)
  ild_top10   ILD@10 of the 10 most popular training items (1 - mean pairwise cosine): the
              beyond-accuracy space every model is measured in
  tokenizer   the quantizer of the generative spec's settings (`--generative`; text only, without
              collaborative factors), fitted as the
              tokenizer stage fits it (k-means codebooks, full-batch Adam), on the raw embeddings and
              on the embeddings less the catalogue's mean: collision share before disambiguation,
              the largest group of items sharing every code, reconstruction MSE

    python bench/item_text.py --spec jobs/specs/movielens-1m-sasrec.yaml \\
        --generative jobs/specs/movielens-1m-generative.yaml [--sample 300]

Writes bench/results/item-text-<dataset>.json. Figures only, no assertions.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from jobs.provenance import provenance, write_result
from jobs.schema import HLLMSpec
from jobs.spec import load_spec
from ray_jobs.data import load_sequences
from ray_jobs.metrics import intra_list_diversity
from ray_jobs.models.generative import new_quantizer
from ray_jobs.models.llm import ItemLLM, embed_all_items
from ray_jobs.models.semantic_ids import utilisation


def embed(item_llm: ItemLLM, texts: list[str]) -> torch.Tensor:
    """The texts embedded as one padded batch (as the cache embeds a catalogue), run in chunks."""
    t = item_llm.tokenize(texts)
    return embed_all_items(item_llm, t["input_ids"], t["attention_mask"], zero_first=False)


def fit_quantizer(m, x: torch.Tensor, centred: bool) -> dict:
    torch.manual_seed(m.seed)
    q = new_quantizer(m, x.shape[1])
    if centred:
        q.fit_center(x)
    xt = q.inputs(x)
    q.init_codebooks(xt, m.seed)
    opt = torch.optim.Adam(q.parameters(), lr=m.tokenizer_lr)
    for _ in range(m.tokenizer_steps):
        out = q(xt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        out = q(xt)
    codes = out.codes.numpy()
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return {"collision_share": round(utilisation(codes, m.codes)["collision_share"], 4),
            "largest_group": int(counts.max()), "distinct_codes": int(len(counts)),
            "recon_mse": round(float(out.recon_loss), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--generative", required=True, help="a generative spec: its tokenizer settings")
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--out")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    gen = load_spec(args.generative).model.model_copy(update={"collaborative": 0})  # the text part alone
    data = load_sequences(spec)
    texts = list(data.item_text[1:])
    counts = np.bincount(np.concatenate(list(data.fit_rows("train").values())), minlength=len(texts) + 1)[1:]
    top = np.argsort(-counts, kind="stable")[:10]
    sample = np.random.default_rng(0).choice(len(texts), min(args.sample, len(texts)), replace=False)
    longer = "Title: " + "an unusually long title for a film that joins the catalogue today " * 8
    result = {**provenance(), "spec": args.spec, "generative": args.generative, "items": len(texts),
              "sample": len(sample), "paddings": {}}
    torch.set_grad_enabled(False)
    for padding in ("left", "right"):
        item_llm = ItemLLM(HLLMSpec(kind="hllm", item_text_padding=padding)).eval()
        catalogue = embed(item_llm, texts)
        grown = embed(item_llm, texts + [longer])[:-1]
        alone = torch.cat([embed(item_llm, [texts[i]]) for i in sample])
        cos_alone = F.cosine_similarity(catalogue[sample], alone).numpy()
        cos_grown = F.cosine_similarity(catalogue, grown).numpy()
        with torch.enable_grad():
            tokenizer = {name: fit_quantizer(gen, catalogue.float(), centred)
                         for name, centred in (("raw", False), ("centred", True))}
        row = {"padded_length": int(item_llm.tokenize(texts)["input_ids"].shape[1]),
               "alone_cosine": {"min": round(float(cos_alone.min()), 4), "mean": round(float(cos_alone.mean()), 4)},
               "grown_cosine": {"min": round(float(cos_grown.min()), 4), "mean": round(float(cos_grown.mean()), 4)},
               "ild_top10": round(intra_list_diversity(top[None], 10, catalogue), 4),
               "ild_top10_grown": round(intra_list_diversity(top[None], 10, grown), 4),
               "tokenizer": tokenizer}
        result["paddings"][padding] = row
        print(f"{padding}: padded to {row['padded_length']} tokens; vs alone cosine min {row['alone_cosine']['min']}"
              f" mean {row['alone_cosine']['mean']}; after a longer text joins min {row['grown_cosine']['min']} "
              f"mean {row['grown_cosine']['mean']}; ILD@10 of the top-10 popular {row['ild_top10']} "
              f"({row['ild_top10_grown']} grown)", flush=True)
        for name, t in tokenizer.items():
            print(f"  tokenizer ({gen.quantizer}, {gen.books}x{gen.codes}, {gen.tokenizer_steps} steps) on {name} "
                  f"embeddings: collision share {t['collision_share']}, largest group {t['largest_group']}, "
                  f"{t['distinct_codes']} distinct codes, recon MSE {t['recon_mse']}", flush=True)
    out = args.out or f"bench/results/item-text-{spec.data.name}.json"
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
