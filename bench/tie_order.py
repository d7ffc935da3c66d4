"""What the order of same-second events does to a test figure: trained checkpoints evaluated on the
test split as the gold table orders it, and with each user's same-second events reordered at random.

The gold `sequences` table sorts a user's events by (timestamp, item index), and item indices follow
first appearance in the log, so among events sharing a second the item the catalogue met last is
last — and the last event of a user is its test target. Other harnesses order such ties otherwise
(generative-recommenders sorts with pandas, whose default sort is not stable). For every user whose
test target shares its second with earlier events, this benchmark draws that group's order at
random (the target is then any member of the group, the others stay in the history at the group's
positions), keeps everything else, and evaluates the same checkpoint with the same evaluator.
Figures only; the models were trained on the gold order, so this measures the test side alone.

    python bench/tie_order.py --spec jobs/specs/movielens-1m-hstu-ref.yaml \
        --checkpoint hstu-ref=.checkpoints/movielens-1m-hstu-ref/last.pt [--seeds 3] [--out ...] \
        [--train --set train.epochs=30 --set train.checkpoint_dir=...]

`--train` trains the spec's model (with the `--set` overrides) on the data with every user's
same-second groups in a random order — one order per user, the same in every split — and reports
its test figures: what the model reaches when the order of a second's events carries nothing.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from jobs.provenance import provenance, write_result
from jobs.spec import load_spec
from ray_jobs.data import EvalSplit, SeqData, load_sequences
from ray_jobs.metrics import HEADLINE, headline
from ray_jobs.scoring import evaluate_split, score_function


def tied_rows(split: EvalSplit) -> np.ndarray:
    """Rows whose target shares its timestamp with at least one history event."""
    if not split.times:
        raise ValueError("the split has no timestamps: same-second ties cannot be found")
    return np.asarray([i for i, (t, tt) in enumerate(zip(split.times, split.target_times))
                       if len(t) and t[-1] == tt], dtype=np.int64)


def target_second(split: EvalSplit, i: int) -> np.ndarray:
    """Positions of row i's history events that share its target's second (the history's last ones)."""
    return np.nonzero(split.times[i] == split.target_times[i])[0]


def reorder_ties(split: EvalSplit, rng: np.random.Generator) -> EvalSplit:
    """The split with each target's same-second group (the target and the history events of its
    second) in a random order."""
    histories, targets = [h.copy() for h in split.histories], split.targets.copy()
    for i in tied_rows(split):
        group = target_second(split, i)
        items = rng.permutation(np.append(histories[i][group], targets[i]))
        histories[i][group], targets[i] = items[:-1], items[-1]
    return dataclasses.replace(split, histories=histories, targets=targets)


def shuffle_ties_everywhere(data: SeqData, seed: int) -> SeqData:
    """The whole data set with every user's same-second events in a random order (seeded), one order
    per user shared by every split: the test row's history + target is the user's sequence, the
    validation row is all but its last item, the training row all but its last two."""
    rng = np.random.default_rng(seed)
    full = {}
    for u, h, t, ts, tts in zip(data.test.users, data.test.histories, data.test.targets, data.test.times,
                                data.test.target_times):
        items, times = np.append(h, t), np.append(ts, tts)
        starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(times)]):
            if b - a > 1:
                items[a:b] = rng.permutation(items[a:b])
        full[int(u)] = items
    v, test_history = data.valid, dict(zip(data.test.users.tolist(), data.test.histories))
    for u, h, t in zip(v.users.tolist(), v.histories, v.targets):  # the splits are prefixes of one sequence
        if not np.array_equal(np.append(h, t), test_history[u]):
            raise ValueError(f"user {u}: the validation row is not the test sequence less its last item")
    for u, seq in zip(data.train_users.tolist(), data.train):
        if not np.array_equal(seq, test_history[u][:-1]):
            raise ValueError(f"user {u}: the training row is not the test sequence less its last two items")
    valid = dataclasses.replace(v, histories=[full[int(u)][:-2] for u in v.users],
                                targets=np.asarray([full[int(u)][-2] for u in v.users], dtype=np.int64))
    test = dataclasses.replace(data.test, histories=[full[int(u)][:-1] for u in data.test.users],
                               targets=np.asarray([full[int(u)][-1] for u in data.test.users], dtype=np.int64))
    train = [full[int(u)][:-2] for u in data.train_users]
    popularity = np.bincount(np.concatenate(train), minlength=data.num_items + 1) if train else data.popularity
    return dataclasses.replace(data, train=train, valid=valid, test=test, popularity=popularity)


def metrics_of(spec, score, data: SeqData, split: EvalSplit, rows: np.ndarray | None = None) -> dict:
    return headline(evaluate_split(spec, score, data, split if rows is None else split.subset(rows)).metrics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="the spec whose gold tables the checkpoints were trained on")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                    help="a model trained on the gold order, evaluated on both orders")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="also train the spec's model on the data with every "
                    "same-second group in a random order (all splits) and report its test figures")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="spec overrides for --train")
    ap.add_argument("--out", default="bench/results/tie-order-movielens-1m.json")
    args = ap.parse_args()
    if not (args.checkpoint or args.train):
        ap.error("nothing to do: give --checkpoint NAME=PATH and/or --train")
    spec = load_spec(args.spec)
    data = load_sequences(spec)
    tied = tied_rows(data.test)
    pop = data.popularity
    target_rank = []  # the gold target's popularity rank within its group: 0 most popular, 1 least
    for i in tied:
        group = np.append(data.test.histories[i][target_second(data.test, i)], data.test.targets[i])
        target_rank.append(float((pop[group] > pop[data.test.targets[i]]).sum()) / (len(group) - 1))
    print(f"{len(tied)} of {len(data.test.targets)} test targets share their second with earlier events; the gold "
          f"target's popularity rank within its group averages {np.mean(target_rank):.3f} (random order: 0.5)")
    result = {**provenance(), "spec": args.spec, "users": len(data.test.targets), "tied_users": len(tied),
              "gold_target_popularity_rank": round(float(np.mean(target_rank)), 4), "models": {}}
    for name, path in (c.split("=", 1) for c in args.checkpoint):
        score, _, _ = score_function(spec, data, np.zeros((0, 0)), path)
        row = {"gold": metrics_of(spec, score, data, data.test), "gold_tied": metrics_of(spec, score, data, data.test, tied)}
        shuffled = [reorder_ties(data.test, np.random.default_rng(seed)) for seed in range(args.seeds)]
        row["random"] = [metrics_of(spec, score, data, s) for s in shuffled]
        row["random_tied"] = [metrics_of(spec, score, data, s, tied) for s in shuffled]
        row["random_mean"] = {k: round(float(np.mean([r[k] for r in row["random"]])), 4) for k in HEADLINE}
        result["models"][name] = {"checkpoint": path} | row
        print(f"{name}: test HR@10 / NDCG@10, gold order {row['gold']['hr@10']:.4f} / {row['gold']['ndcg@10']:.4f}; "
              f"random tie order (mean of {args.seeds}) {row['random_mean']['hr@10']:.4f} / "
              f"{row['random_mean']['ndcg@10']:.4f}; the tied users alone {row['gold_tied']['hr@10']:.4f} -> "
              + ", ".join(f"{r['hr@10']:.4f}" for r in row["random_tied"]))
    if args.train:
        from ray_jobs.train import train_local
        run_spec = load_spec(args.spec, args.overrides)
        shuffled = shuffle_ties_everywhere(data, run_spec.train.seed)
        run = train_local(run_spec, shuffled, resume=False)
        curve = [{"epoch": h["epoch"], "seconds": round(h["seconds"], 1),
                  **{k: round(float(h[k]), 4) for k in h if k.startswith(("test_", "valid_"))}}
                 for h in run.history if any(k.startswith(("test_", "valid_")) for k in h)]
        score, _, _ = score_function(run_spec, shuffled, np.zeros((0, 0)), run.checkpoint)
        final = metrics_of(run_spec, score, shuffled, shuffled.test)
        result["trained_on_random_ties"] = {"overrides": args.overrides, "checkpoint": run.checkpoint, "curve": curve,
                                            "test": final, "peak_rss_gib": round(max(h["peak_rss_gib"] for h in run.history), 2)}
        print(f"trained on random same-second order ({run.epochs_run} epochs): test HR@10 / NDCG@10 "
              f"{final['hr@10']:.4f} / {final['ndcg@10']:.4f}; curve " +
              ", ".join(f"{c['epoch']}: {c.get('test_hr@10', c.get('valid_hr@10'))}" for c in curve))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
