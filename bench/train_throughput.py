"""Training throughput: the single-process loop vs Ray Train + DeepSpeed (1 worker, 2 workers with
ZeRO-1/2/3) on one spec, one epoch each, so the distribution layer's overhead shows as a ratio.

Each configuration runs in its own process (clean peak-memory figures): sequences/s and tokens/s
over the epoch's training steps (start-up and evaluation excluded), wall time including start-up,
and peak RSS (the largest worker's, for Ray). Figures only, no assertions.

    python bench/train_throughput.py [--spec jobs/specs/movielens-1m-sasrec.yaml] [--configs local,ray1,zero1,zero2,zero3] [--set k=v]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIGS = {
    "local": ("single-process loop (llmrec train --local, 2 threads)", []),
    "ray1": ("Ray Train, 1 worker (2 CPUs), ZeRO-2", ["train.workers=1", "train.cpus_per_worker=2", "train.deepspeed=zero2"]),
    "zero1": ("Ray Train, 2 workers (1 CPU each), ZeRO-1", ["train.workers=2", "train.deepspeed=zero1"]),
    "zero2": ("Ray Train, 2 workers (1 CPU each), ZeRO-2", ["train.workers=2", "train.deepspeed=zero2"]),
    "zero3": ("Ray Train, 2 workers (1 CPU each), ZeRO-3", ["train.workers=2", "train.deepspeed=zero3"]),
}


def run_one(spec_path: str, overrides: list[str], config: str) -> dict:
    """One configuration in this process; returns its figures."""
    from jobs.spec import load_spec
    tmp = tempfile.mkdtemp(prefix="llmrec-bench-")
    base = overrides + [f"train.checkpoint_dir={tmp}/ckpt", f"train.storage_path={tmp}/ray",
                        f"tracking.uri=sqlite:///{tmp}/mlflow.db", "train.epochs=1", "train.max_failures=0",
                        f"name=bench-{config}"]
    spec = load_spec(spec_path, base + CONFIGS[config][1])
    t0 = time.perf_counter()
    from ray_jobs.checkpoint import read_model
    from ray_jobs.train import run, train_local
    if config == "local":
        record = train_local(spec, resume=False).history[0]
    else:
        record = read_model(run(spec, register=False)["model_file"]).progress["history"][0]
    peak, tokens = record["peak_rss_gib"], record["tokens_per_s"]
    return {"config": config, "label": CONFIGS[config][0], "seq_per_s": round(record["seq_per_s"], 1),
            "tokens_per_s": round(tokens, 0) if tokens else None, "steps": record["step"],
            "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jobs/specs/movielens-1m-sasrec.yaml")
    ap.add_argument("--configs", default="local,ray1,zero1,zero2,zero3")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.spec, args.overrides, args.one)), flush=True)
        return
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            raise SystemExit(f"--configs: unknown {config!r} ({', '.join(CONFIGS)})")
        cmd = [sys.executable, __file__, "--spec", args.spec, "--one", config] + sum((["--set", o] for o in args.overrides), [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            raise SystemExit(f"{config} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["seq_per_s"] for r in rows if r["config"] == "local"), None)
    print("\n| configuration | seq/s | tokens/s | vs single process | steps | wall s (incl. start-up) | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['seq_per_s'] / base:.2f}" if base else "-"
        print(f"| {r['label']} | {r['seq_per_s']:,.0f} | {r['tokens_per_s'] or '-'} | {ratio} | {r['steps']} | "
              f"{r['wall_s']} | {r['peak_rss_gib']} |")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "train_throughput.json")
    with open(out, "w") as fh:
        json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "spec": args.spec,
                   "overrides": args.overrides, "device": "cpu", "cpus": os.cpu_count(), "rows": rows}, fh, indent=2)
    print(f"written {out}")


if __name__ == "__main__":
    main()
