"""Quality benchmark: SASRec, HLLM (cached item LLM + small user transformer), popularity and the
transition-graph heuristic on one spec's gold tables, full ranking on the test split.

Prints one table (HR/NDCG/MRR @10 and @50, coverage, tail share, ILD, training time), each model's
time-to-quality (validation HR@10 against wall time), full-ranking evaluation time and training
peak memory, and writes bench/results/quality-<dataset>.json. Figures only, no assertions.

    python bench/quality.py --spec jobs/specs/movielens-1m-sasrec.yaml [--models sasrec,hllm,pop,graph] [--set k=v]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs.spec import JobSpec, load_spec  # noqa: E402
from ray_jobs.data import load_sequences  # noqa: E402
from ray_jobs.metrics import markdown_table  # noqa: E402
from ray_jobs.models.baselines import Popularity, TransitionGraph  # noqa: E402
from ray_jobs.models.hllm import minilm_item_embeddings  # noqa: E402
from ray_jobs.trainer import evaluate_split, load_trained, scorer, train_local  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--models", default="pop,graph,sasrec,hllm")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--hllm-set", action="append", default=[], help="overrides for the HLLM run only")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                    help="evaluate an already trained checkpoint for sasrec/hllm instead of training (its history "
                         "gives the timings), e.g. sasrec=.checkpoints/movielens-1m-sasrec-refit/best.pt")
    ap.add_argument("--out")
    args = ap.parse_args()
    spec = load_spec(args.spec, args.overrides)
    data = load_sequences(spec)
    text_emb = minilm_item_embeddings(spec.model, data.item_text, data.versions["item_index"])
    results, configs, curves, timings = {}, {}, {}, {}
    given = dict(c.split("=", 1) for c in args.checkpoint)

    def run_eval(name: str, score) -> None:
        t0 = time.perf_counter()
        results[name] = evaluate_split(spec, score, data, "test", text_emb)
        timings.setdefault(name, {})["eval_seconds"] = round(time.perf_counter() - t0, 3)

    for name in args.models.split(","):
        if name == "pop":
            run_eval(name, Popularity(data.popularity).score)
            configs[name] = {}
        elif name == "graph":
            m = spec.model
            run_eval(name, TransitionGraph(data.train, data.num_items, text_emb, data.popularity, m.graph_hops,
                                           m.graph_last_items).score)
            configs[name] = {"hops": m.graph_hops, "last_items": m.graph_last_items, "text": "all-MiniLM-L6-v2"}
        elif name in ("sasrec", "hllm"):
            run_spec = load_spec(args.spec, args.overrides + [f"model.kind={name}", f"name={spec.name}-{name}"]
                                 + (args.hllm_set if name == "hllm" else []))
            if name in given:
                model, ckpt = load_trained(given[name])
                run_spec = JobSpec.model_validate(ckpt["spec"])
                st = ckpt["state"]
                history, seconds, epochs, best, stopped = st["history"], st["seconds"], st["epoch"], st["best_epoch"], "given"
            else:
                result = train_local(run_spec, data, resume=False, show_progress=False)
                model, _ = load_trained(result.checkpoint)
                history, seconds, epochs, best, stopped = (result.history, result.seconds, result.epochs_run,
                                                           result.best_epoch, result.stopped)
            run_eval(name, scorer(model, run_spec.data.max_seq_len))
            configs[name] = {"model": run_spec.model.model_dump(mode="json"), "train": run_spec.train.model_dump(mode="json"),
                             "checkpoint": given.get(name)}
            split = "valid" if run_spec.train.fit_on == "train" else "test"
            curves[name] = [{"seconds": round(h["seconds"], 1), "epoch": h["epoch"], f"{split}_hr@10": round(h[f"{split}_hr@10"], 4)}
                            for h in history if f"{split}_hr@10" in h]
            timings[name].update(train_seconds=round(seconds, 1), epochs=epochs, best_epoch=best, stopped=stopped)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (pop, graph, sasrec, hllm)")
        print(f"{name}: test hr@10 {results[name]['metrics']['hr@10']:.4f} ndcg@10 {results[name]['metrics']['ndcg@10']:.4f} "
              f"{timings.get(name, {})}", flush=True)
    print("\n" + markdown_table(results))
    print("\n| model | ild@10 | train s | eval s (all users, full catalogue) |\n|---|---:|---:|---:|")
    for name, r in results.items():
        t = timings.get(name, {})
        print(f"| {name} | {r['beyond_accuracy'].get('ild@10', float('nan')):.4f} | {t.get('train_seconds', 0)} | {t['eval_seconds']} |")
    for name, curve in curves.items():
        print(f"\ntime-to-quality {name}: " + ", ".join(f"{c['seconds']}s->{list(c.values())[-1]}" for c in curve))
    print(f"\npeak RSS {peak_rss_gib():.2f} GiB")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"quality-{spec.data.name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "spec": args.spec,
                   "overrides": args.overrides, "versions": data.versions, "peak_rss_gib": round(peak_rss_gib(), 3),
                   "models": [{"name": n, "config": configs.get(n, {}), "metrics": results[n], "timing": timings.get(n, {}),
                               "time_to_quality": curves.get(n, [])} for n in results]}, fh, indent=2)
    print(f"written {out}")


if __name__ == "__main__":
    main()
