"""Which seen items the evaluator removes from the ranking, and what that does to a test figure.

Our evaluator masks every item in a user's history (the whole history, however long). The
generative-recommenders harness masks the items of the model's input window only — its evaluation
rows hold the `max_sequence_length` (200 on ML-1M) most recent items, and those are its
`invalid_ids` — so for a user with a longer history the older items it rated stay in the ranking,
and as ML-1M users rate a movie once, each of them is a certain miss. This benchmark scores the
same checkpoints on the test split both ways: as our evaluator does, and with each history cut to
the model's window (the model reads only that window either way, so its scores are unchanged and
only the mask differs). Figures only.

    python bench/seen_mask.py --spec jobs/specs/movielens-1m-hstu-orig.yaml \
        --checkpoint hstu-orig=.checkpoints/movielens-1m-hstu-orig/last.pt [--out ...]
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from jobs.provenance import provenance, write_result
from jobs.spec import load_spec
from ray_jobs.data import EvalSplit, load_sequences
from ray_jobs.metrics import headline
from ray_jobs.scoring import evaluate_split, score_function


def window_only(split: EvalSplit, window: int) -> EvalSplit:
    """The split with each history (and its timestamps) cut to its `window` most recent events."""
    return dataclasses.replace(split, histories=[h[-window:] for h in split.histories],
                               times=[t[-window:] for t in split.times] if split.times else split.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="the spec whose gold tables the checkpoints were trained on")
    ap.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--out", default="bench/results/seen-mask-movielens-1m.json")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    data = load_sequences(spec)
    window = spec.data.max_seq_len
    cut = window_only(data.test, window)
    longer = int(sum(len(h) > window for h in data.test.histories))
    extra = int(sum(max(len(h) - window, 0) for h in data.test.histories))
    print(f"{longer} of {len(data.test.targets)} test users have more than {window} history items "
          f"({extra} items in all that only the whole-history mask removes)")
    result = {**provenance(), "spec": args.spec, "window": window, "users": len(data.test.targets), "users_longer_than_window": longer,
              "items_outside_windows": extra, "models": {}}
    for name, path in (c.split("=", 1) for c in args.checkpoint):
        score, _, _ = score_function(spec, data, np.zeros((0, 0)), path)
        row = {"whole_history_mask": headline(evaluate_split(spec, score, data, data.test).metrics),
               "window_mask": headline(evaluate_split(spec, score, data, cut).metrics)}
        result["models"][name] = {"checkpoint": path} | row
        a, b = row["whole_history_mask"], row["window_mask"]
        print(f"{name}: test HR@10 / NDCG@10, whole-history mask {a['hr@10']:.4f} / {a['ndcg@10']:.4f}; "
              f"window mask (generative-recommenders) {b['hr@10']:.4f} / {b['ndcg@10']:.4f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
