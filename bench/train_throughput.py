"""Training throughput: the single-process loop vs Ray Train + DeepSpeed (1 worker, 2 workers with
ZeRO-1/2/3) on one spec, one epoch each, so the distribution layer's overhead shows as a ratio.

Each configuration runs in its own process (clean peak-memory figures): sequences/s and tokens/s
over the epoch's training steps (start-up and evaluation excluded), wall time including start-up,
and peak RSS (the largest worker's, for Ray). Figures only, no assertions.

    python bench/train_throughput.py [--spec jobs/specs/movielens-1m-sasrec.yaml] [--configs local,ray1,zero1,zero2,zero3] [--set k=v]

Data feeding at scale: `--synthetic N` generates N interactions (Sail ETL into a lake under `--lake`,
reused when it is already there), then runs Ray Train with 1 and 2 workers (2 CPUs in all), each
worker reading only its shard of the `sequences` table and taking one training step; it prints each
worker's rows held, load and step seconds and peak RSS (after the read, after the step).

    python bench/train_throughput.py --synthetic 50000000 [--lake /tmp/llmrec-synthetic]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from jobs.provenance import provenance, write_result

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
        record = read_model(run(spec, register=False).model_file).progress.history[0]
    peak, tokens = record["peak_rss_gib"], record["tokens_per_s"]
    return {"config": config, "label": CONFIGS[config][0], "seq_per_s": round(record["seq_per_s"], 1),
            "tokens_per_s": round(tokens, 0) if tokens else None, "steps": record["step"],
            "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak, 3)}


SYNTHETIC_SPEC = "jobs/specs/movielens-1m-sasrec.yaml"


def synthetic_spec(n: int, lake: str, workers: int = 1):
    """A SASRec run over N synthetic interactions (N/500 users, N/2500 items), one step per run."""
    from jobs.spec import load_spec
    return load_spec(SYNTHETIC_SPEC, [*synthetic_cli_overrides(n, lake), "data.max_seq_len=50",
                                      f"train.storage_path={lake}/ray", f"tracking.uri=sqlite:///{lake}/mlflow.db",
                                      f"train.workers={workers}", f"train.cpus_per_worker={2 / workers:g}",
                                      "train.deepspeed=zero2", "train.windows=all", "train.max_steps=1", "train.max_failures=0",
                                      "cluster.num_cpus=2", f"name=bench-synthetic-{n}-w{workers}"])


def first_step_worker(cfg: dict) -> None:
    """A Ray Train worker: read this worker's shard, build the run, take one training step; write figures."""
    import math

    import numpy as np  # noqa: F401  (numpy arrays travel in the shard)
    from jobs.schema import JobSpec
    from ray_jobs.data import load_sequences
    from ray_jobs.loop import Clock, Reporter, fit_windows, peak_rss_gib, train_epoch, training_state
    from ray_jobs.models import build_model
    from ray_jobs.runtime import DeepSpeedBackend, worker_context
    spec = JobSpec.model_validate(cfg["spec"])
    ctx = worker_context(spec)
    t0 = time.perf_counter()
    data = load_sequences(spec, cfg["versions"], shard=(ctx.rank, ctx.world))
    load_s, rss_load = time.perf_counter() - t0, peak_rss_gib()
    state = training_state(spec, data, ctx.device)
    backend = DeepSpeedBackend(state, cfg["deepspeed"], ctx.rank, ctx.world, ctx.device,
                               lambda: build_model(spec, data.item_text, versions=data.versions))
    windows = fit_windows(spec, data)
    t1 = time.perf_counter()
    record = train_epoch(state, backend, data, windows, 1, math.ceil(len(windows) / spec.train.batch_size), Clock(0),
                         Reporter())
    figures = {"rank": ctx.rank, "world": ctx.world, "train_rows_held": len(data.train),
               "train_rows_total": int(data.sizes["train"]), "interactions_held": int(sum(len(q) for q in data.train)),
               "windows": len(windows), "steps": record["step"], "load_s": round(load_s, 1),
               "first_step_s": round(time.perf_counter() - t1, 1), "peak_rss_gib_after_load": round(rss_load, 3),
               "peak_rss_gib_after_step": round(peak_rss_gib(), 3)}
    with open(os.path.join(cfg["out_dir"], f"rank{ctx.rank}.json"), "w") as fh:
        json.dump(figures, fh)


def synthetic_one(n: int, lake: str, workers: int) -> dict:
    from jobs.lake import read_versions
    from ray_jobs.distributed import deepspeed_config
    from ray_jobs.runtime import fit, init_ray
    spec = synthetic_spec(n, lake, workers)
    init_ray(spec)
    out_dir = tempfile.mkdtemp(prefix="llmrec-bench-first-step-")
    t0 = time.perf_counter()
    fit(spec, first_step_worker, {"spec": spec.model_dump(mode="json"), "versions": read_versions(spec),
                                  "deepspeed": deepspeed_config(spec, workers), "out_dir": out_dir},
        f"{spec.name}-{int(time.time())}", "benchmark")
    ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(workers)]
    return {"workers": workers, "wall_s": round(time.perf_counter() - t0, 1), "ranks": ranks}


def synthetic(n: int, lake: str) -> None:
    """ETL (once) and the first step with 1 and 2 workers, each configuration in its own process."""
    if not os.path.exists(os.path.join(lake, f"synthetic-{n}")):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "etl", "--quiet", "--spec", SYNTHETIC_SPEC,
                               *sum((["--set", o] for o in synthetic_cli_overrides(n, lake)), [])],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"synthetic ETL failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        etl_s = round(time.perf_counter() - t0, 1)
        print(f"ETL of {n:,} synthetic interactions: {etl_s} s", flush=True)
    else:
        etl_s = None
        print(f"reusing the lake at {lake}", flush=True)
    rows = []
    for workers in (1, 2):
        done = subprocess.run([sys.executable, __file__, "--synthetic", str(n), "--lake", lake, "--one", str(workers)],
                              capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            raise SystemExit(f"{workers} workers failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| workers | rank | train rows held / total | interactions held | read s | first step s | "
          "peak RSS after read GiB | peak RSS after step GiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for k in r["ranks"]:
            print(f"| {r['workers']} | {k['rank']} | {k['train_rows_held']:,} / {k['train_rows_total']:,} | "
                  f"{k['interactions_held']:,} | {k['load_s']} | {k['first_step_s']} | {k['peak_rss_gib_after_load']} | "
                  f"{k['peak_rss_gib_after_step']} |")
    out = os.path.join(os.path.dirname(__file__), "results", f"train_synthetic_{n}.json")
    write_result(out, {**provenance(), "interactions": n, "etl_s": etl_s, "spec": SYNTHETIC_SPEC,
                       "overrides": synthetic_cli_overrides(n, lake), "rows": rows})


def synthetic_cli_overrides(n: int, lake: str) -> list[str]:
    src = f"{{kind: synthetic, n_interactions: {n}, n_users: {max(n // 500, 10)}, n_items: {max(n // 2500, 10)}, seed: 0}}"
    return [f"data.source={src}", f"data.name=synthetic-{n}", "data.item_text.template='{title}: {description}'",
            f"lake.root={lake}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jobs/specs/movielens-1m-sasrec.yaml")
    ap.add_argument("--configs", default="local,ray1,zero1,zero2,zero3")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    ap.add_argument("--synthetic", type=int, help="N synthetic interactions: sharded data feeding, 1 vs 2 workers")
    ap.add_argument("--lake", default=os.path.join(tempfile.gettempdir(), "llmrec-synthetic"))
    args = ap.parse_args()
    if args.synthetic and args.one:
        print("RESULT " + json.dumps(synthetic_one(args.synthetic, args.lake, int(args.one))), flush=True)
        return
    if args.synthetic:
        synthetic(args.synthetic, args.lake)
        return
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
    write_result(out, {**provenance(), "spec": args.spec, "overrides": args.overrides, "device": "cpu", "rows": rows})


if __name__ == "__main__":
    main()
