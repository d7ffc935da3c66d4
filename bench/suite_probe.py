"""A pytest plugin that records what each test costs the machine, to find where the suite's time goes.

    PYTHONPATH=bench python -m pytest -p suite_probe tests [--durations=40]

One JSON line per test in `$SUITE_PROBE_OUT` (default bench/results/suite-probe.jsonl): wall seconds;
CPU seconds of the pytest process (user, system) and of its reaped children; the CPU seconds the
whole machine was busy meanwhile (from /proc/stat: more than the test's own means other processes
ran — a Ray worker, a Spark JVM, or something outside the suite); minor page faults and involuntary
context switches of the process; and after the test the process's threads, RSS, Python objects
tracked by the garbage collector, direct child processes, torch's thread counts and the load average.
A test whose wall time grows while its own CPU seconds do not was waiting for the CPU. Linux only.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import time

OUT = os.environ.get("SUITE_PROBE_OUT", os.path.join(os.path.dirname(__file__), "results", "suite-probe.jsonl"))
_start: dict = {}


def _machine_busy() -> float:
    """CPU seconds the machine has spent not idle since boot."""
    with open("/proc/stat") as f:
        ticks = list(map(int, f.readline().split()[1:]))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _status() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {"threads": int(fields["Threads"]), "rss_mib": int(fields["VmRSS"].split()[0]) // 1024}


def _children() -> int:
    me, n = str(os.getpid()), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[1] == me
        except OSError:
            continue
    return n


def pytest_runtest_setup(item) -> None:
    _start.update(wall=time.perf_counter(), own=resource.getrusage(resource.RUSAGE_SELF),
                  kids=resource.getrusage(resource.RUSAGE_CHILDREN), busy=_machine_busy())


def pytest_runtest_logfinish(nodeid, location) -> None:
    if not _start:
        return
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    o, k = _start["own"], _start["kids"]
    try:
        import torch
        torch_threads = [torch.get_num_threads(), torch.get_num_interop_threads()]
    except ImportError:
        torch_threads = None
    record = {"test": nodeid, "wall_s": round(time.perf_counter() - _start["wall"], 2),
              "cpu_user_s": round(own.ru_utime - o.ru_utime, 2), "cpu_sys_s": round(own.ru_stime - o.ru_stime, 2),
              "children_cpu_s": round(kids.ru_utime + kids.ru_stime - k.ru_utime - k.ru_stime, 2),
              "machine_busy_s": round(_machine_busy() - _start["busy"], 2),
              "minor_faults": own.ru_minflt - o.ru_minflt, "involuntary_switches": own.ru_nivcsw - o.ru_nivcsw,
              "gc_objects": len(gc.get_objects()), "child_processes": _children(), "torch_threads": torch_threads,
              "load_1m": round(os.getloadavg()[0], 2)} | _status()
    _start.clear()
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(record) + "\n")
