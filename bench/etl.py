"""ETL benchmark: wall time and peak memory of `llmrec etl` on MovieLens-1M (sail, local), rows/s on
synthetic 1M and 10M interactions on both engines, and the pandas preparation for comparison.

Each run is a fresh subprocess (imports and engine start included); peak memory is the largest
sum of RSS over the whole process tree (the JVM is a child process on the local engine), sampled
every 50 ms. Prints a table and writes bench/results/etl.json. No assertions: figures only.

    python bench/etl.py                                 # everything (~10 min on 2 cores)
    python bench/etl.py --engines sail --synthetic 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import statistics

import psutil

from jobs.provenance import GIB, ROOT, provenance, write_result


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; return wall seconds, peak tree RSS (GiB), exit code and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3):  # 3 = a data-quality check failed, the run itself completed
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(wall, 2), "peak_rss_gib": round(peak / GIB, 3), "stdout": out}


def llmrec_etl(spec: str, overrides: list[str], lake: str) -> dict:
    summary = os.path.join(lake, "summary-out.json")
    cmd = [sys.executable, "-m", "jobs.cli", "etl", "--quiet", "--spec", spec, "--set", f"lake.root={lake}",
           "--summary-out", summary]
    for o in overrides:
        cmd += ["--set", o]
    m = measure(cmd)
    with open(summary) as fh:
        s = json.load(fh)
    m.pop("stdout")
    m.update(raw_rows=s["accounting"]["raw_rows"], interactions=s["gold"]["interactions"],
             users=s["gold"]["users"], items=s["gold"]["items"], steps=s["step_seconds"])
    m["rows_per_s"] = round(m["raw_rows"] / m["seconds"])
    return m


def synthetic_overrides(n: int, engine: str) -> list[str]:
    src = f"{{kind: synthetic, n_interactions: {n}, n_users: {max(n // 50, 10)}, n_items: {max(n // 200, 10)}, seed: 0}}"
    return [f"spark.engine={engine}", f"data.source={src}", f"data.name=synthetic-{n}",
            "data.item_text.template='{title}: {description}'"]


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time, plus every run's seconds (this VM's timings are noisy)."""
    ordered = sorted(runs, key=lambda m: m["seconds"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_seconds"] = [m["seconds"] for m in runs]
    chosen["median_seconds"] = round(statistics.median(m["seconds"] for m in runs), 2)
    return chosen


def report(name: str, m: dict) -> None:
    print(f"{name}: {m['seconds']:.2f} s (runs {m['all_seconds']}), peak {m['peak_rss_gib']:.2f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="sail,local")
    ap.add_argument("--synthetic", default="1000000,10000000", help="comma-separated sizes ('' = none)")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each MovieLens-1M job; the median is reported")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "etl.json"))
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    sizes = [int(s) for s in args.synthetic.split(",") if s]
    results: dict = {**provenance(), "movielens_1m": {}, "synthetic": {}}
    with tempfile.TemporaryDirectory(prefix="llmrec-bench-") as tmp:
        def pandas_run(i: int) -> dict:
            m = measure([sys.executable, "bench/pandas_etl.py", "--out", os.path.join(tmp, f"pandas-{i}")])
            inner = json.loads(m.pop("stdout").strip().splitlines()[-1])
            return {**m, **inner}

        def ml1m_run(engine: str, i: int) -> dict:
            return llmrec_etl("jobs/specs/movielens-1m.yaml", [f"spark.engine={engine}"], os.path.join(tmp, f"ml-{engine}-{i}"))

        # pandas and Sail runs alternate, so both see the same (drifting) machine speed
        runs: dict[str, list] = {"pandas": [], "sail": []}
        for i in range(args.repeat):
            if not args.skip_pandas:
                runs["pandas"].append(pandas_run(i))
            if "sail" in engines:
                runs["sail"].append(ml1m_run("sail", i))
        for engine in engines:
            if engine != "sail":
                runs[engine] = [ml1m_run(engine, 0)]
        for name, rs in runs.items():
            if rs:
                results["movielens_1m"][name] = median_run(rs)
                report(f"ML-1M {name}", results["movielens_1m"][name])
        pandas_s = results["movielens_1m"].get("pandas", {}).get("seconds")
        for engine in engines:
            if pandas_s:
                results["movielens_1m"][engine]["ratio_to_pandas"] = round(results["movielens_1m"][engine]["seconds"] / pandas_s, 3)
        for engine in engines:
            runs = {}
            for n in sizes:
                m = llmrec_etl("jobs/specs/movielens-1m.yaml", synthetic_overrides(n, engine), os.path.join(tmp, f"syn-{engine}-{n}"))
                runs[str(n)] = m
                print(f"synthetic {n:,} {engine}: {m['seconds']:.2f} s, {m['rows_per_s']:,} rows/s, "
                      f"peak {m['peak_rss_gib']:.2f} GiB", flush=True)
            if len(sizes) >= 2:
                lo, hi = str(min(sizes)), str(max(sizes))
                runs["time_ratio_vs_size_ratio"] = round(
                    (runs[hi]["seconds"] / runs[lo]["seconds"]) / (int(hi) / int(lo)), 3)
            results["synthetic"][engine] = runs
    print_table(results)
    write_result(args.out, results)


def print_table(r: dict) -> None:
    print("\n| run | wall s | peak GiB | rows/s | ratio to pandas |")
    print("|---|---:|---:|---:|---:|")
    for name, m in r["movielens_1m"].items():
        rate = m.get("rows_per_s") or round(m.get("raw_rows", 0) / m["seconds"])
        print(f"| ML-1M {name} | {m['seconds']:.2f} | {m['peak_rss_gib']:.2f} | {rate:,} | {m.get('ratio_to_pandas', '')} |")
    for engine, runs in r["synthetic"].items():
        for n, m in runs.items():
            if isinstance(m, dict):
                print(f"| synthetic {int(n):,} {engine} | {m['seconds']:.2f} | {m['peak_rss_gib']:.2f} | {m['rows_per_s']:,} | |")
        if "time_ratio_vs_size_ratio" in runs:
            print(f"| {engine}: (t10M/t1M)/(10M/1M) | {runs['time_ratio_vs_size_ratio']} | | | |")


if __name__ == "__main__":
    main()
