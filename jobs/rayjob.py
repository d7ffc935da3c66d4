"""A pipeline stage as a Ray job, seen from outside the cluster: the module each stage runs, its
command line, the spec path that travels with it, Ray's token authentication and submitting to a
head that has just started. `llmrec submit`, the Dagster model assets and the Kubernetes manifests
all build their jobs here."""
from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable

from jobs.schema import JobSpec
from jobs.spec import resolve_spec_path

PROJECT = Path(__file__).resolve().parents[1]  # what a submitted job uploads as its working directory
# what a job never reads stays behind: the history (every committed result and start model would
# travel with every job), the measurements and the docs; Ray leaves out what .gitignore names
UPLOAD_EXCLUDES = ("/.git", "/bench/", "/docs/")
JOB_MODULES = {"train": "ray_jobs.train", "align": "ray_jobs.align", "evaluate": "ray_jobs.evaluate",
               "recommend": "ray_jobs.recommend"}


def job_runtime_env(spec: JobSpec) -> dict:
    """A submitted job's runtime environment: the project as its working directory, less what a job
    never reads, the commit it runs (its MLflow runs are tagged with it) and the spec's CPU allocator
    (`jobs.allocator`: the job's driver then starts with it rather than re-executing itself)."""
    from jobs.allocator import allocator_env
    from jobs.provenance import COMMIT_ENV, commit
    return {"working_dir": str(PROJECT), "excludes": list(UPLOAD_EXCLUDES),
            "env_vars": {COMMIT_ENV: commit(), **allocator_env(spec)}}


def job_command(job: str, spec_arg: str, overrides: Iterable[str] = (), args: Iterable[str] = ()) -> list[str]:
    """`python -m ray_jobs.<job> --spec <spec_arg> [--set K=V ...] [args]`: what every launcher runs."""
    if job not in JOB_MODULES:
        raise ValueError(f"unknown job {job!r}; jobs: {sorted(JOB_MODULES)}")
    return ["python", "-m", JOB_MODULES[job], "--spec", spec_arg, *[x for o in overrides for x in ("--set", o)], *args]


def job_command_line(job: str, spec_arg: str, overrides: Iterable[str] = (), args: Iterable[str] = ()) -> str:
    return shlex.join(job_command(job, spec_arg, overrides, args))


def project_spec_path(spec_path: str) -> str:
    """The spec as a path inside the project: a submitted job runs in an uploaded copy of the project,
    so a spec outside it would not travel with the job."""
    path = Path(resolve_spec_path(spec_path)).resolve()
    try:
        return str(path.relative_to(PROJECT))
    except ValueError:
        raise ValueError(f"spec {spec_path}: must lie inside the project ({PROJECT}) to travel with a Ray job") from None


def local_token_auth() -> bool:
    """Token authentication for a Ray this process starts itself: Ray 2.60's GCS, raylet and agents
    listen on every interface whatever the node address, so a local Ray is only private if it asks
    for a token. A fresh random token goes into this process's environment (inherited by the Ray
    processes it starts, never written anywhere); Ray reads the mode when it is imported, so this
    must run first. Returns whether the mode is (now) token; an explicit RAY_AUTH_MODE is kept."""
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return os.environ.get("RAY_AUTH_MODE") == "token"


def client_token_auth() -> bool:
    """Token authentication for a Jobs API client, when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, or the ~/.ray/auth_token a head started by infra/local/ray-up.sh writes);
    an explicit RAY_AUTH_MODE is kept. Returns whether the mode is (now) token."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                                              or Path("~/.ray/auth_token").expanduser().exists()):
        os.environ["RAY_AUTH_MODE"] = "token"
    return os.environ.get("RAY_AUTH_MODE") == "token"


def submit_when_ready(client, attempts: int = 30, delay: float = 2.0, **params) -> str:
    """`client.submit_job(**params)`, retried while the head has no job agent yet (a head that has
    just started answers its dashboard first: "No available agent to submit job"). Returns the job id."""
    for attempt in range(attempts):
        try:
            return client.submit_job(**params)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
