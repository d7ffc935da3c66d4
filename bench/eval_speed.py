"""Full-ranking evaluation speed: every user of a split scored against the whole catalogue, per model
kind, on one spec's gold tables. Trained checkpoints are used where given; a model kind without one
is built from its spec with initial weights (the work of scoring does not depend on the weights).

    python bench/eval_speed.py [--spec jobs/specs/movielens-1m-sasrec.yaml] \
        [--model sasrec=.checkpoints/movielens-1m-sasrec-full/best.pt] [--model hllm=jobs/specs/movielens-1m-hllm.yaml]

Prints the median of `--repeats` timings per model (wall and this process's CPU seconds, with its minor
page faults) and writes bench/results/eval_speed.json.
Figures only, no assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from jobs.provenance import provenance, write_result
from jobs.spec import load_spec
from ray_jobs.checkpoint import load_model
from ray_jobs.data import load_sequences
from ray_jobs.models import build_model
from ray_jobs.scoring import evaluate_split, scorer

DEFAULT_MODELS = ["sasrec=.checkpoints/movielens-1m-sasrec-full/best.pt", "hstu=.checkpoints/movielens-1m-hstu/best.pt",
                  "hllm=jobs/specs/movielens-1m-hllm.yaml"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jobs/specs/movielens-1m-sasrec.yaml")
    ap.add_argument("--model", action="append", metavar="NAME=CHECKPOINT_OR_SPEC",
                    help=f"default: {' '.join(DEFAULT_MODELS)}")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "eval_speed.json"))
    args = ap.parse_args()
    spec = load_spec(args.spec)
    data = load_sequences(spec)
    rows = []
    for entry in args.model or DEFAULT_MODELS:
        name, source = entry.split("=", 1)
        if source.endswith((".yaml", ".yml")):
            model_spec = load_spec(source)
            model, weights = build_model(model_spec, data.item_text, versions=data.versions).eval(), "initial"
            max_len = model_spec.data.max_seq_len
        else:
            model, ckpt = load_model(source)
            ckpt.check_data(data, source)
            weights, max_len = "trained", ckpt.spec.data.max_seq_len
        seconds, cpu, faults = [], [], []
        for _ in range(args.repeats):
            t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            result = evaluate_split(spec, scorer(model, max_len), data, args.split)
            seconds.append(round(time.perf_counter() - t0, 3))
            cpu.append(round(time.process_time() - c0, 3))  # this process's CPU (user + system): a figure
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)  # that a busy machine skews less
        rows.append({"model": name, "source": source, "weights": weights, "users": result.metrics["users"],
                     "items": data.num_items, "seconds": seconds, "median_seconds": statistics.median(seconds),
                     "cpu_seconds": cpu, "minor_page_faults": faults, "ndcg@10": result.metrics["ndcg@10"]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| model | weights | users x items | median s ({args.repeats} runs) | median CPU s |\n"
          "|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['users']:,} x {r['items']:,} | {r['median_seconds']:.2f} "
              f"| {statistics.median(r['cpu_seconds']):.2f} |")
    write_result(args.out, {**provenance(), "spec": args.spec, "split": args.split,
                            "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
