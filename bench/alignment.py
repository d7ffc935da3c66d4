"""List-wise alignment on MovieLens-1M: base model vs static_bon vs blade vs grpo vs dpo from the
same starting checkpoint with the same rollout budget (steps x users_per_step x rollouts).

    python bench/alignment.py --init .checkpoints/movielens-1m-sasrec-hllm/best.pt [--steps 300]

Prints one table (test split: HR/NDCG@10, coverage, ILD, tail share, exposure Gini @10), writes
bench/results/alignment-movielens-1m.json and bench/results/alignment-movielens-1m-curves.png (mean rollout
reward and effective gradient norm per step, static_bon vs blade), and logs the plot and table to
an MLflow run `bench-alignment`. Each method is a real `ray_jobs.align` run (Ray Train + DeepSpeed).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.spec import load_spec, tracking_uri  # noqa: E402

COLUMNS = ("hr@10", "ndcg@10", "mrr", "coverage@10", "ild@10", "tail_share@10", "gini@10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jobs/specs/movielens-1m-align.yaml")
    ap.add_argument("--init", help="starting checkpoint (default: the spec's align.init)")
    ap.add_argument("--steps", type=int, help="override align.steps")
    ap.add_argument("--methods", default="static_bon,blade,grpo,dpo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench/results/alignment-movielens-1m.json"))
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.init:
        overrides.append(f"align.init={args.init}")
    if args.steps:
        overrides.append(f"align.steps={args.steps}")
    from ray_jobs.align import run
    from ray_jobs.tracking import plot_alignment_curves as plot
    runs, base = {}, None
    for method in args.methods.split(","):
        spec = load_spec(args.spec, overrides + [f"align.method={method}"])
        t0 = time.perf_counter()
        out = run(spec, run_name=f"bench-align-{method}-{int(time.time())}", register=False)
        out["wall_seconds"] = time.perf_counter() - t0
        runs[method] = out
        base = base or {"valid": out["base_valid"], "test": out["base_test"]}
        print(f"{method}: {out['steps']} steps in {out['seconds']:.0f} s (wall {out['wall_seconds']:.0f} s); "
              f"test ndcg@10 {out['aligned_test']['ndcg@10']:.4f} (base {out['base_test']['ndcg@10']:.4f})", flush=True)
    spec = load_spec(args.spec, overrides)
    rows = [{"model": "base", **{c: base["test"][c] for c in COLUMNS}, "valid_ndcg@10": base["valid"]["ndcg@10"]}]
    for method, out in runs.items():
        rows.append({"model": method, **{c: out["aligned_test"][c] for c in COLUMNS},
                     "valid_ndcg@10": out["aligned_valid"]["ndcg@10"], "align_seconds": out["seconds"],
                     "first_reward": out["first_step"]["reward_mean"], "last_reward": out["last_step"]["reward_mean"]})
    header = "| model | " + " | ".join(COLUMNS) + " | valid ndcg@10 | align s |"
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS)
                     + f" | {r['valid_ndcg@10']:.4f} | {r.get('align_seconds', 0):.0f} |")
    table = "\n".join(lines)
    print(table)
    curves_png = str(Path(args.out).with_name(Path(args.out).stem + "-curves.png"))
    histories = {}
    for method in ("static_bon", "blade"):
        if method in runs:
            import mlflow
            client = mlflow.MlflowClient(tracking_uri(spec))
            local = client.download_artifacts(runs[method]["run_id"], "alignment_curves.json", "/tmp")
            histories[method] = json.loads(Path(local).read_text())["steps"]
    if histories:
        plot(histories, curves_png)
    doc = {"spec": args.spec, "overrides": overrides, "init": spec.align.init, "align": spec.align.model_dump(mode="json"),
           "table": rows, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "runs": {m: {k: v for k, v in out.items() if k not in ("first_step", "last_step")} | {
               "first_step": out["first_step"], "last_step": out["last_step"]} for m, out in runs.items()},
           "command": " ".join(["python", "bench/alignment.py", *sys.argv[1:]])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=float))
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(spec))
    mlflow.set_experiment(spec.tracking.experiment)
    with mlflow.start_run(run_name="bench-alignment"):
        mlflow.log_text(table, "alignment_table.md")
        mlflow.log_dict(doc, "alignment.json")
        if histories:
            mlflow.log_artifact(curves_png, "plots")
    print(f"wrote {args.out} and {curves_png}")


if __name__ == "__main__":
    main()
