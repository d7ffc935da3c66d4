"""Benchmark result files carry how they were made and are replaced whole."""
from __future__ import annotations

import json
import os

import numpy as np

from jobs.provenance import provenance, write_result


def test_provenance_names_the_commit_the_command_and_the_machine():
    p = provenance()
    assert set(p) == {"date", "command", "commit", "machine"}
    assert p["commit"] and p["command"].startswith("python ")
    assert p["machine"]["cpus"] == os.cpu_count() and p["machine"]["memory_gib"] > 0


def test_write_result_replaces_the_file_whole_and_takes_numpy_figures(tmp_path):
    out = tmp_path / "results" / "r.json"
    write_result(out, {"x": np.float32(0.25), "n": np.int64(3), "day": tmp_path})
    write_result(out, {"x": 0.5})
    assert json.loads(out.read_text()) == {"x": 0.5}
    assert os.listdir(out.parent) == ["r.json"]  # no temporary left behind
