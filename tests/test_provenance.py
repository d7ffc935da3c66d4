"""Benchmark result files carry how they were made and are replaced whole."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np

from jobs.provenance import provenance, write_result


def test_provenance_names_the_commit_the_command_and_the_machine():
    p = provenance()
    assert set(p) == {"date", "command", "commit", "machine"}
    assert p["commit"] and p["command"].startswith("python ")
    assert p["machine"]["cpus"] == os.cpu_count() and p["machine"]["memory_gib"] > 0


def test_a_result_made_by_a_script_never_committed_is_marked_dirty(tmp_path, monkeypatch):
    """A benchmark run before its script was committed names a commit that lacks its code: "+dirty";
    a committed script, or one git ignores (an entry point in .venv), leaves the commit clean."""
    from jobs import provenance
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "bench.py").write_text("print(1)\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (tmp_path / "new.py").write_text("print(2)\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "tool").write_text("")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    head = provenance.commit()
    assert head and "+" not in head and provenance.commit(str(tmp_path / "bench.py")) == head
    assert provenance.commit(str(tmp_path / "new.py")) == f"{head}+dirty"
    assert provenance.commit(str(tmp_path / ".venv" / "tool")) == head


def test_write_result_replaces_the_file_whole_and_takes_numpy_figures(tmp_path):
    out = tmp_path / "results" / "r.json"
    write_result(out, {"x": np.float32(0.25), "n": np.int64(3), "day": tmp_path})
    write_result(out, {"x": 0.5})
    assert json.loads(out.read_text()) == {"x": 0.5}
    assert os.listdir(out.parent) == ["r.json"]  # no temporary left behind


def test_a_submitted_job_names_the_commit_its_launcher_ran(tmp_path, monkeypatch):
    """A Ray job's copy of the project travels without .git (`jobs.rayjob.UPLOAD_EXCLUDES`): its
    launcher's commit comes with it, and git is not asked there; a checkout answers from git even
    when the variable is set (a head started from an image carries the image's)."""
    from jobs import provenance
    from jobs.rayjob import job_runtime_env
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc1234+dirty")
    from jobs.spec import load_spec
    launcher = job_runtime_env(load_spec("movielens-100k-smoke"))["env_vars"][provenance.COMMIT_ENV]
    assert launcher == provenance.commit() != "abc1234+dirty" and launcher
    monkeypatch.setattr(provenance, "ROOT", tmp_path)  # the job's working directory: no .git
    assert provenance.commit() == "abc1234+dirty"
    monkeypatch.delenv(provenance.COMMIT_ENV)
    assert provenance.commit() == ""
