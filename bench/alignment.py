"""List-wise alignment on MovieLens-1M: the start model vs static_bon, blade, grpo, flame, gflownet
and dpo from the same starting checkpoint with the same rollout budget (steps x users_per_step x
rollouts), each method run with several seeds.

    python bench/alignment.py --init .checkpoints/movielens-1m-sasrec-full/best.pt --seeds 0,1,2 [--steps 200]

Prints one table (test split: HR/NDCG@10, MRR, coverage, ILD, tail share, exposure Gini @10 as
mean ± std over the seeds, and validation NDCG@10), writes bench/results/alignment-movielens-1m.json
and bench/results/alignment-movielens-1m-curves.png (seed-averaged reward, target-weight entropy and
effective gradient norm per step for every method, validation NDCG@10 per evaluation), and logs the
plot and table to an MLflow run `bench-alignment`. Each run is a real `ray_jobs.align` run (Ray
Train + DeepSpeed); every run's own MLflow run carries its curves.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from jobs.provenance import ROOT, provenance, write_result
from jobs.spec import load_spec, tracking_uri

COLUMNS = ("hr@10", "ndcg@10", "mrr", "coverage@10", "ild@10", "tail_share@10", "gini@10")
METHODS = "static_bon,blade,grpo,flame,gflownet,dpo"


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def average_curves(histories: list[list[dict]], keys=("reward_mean", "weight_entropy", "effective_grad_norm")) -> list[dict]:
    """Step-wise mean over seeds of the step records (steps all runs reached)."""
    n = min(len(h) for h in histories)
    out = []
    for i in range(n):
        rec = {"step": histories[0][i]["step"]}
        for k in keys:
            vals = [h[i].get(k) for h in histories]
            rec[k] = None if any(v is None for v in vals) else float(np.mean(vals))
        out.append(rec)
    return out


def average_evals(evals: list[list[dict]]) -> list[dict]:
    steps = sorted(set.intersection(*(set(e["step"] for e in ev) for ev in evals)))
    return [{"step": s, "ndcg@10": float(np.mean([next(e["ndcg@10"] for e in ev if e["step"] == s) for ev in evals]))}
            for s in steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jobs/specs/movielens-1m-align.yaml")
    ap.add_argument("--init", help="starting checkpoint (default: the spec's align.init)")
    ap.add_argument("--steps", type=int, help="override align.steps")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--seeds", default="0,1,2", help="align.seed values; every method runs with each")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench/results/alignment-movielens-1m.json"))
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.init:
        overrides.append(f"align.init={args.init}")
    if args.steps:
        overrides.append(f"align.steps={args.steps}")
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    from ray_jobs.align import run
    from ray_jobs.tracking import plot_alignment_curves as plot
    spec = load_spec(args.spec, overrides)
    import mlflow
    client = mlflow.MlflowClient(tracking_uri(spec))
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    curves: dict[str, list[dict]] = {m: [] for m in methods}
    base = None
    for method in methods:
        for seed in seeds:
            spec_m = load_spec(args.spec, overrides + [f"align.method={method}", f"align.seed={seed}"])
            t0 = time.perf_counter()
            outcome = run(spec_m, run_name=f"bench-align-{method}-s{seed}-{int(time.time())}", register=False)
            out = {**outcome.to_dict(), **outcome.results, "wall_seconds": time.perf_counter() - t0, "seed": seed}
            runs[method].append(out)
            local = client.download_artifacts(out["run_id"], "alignment_curves.json", "/tmp")
            curves[method].append(json.loads(Path(local).read_text()))
            base = base or {"valid": out["base_valid"], "test": out["base_test"]}
            print(f"{method} seed {seed}: {out['steps']} steps in {out['seconds']:.0f} s (wall {out['wall_seconds']:.0f} s); "
                  f"test ndcg@10 {out['aligned_test']['ndcg@10']:.4f} (base {out['base_test']['ndcg@10']:.4f}), "
                  f"valid {out['aligned_valid']['ndcg@10']:.4f} (base {out['base_valid']['ndcg@10']:.4f})", flush=True)
    rows = [{"model": "base", **{c: [base["test"][c], 0.0] for c in COLUMNS}, "valid_ndcg@10": [base["valid"]["ndcg@10"], 0.0]}]
    for method, outs in runs.items():
        rows.append({"model": method, **{c: mean_std([o["aligned_test"][c] for o in outs]) for c in COLUMNS},
                     "valid_ndcg@10": mean_std([o["aligned_valid"]["ndcg@10"] for o in outs]),
                     "align_seconds": mean_std([o["seconds"] for o in outs]),
                     "last_reward": mean_std([o["last_step"]["reward_mean"] for o in outs])})
    header = "| model | " + " | ".join(COLUMNS) + " | valid ndcg@10 | align s |"
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        cells = [f"{r[c][0]:.4f} ± {r[c][1]:.4f}" if r["model"] != "base" else f"{r[c][0]:.4f}"
                 for c in (*COLUMNS, "valid_ndcg@10")]
        secs = f"{r['align_seconds'][0]:.0f}" if "align_seconds" in r else "–"
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {secs} |")
    table = "\n".join(lines)
    print(f"test split, mean ± std over seeds {seeds}")
    print(table)
    curves_png = str(Path(args.out).with_name(Path(args.out).stem + "-curves.png"))
    plot({m: average_curves([c["steps"] for c in cs]) for m, cs in curves.items()}, curves_png,
         {m: average_evals([c["evals"] for c in cs]) for m, cs in curves.items()})
    doc = {**provenance(), "spec": args.spec, "overrides": overrides, "init": spec.align.init, "seeds": seeds,
           "align": spec.align.model_dump(mode="json"), "table": rows,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "runs": {m: [{k: v for k, v in o.items() if k not in ("plots",)} for o in outs] for m, outs in runs.items()},
           "curves": {m: {"steps": average_curves([c["steps"] for c in cs]),
                          "evals": average_evals([c["evals"] for c in cs])} for m, cs in curves.items()}}
    write_result(args.out, doc)
    mlflow.set_tracking_uri(tracking_uri(spec))
    mlflow.set_experiment(spec.tracking.experiment)
    with mlflow.start_run(run_name="bench-alignment"):
        mlflow.log_text(table, "alignment_table.md")
        mlflow.log_dict(doc, "alignment.json")
        mlflow.log_artifact(curves_png, "plots")
    print(f"wrote {args.out} and {curves_png}")


if __name__ == "__main__":
    main()
