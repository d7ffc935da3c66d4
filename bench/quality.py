"""Quality benchmark: SASRec, HLLM (cached item LLM + small user transformer), popularity and the
transition-graph heuristic on one spec's gold tables, full ranking on the test split.

Prints one table (HR/NDCG/MRR @10 and @50, coverage, tail share, ILD, training time), each model's
time-to-quality (validation HR@10 against wall time), full-ranking evaluation time and training
peak memory, and writes bench/results/quality-<dataset>.json. Figures only, no assertions.

    python bench/quality.py --spec jobs/specs/movielens-1m-sasrec.yaml [--models sasrec,hllm,pop,graph] [--set k=v]
        [--row NAME=SPEC ...] [--checkpoint NAME=PATH ...]

`--models` names model kinds run on `--spec` (its data and recipe, `model.kind` swapped); `--row
NAME=SPEC` adds a row trained from its own shipped spec (e.g. `--row sasrec-full=jobs/specs/
movielens-1m-sasrec-full.yaml`). `--checkpoint NAME=PATH` evaluates an already trained model for a
row instead of training it (its saved history gives the timings and the training peak memory).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

from jobs.provenance import provenance, write_result
from jobs.spec import load_spec
from ray_jobs.checkpoint import read_model
from ray_jobs.data import load_sequences
from jobs.contracts import markdown_table
from ray_jobs.models import TRAINABLE
from ray_jobs.models.llm import minilm_item_embeddings
from ray_jobs.scoring import evaluate_split, score_function
from ray_jobs.train import train_local


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--models", default="pop,graph,sasrec,hllm")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--hllm-set", action="append", default=[], help="overrides for the HLLM run only")
    ap.add_argument("--row", action="append", default=[], metavar="NAME=SPEC",
                    help="a row trained from its own spec file (same gold tables as --spec)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                    help="evaluate an already trained checkpoint for sasrec/hllm instead of training (its history "
                         "gives the timings), e.g. sasrec=.checkpoints/movielens-1m-sasrec-refit/best.pt")
    ap.add_argument("--out")
    args = ap.parse_args()
    spec = load_spec(args.spec, args.overrides)
    data = load_sequences(spec)
    text_emb = minilm_item_embeddings(spec.model, data.item_text)
    results, configs, curves, timings = {}, {}, {}, {}
    given = dict(c.split("=", 1) for c in args.checkpoint)

    def run_eval(name: str, score) -> None:
        t0 = time.perf_counter()
        results[name] = evaluate_split(spec, score, data, "test", text_emb)
        timings.setdefault(name, {})["eval_seconds"] = round(time.perf_counter() - t0, 3)

    rows = [(name, None) for name in args.models.split(",") if name]
    rows += [tuple(r.split("=", 1)) for r in args.row]
    for name, row_spec in rows:
        if row_spec is None and name not in ("pop", "graph", *TRAINABLE):
            raise SystemExit(f"--models: unknown model {name!r} (pop, graph, {', '.join(TRAINABLE)})")
        if row_spec is None:
            run_spec = load_spec(args.spec, args.overrides + [f"model.kind={name}", f"name={spec.name}-{name}"]
                                 + (args.hllm_set if name == "hllm" else []))
        else:
            run_spec = load_spec(row_spec, [f"lake.root={spec.lake.root}"])
            if run_spec.data.name != spec.data.name:
                raise SystemExit(f"--row {name}: its spec reads dataset {run_spec.data.name}, --spec reads {spec.data.name}")
        checkpoint = None
        if run_spec.model.kind in TRAINABLE:
            if name in given:
                checkpoint, stopped = given[name], "given"
            else:
                checkpoint, stopped = train_local(run_spec, data, resume=False).checkpoint, None
            ckpt = read_model(checkpoint)  # the shipped model, with the run's final progress
            run_spec, p = ckpt.spec, ckpt.progress
            split = "valid" if run_spec.train.fit_on == "train" else "test"
            curves[name] = [{"seconds": round(h["seconds"], 1), "epoch": h["epoch"], f"{split}_hr@10": round(h[f"{split}_hr@10"], 4)}
                            for h in p.history if f"{split}_hr@10" in h]
            peaks = [h["peak_rss_gib"] for h in p.history if "peak_rss_gib" in h]
            timings[name] = {"train_seconds": round(p.seconds, 1), "epochs": p.epoch, "best_epoch": p.best_epoch,
                             "stopped": stopped or p.stopped,
                             "train_peak_rss_gib": round(max(peaks), 3) if peaks else None}
            configs[name] = {"spec": row_spec, "model": run_spec.model.model_dump(mode="json"),
                             "train": run_spec.train.model_dump(mode="json"), "checkpoint": given.get(name)}
        elif run_spec.model.kind == "graph":
            m = run_spec.model
            configs[name] = {"hops": m.graph_hops, "last_items": m.graph_last_items, "text": "all-MiniLM-L6-v2"}
        else:
            configs[name] = {}
        score, _, _ = score_function(run_spec, data, text_emb, checkpoint)
        run_eval(name, score)
        print(f"{name}: test hr@10 {results[name].metrics['hr@10']:.4f} ndcg@10 {results[name].metrics['ndcg@10']:.4f} "
              f"{timings.get(name, {})}", flush=True)
    print("\n" + markdown_table({n: r.flat() for n, r in results.items()}))
    print("\n| model | ild@10 | train s | train peak RSS GiB | eval s (all users, full catalogue) |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        t = timings.get(name, {})
        print(f"| {name} | {r.beyond_accuracy.get('ild@10', float('nan')):.4f} | {t.get('train_seconds', 0)} | "
              f"{t.get('train_peak_rss_gib') or '-'} | {t['eval_seconds']} |")
    for name, curve in curves.items():
        print(f"\ntime-to-quality {name}: " + ", ".join(f"{c['seconds']}s->{list(c.values())[-1]}" for c in curve))
    print(f"\npeak RSS {peak_rss_gib():.2f} GiB")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"quality-{spec.data.name}.json")
    write_result(out, {**provenance(), "spec": args.spec, "overrides": args.overrides, "versions": data.versions,
                       "peak_rss_gib": round(peak_rss_gib(), 3),
                       "models": [{"name": n, "config": configs.get(n, {}), "metrics": results[n].to_dict(),
                                   "timing": timings.get(n, {}), "time_to_quality": curves.get(n, [])} for n in results]})


if __name__ == "__main__":
    main()
