"""How a figure or a run was made: when, the command, the commit, the machine. Benchmark result
files (`bench/results/*.json`) carry it and are written whole or not at all; MLflow runs are
tagged with the commit."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
COMMIT_ENV = "LLMREC_COMMIT"  # the commit of a copy of the project without .git: a Ray job's (its launcher's), an image's


def commit(script: str | None = None) -> str:
    """The project's commit (short hash, "+dirty" when tracked files differ or the running `script`
    is a project file never committed: its code is in no commit). A copy of the project without
    .git (a submitted Ray job's working directory, an image) has the one its launcher or build gave
    (`COMMIT_ENV`), else ""."""
    if not (ROOT / ".git").exists():  # and git is not asked: it would answer for a repository above
        return os.environ.get(COMMIT_ENV, "")
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return head
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if not dirty and script and Path(script).resolve().is_relative_to(ROOT):  # untracked, and not ignored (.venv)
        dirty = bool(git("ls-files", "--others", "--exclude-standard", "--", str(Path(script).resolve().relative_to(ROOT))))
    return f"{head}+dirty" if dirty else head


def machine() -> dict:
    import psutil
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


def provenance() -> dict:
    """Date (UTC), the command as typed, the commit and the machine: the head of every result file."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "-c", *sys.argv[1:]])
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "commit": commit(sys.argv[0] or None), "machine": machine()}


def _plain(value):
    """numpy scalars as numbers, anything else JSON can't hold (dates, paths) as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def write_result(path: str | os.PathLike, result: dict) -> None:
    """The result as indented JSON, replacing `path` whole (a reader never sees half a file)."""
    from jobs.files import write_atomic

    def fill(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2, default=_plain)
            fh.write("\n")
    write_atomic(str(path), fill)
    print("wrote", path, flush=True)
