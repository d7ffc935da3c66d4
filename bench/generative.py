"""The generative semantic-id model's decoding modes and inference cost: one trained checkpoint ranked
by its exact item scores, by beam search and by CORP over every reasoning order, beside embedding
models, on one split.

    python bench/generative.py --spec jobs/specs/movielens-1m-generative.yaml \
        --checkpoint .checkpoints/movielens-1m-generative/best.pt [--model sasrec=PATH ...] [--users 1000]

Prints HR/NDCG@10, MRR and the seconds per 1,000 users of each mode (and of each embedding model,
full ranking by cosine), and writes bench/results/generative-<data>.json. Figures only. The token
table's utilisation (perplexity and dead codes per codebook, collisions) comes from its report under
the model's cache folder.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time


from jobs.provenance import ROOT, provenance, write_result
from jobs.spec import load_spec
from ray_jobs.data import load_sequences
from ray_jobs.scoring import evaluate_split, load_for_catalogue

COLUMNS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--checkpoint", required=True, help="a generative model's best.pt / model.pt")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="embedding models to time beside it")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--split", default="test")
    ap.add_argument("--beam-width", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args()
    spec = load_spec(args.spec, args.overrides)
    data = load_sequences(spec)
    users = len(data.split(args.split).histories)
    rows, timings = {}, {}

    def run(name: str, loaded) -> None:
        t0 = time.perf_counter()
        r = evaluate_split(spec, loaded.score_function(), data, args.split, scorable=loaded.scorable).metrics
        seconds = time.perf_counter() - t0
        rows[name] = {c: r[c] for c in COLUMNS}
        timings[name] = round(seconds / users * 1000, 3)
        print(f"{name:>24}: " + "  ".join(f"{c} {r[c]:.4f}" for c in COLUMNS) + f"  ({timings[name]} s / 1,000 users)",
              flush=True)

    gen = load_for_catalogue(args.checkpoint, data.catalogue)
    for mode in ("exact", "beam", "corp"):
        gen.model.decode, gen.model.beam_width = mode, args.beam_width
        run(f"generative ({mode})", gen)
    for item in args.model:
        name, path = item.split("=", 1)
        run(name, load_for_catalogue(path, data.catalogue))
    m = gen.ckpt.spec.model
    reports = sorted(glob.glob(os.path.join(m.cache_dir, "semantic-ids", "*.json")), key=os.path.getmtime)
    tokenizer = next((json.load(open(p)) for p in reversed(reports)
                      if json.load(open(p)).get("hash") == gen.model.table().hash), None)
    out = args.out or str(ROOT / f"bench/results/generative-{spec.data.name}.json")
    write_result(out, {**provenance(), "spec": args.spec, "checkpoint": args.checkpoint, "split": args.split,
                       "users": users, "beam_width": args.beam_width, "orders": [list(o) for o in gen.model.orders],
                       "metrics": rows, "seconds_per_1000_users": timings, "tokenizer": tokenizer})


if __name__ == "__main__":
    main()
