"""The C allocator under CPU training and scoring: an HSTU-large-shaped user model (ML-1M: 200 positions,
8 units, 2 heads of 25, the time bias; random ids and weights — the work does not depend on them) runs
4 training steps (forward + backward, 128 users), 24 training steps on windows of mixed lengths (50 to
200 positions, as length-bucketed batches make them: what fragments a heap), or one scoring pass (1,024
users in batches of 128, no gradients), each in a fresh process per allocator setting: glibc as it
comes, glibc with the jobs' fixed 1 MiB mmap threshold (`return_freed_memory`, which training and
alignment set when glibc is their allocator), and jemalloc (Debian's libjemalloc2, preloaded) with its
defaults and with freed pages kept (no decay: `cluster.cpu_allocator`'s jemalloc).

    python bench/cpu_allocator.py [--jemalloc /usr/lib/x86_64-linux-gnu/libjemalloc.so.2]

Prints each setting's CPU seconds (of which system), minor page faults, peak and final resident memory
and a hash of the outputs (equal across settings: the allocator changes no number), and writes
bench/results/cpu_allocator.json. Figures only, no assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from jobs.provenance import provenance, write_result

CHILD = r"""
import hashlib, json, resource, sys, time, torch
from ray_jobs.distributed import return_freed_memory
from ray_jobs.models.hstu import HSTU
if sys.argv[2] == "fixed_threshold":
    return_freed_memory()
torch.manual_seed(0)
m = HSTU(3706, 200, dim=50, blocks=8, heads=2, dropout=0.0, time_buckets=128, query_time="target",
         attention_dim=25, block="original")
ids = torch.randint(1, 3707, (1024, 200)); ids[:, :40] = 0
times = torch.cumsum(torch.randint(1, 10_000, (1024, 201)), 1) + 956_703_932

def measure(work):
    work()  # once to warm up
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    out = work()
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    return {"cpu_seconds": round(c1 - c0, 2), "system_seconds": round(r1.ru_stime - r0.ru_stime, 2),
            "minor_page_faults": r1.ru_minflt - r0.ru_minflt, "peak_rss_mib": round(r1.ru_maxrss / 1024),
            "final_rss_mib": round(int([x for x in open("/proc/self/status") if x.startswith("VmRSS")][0].split()[1]) / 1024),
            "output_sha1": hashlib.sha1(out.detach().numpy().tobytes()).hexdigest()[:12]}

def train():
    m.train()
    for _ in range(4):
        m.zero_grad()
        out = m(ids[:128], times[:128])
        out.square().mean().backward()
    return out

def train_mixed():
    m.train()
    lengths = torch.randint(50, 201, (24,)).tolist()
    for n in lengths:
        m.zero_grad()
        out = m(ids[:128, -n:], times[:128, -n - 1:])
        out.square().mean().backward()
    return out

def score():
    m.eval()
    with torch.no_grad():
        return torch.cat([m.user_embeddings(ids[s:s + 128], times[s:s + 128]) for s in range(0, 1024, 128)])

print(json.dumps(measure({"train_4_steps": train, "train_24_mixed_lengths": train_mixed,
                          "score_1024_users": score}[sys.argv[1]])))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jemalloc", default="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_allocator.json"))
    args = ap.parse_args()
    if not os.path.exists(args.jemalloc):
        sys.exit(f"--jemalloc {args.jemalloc}: no such file (Debian: apt-get install libjemalloc2)")
    kept = {"LD_PRELOAD": args.jemalloc, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    settings = {"glibc": ({}, "as_it_comes"),
                "glibc, fixed 1 MiB mmap threshold": ({}, "fixed_threshold"),
                "jemalloc": ({"LD_PRELOAD": args.jemalloc}, "as_it_comes"),
                "jemalloc, freed pages kept": (kept, "as_it_comes")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    works = ("train_4_steps", "train_24_mixed_lengths", "score_1024_users")
    for name, (extra, glibc) in settings.items():
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": root, **extra}
        row = {"allocator": name, "env": extra}
        for work in works:
            done = subprocess.run([sys.executable, "-c", CHILD, work, glibc], env=env, capture_output=True, text=True,
                                  check=True)
            row[work] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    print("\n| allocator | " + " | ".join(f"{w}: CPU s (system) | faults | peak / final RSS MiB" for w in works) + " |\n"
          "|---|" + "---:|---:|---:|" * len(works))
    for r in rows:
        print(f"| {r['allocator']} | " + " | ".join(
            f"{r[w]['cpu_seconds']} ({r[w]['system_seconds']}) | {r[w]['minor_page_faults']:,} | "
            f"{r[w]['peak_rss_mib']} / {r[w]['final_rss_mib']}" for w in works) + " |")
    write_result(args.out, {**provenance(), "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
