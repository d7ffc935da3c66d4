"""The C allocator of a job's CPU processes (`cluster.cpu_allocator`). PyTorch on CPU frees and
allocates the same large buffers every step (HSTU's attention maps are 20 MB a batch); glibc hands
each one back to the kernel and faults it in again on the next step — half an HSTU training worker's
CPU went to the kernel. jemalloc keeping its freed pages (no decay) reuses them: the same numbers
with about half the CPU per HSTU-large-shaped training step or scoring pass (`bench/cpu_allocator.py`),
at the price of a process holding on to its peak memory (~20 % more there). A preload reaches a
process only when it starts: Ray workers and tasks get it in their runtime environment, a submitted
job's driver in the job's (`jobs.rayjob.job_runtime_env`), and a job or command started any other
way re-executes itself with it (`exec_with_allocator`). Kept light: it runs before the heavy imports
of a command."""
from __future__ import annotations

import ctypes.util
import os
import sys

from jobs.errors import SpecError
from jobs.schema import JobSpec

# where Debian, Ubuntu and Fedora put it (libjemalloc2 / jemalloc); else the loader's search
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
KEEP_FREED_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc() -> str | None:
    """jemalloc's shared library on this machine: a path, or a name the dynamic loader finds; None without it."""
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None) or ctypes.util.find_library("jemalloc")


def allocator_env(spec: JobSpec) -> dict[str, str]:
    """The environment variables that give a job's processes the spec's `cluster.cpu_allocator`
    (`preload_env`). Found on the machine that runs the driver; a cluster's nodes run the same image."""
    return preload_env(spec.cluster.cpu_allocator, spec.train.use_gpu)


def ray_runtime_env(spec: JobSpec, **env_vars: str) -> dict | None:
    """A Ray task's or worker group's `runtime_env`: the spec's allocator and `env_vars`; None when
    there is nothing to set (the job's own environment, as without this module)."""
    env = {**allocator_env(spec), **env_vars}
    return {"env_vars": env} if env else None


def preload_env(choice: str, use_gpu: bool) -> dict[str, str]:
    """auto = jemalloc keeping freed pages for CPU work where the library is installed and no other
    library is preloaded, else the system's allocator; jemalloc = that, or a SpecError where it is
    missing; system = nothing. A MALLOC_CONF of the environment is kept. GPU jobs keep the system
    allocator under auto (measured on CPU only)."""
    if choice == "system" or (choice == "auto" and use_gpu):
        return {}
    lib = find_jemalloc()
    if lib is None:
        if choice == "jemalloc":
            raise SpecError("cluster.cpu_allocator=jemalloc: libjemalloc.so.2 is not installed on this machine "
                            "(Debian/Ubuntu: apt-get install libjemalloc2); use auto or system")
        return {}
    preload = os.environ.get("LD_PRELOAD", "")
    preloaded = preload.replace(" ", ":").split(":")
    if lib not in preloaded:
        if choice == "auto" and preload:  # someone else's preload (another allocator, a profiler): left alone
            return {}
        preload = ":".join(p for p in (lib, preload) if p)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": os.environ.get("MALLOC_CONF", KEEP_FREED_PAGES)}


def exec_with_allocator(spec: JobSpec) -> None:
    """Re-execute this process (same pid, same command line) with the spec's allocator (`allocator_env`),
    unless it already runs with it: a preloaded library takes effect only when a process starts. For a
    command's own process only, never for a function called from other Python code."""
    env = allocator_env(spec)
    if env and any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})


def main(argv: list[str] | None = None) -> None:
    """`python -m jobs.allocator COMMAND [ARG ...]`: run COMMAND with the allocator a CPU job's
    processes get by default (auto): `make test` runs the suite so, as the jobs' own processes run."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m jobs.allocator COMMAND [ARG ...]")
    os.execvpe(argv[0], argv, {**os.environ, **preload_env("auto", use_gpu=False)})


if __name__ == "__main__":
    main()
