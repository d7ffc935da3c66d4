"""Crash consistency of the lake, every injection point: the ETL and a daily ingest stopped after each
of their Delta commits (the process dying on the spot, and the run raising), torn commit files and
orphan data files, and a real `llmrec etl` killed at six random moments — the same harness as
tests/test_crash.py, which runs a bounded sample of it in `make test`.

    python bench/crash_consistency.py [--out bench/results/crash-consistency.json]

Prints the number of injection points and of inconsistencies (a reader that saw a mix, or a final
lake that differs from a clean run's), and writes them with every point's outcome."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.provenance import ROOT, provenance, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "crash-consistency.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        points = Path(tmp) / "points.json"
        env = {**os.environ, "LLMREC_CRASH_POINTS": "all", "LLMREC_CRASH_RESULTS": str(points)}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_crash.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        detail = json.loads(points.read_text()) if points.exists() else {"commits": {}, "points": []}
    bad = [p for p in detail["points"] if not (p["reader_consistent"] and p["final_equals_clean"])]
    result = {**provenance(), "commits_per_step": detail["commits"], "injection_points": len(detail["points"]),
              "torn_and_orphan_cases": 4, "sigkill_seeds": 6, "inconsistencies": len(bad),
              "pytest_passed": proc.returncode == 0, "seconds": round(seconds, 1), "points": detail["points"]}
    write_result(args.out, result)
    print(f"{result['injection_points']} injection points (commits per step {detail['commits']}), "
          f"4 torn/orphan cases, 6 SIGKILL seeds: {len(bad)} inconsistencies; pytest "
          f"{'passed' if proc.returncode == 0 else 'FAILED'} in {seconds:.0f} s -> {args.out}")
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
    return 0 if proc.returncode == 0 and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
