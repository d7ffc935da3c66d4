"""Crash consistency of the lake (in the spirit of ALICE / CrashMonkey, at our level): an ETL or a
daily ingest stopped after its n-th Delta commit — by an exception or by the process dying on the
spot — then the next step run normally; torn commit files and orphan data files left behind; a real
`llmrec etl` killed at random moments. Readers must only ever see a complete published set (the one
before or the new one), and the final tables must hold what a clean run's hold.

In `make test` a bounded set of injection points runs; `bench/crash_consistency.py` runs every
point (LLMREC_CRASH_POINTS=all) and records the count and the inconsistencies found."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from jobs.lake import PUBLISHED, Lake, LakeCorrupt, dataset_root, published_versions
from ray_jobs.data import load_sequences
from spark.etl import ETL_TABLES, ingest_day, run_etl
from test_catalogue import BASE, BASE_ITEMS, at, land, landing_spec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "crash_driver.py"
DAY1 = [("u1", "x", at(1, 1), 5), ("u2", "x", at(1, 2), 4), ("u4", "x", at(1, 3), 5), ("u4", "a", at(1, 4), 3)]
DAY2 = [("u3", "x", at(2, 1), 2), ("u5", "y", at(2, 2), 4), ("u5", "b", at(2, 3), 5), ("u1", "y", at(2, 4), 3)]


def contents(spec) -> dict[str, list[str]] | None:
    """The published tables' rows (content only: no ingest dates), or None when nothing is published."""
    versions = published_versions(spec)
    if versions is None:
        return None
    out = {}
    for table in ETL_TABLES:
        t = DeltaTable(Lake.of(spec).path(table), version=versions[table]).to_pyarrow_table()
        t = t.drop_columns([c for c in ("ingest_date",) if c in t.column_names])
        out[table] = sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())
    return out


def scenario(make_spec, tmp: Path):
    """A generic source with item metadata, one landed day before the ETL (day 1) and one after (day 2)."""
    spec, landing = landing_spec(make_spec, tmp, BASE, BASE_ITEMS, lake=str(tmp / "lake"), max_quarantine_share=1.0)
    land(landing, "2026-01-02", DAY1, [("x", "Xeno", "Sci-Fi", "2026")])
    return spec, landing


def day2(landing: Path, present: bool) -> None:
    """The second landed day in the (one, shared) landing folder, or not: bronze records name their
    file, so every lake here reads the same paths."""
    if present:
        land(landing, "2026-01-03", DAY2, [("y", "Ypsilon", "Drama", "2020")])
    else:
        for f in ("2026-01-03.csv", "2026-01-03.items.csv"):
            (landing / f).unlink(missing_ok=True)


def run_driver(spec, step: str, n: int, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), json.dumps(spec.model_dump(mode="json")), step, str(n), mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, engines):
    """A clean run's published contents after the ETL and after the ingest, each step's commit count,
    and the lake as it stood before the ingest (what each injection point starts from)."""
    from jobs.lake import observe_commits
    from jobs.spec import validate_spec
    from conftest import _spec_doc
    sail = engines.get("sail")
    tmp = tmp_path_factory.mktemp("crash")

    def make_spec(engine="sail", lake=None, **data):
        return validate_spec(_spec_doc(lake or str(tmp / "lake"), engine, **data))
    spec, landing = scenario(make_spec, tmp)
    commits: dict[str, int] = {}
    counted: list = []
    with observe_commits(lambda p, v: counted.append(p)):
        run_etl(spec, sail)
        commits["etl"] = len(counted)
        after_etl = contents(spec)
        shutil.copytree(dataset_root(spec), tmp / "after-etl")
        day2(landing, True)
        counted.clear()
        ingest_day(spec, sail, "2026-01-03")
        commits["ingest"] = len(counted)
    return {"tmp": tmp, "spec": spec, "landing": landing, "commits": commits, "after_etl": after_etl,
            "after_ingest": contents(spec), "make_spec": make_spec}


def injection_points(commits: dict[str, int]) -> list[tuple[str, int, str]]:
    """Every (step, commit, mode) with LLMREC_CRASH_POINTS=all; otherwise a bounded sample of them:
    early, middle and last commits of each step, each mode once at least."""
    every = [(step, n, mode) for step, count in commits.items() for n in range(1, count + 1)
             for mode in ("crash", "raise")]
    if os.environ.get("LLMREC_CRASH_POINTS") == "all":
        return every
    pick = []
    for step, count in commits.items():
        pick += [(step, 1, "crash"), (step, count // 2, "raise"), (step, count - 1, "crash"), (step, count, "crash")]
    return pick


def fresh_lake(ref, name: str, before: str | None):
    """A lake of its own for one injection point: empty (before the ETL) or as the clean ETL left it."""
    spec = ref["make_spec"](**{**ref["spec"].data.model_dump(exclude={"name"}), "name": "ds"},
                            lake=str(ref["tmp"] / name))
    if before:
        shutil.copytree(ref["tmp"] / before, dataset_root(spec))
    return spec


def test_a_fault_after_any_commit_leaves_a_complete_set_and_the_next_run_repairs(reference, engines):
    sail = engines.get("sail")
    ref = reference
    points = injection_points(ref["commits"])
    records = []
    for step, n, mode in points:
        before = None if step == "etl" else "after-etl"
        spec = fresh_lake(ref, f"p-{step}-{n}-{mode}", before)
        expected_before = None if step == "etl" else ref["after_etl"]
        expected_after = ref["after_etl"] if step == "etl" else ref["after_ingest"]
        day2(ref["landing"], step != "etl")
        proc = run_driver(spec, "etl" if step == "etl" else "ingest:2026-01-03", n, mode)
        # the fault fired at its commit (a run it never reached would pass every check below as a clean one)
        if mode == "crash":
            assert proc.returncode == 86, proc.stderr[-3000:]
        else:
            assert proc.returncode == 0 and json.loads(proc.stdout)["fault"] == "raised", proc.stderr[-3000:]
        seen = contents(spec)  # what a reader sees now: a complete earlier set or the new one, never a mix
        consistent = seen in (expected_before, expected_after)
        if step == "etl":
            run_etl(spec, sail)
        else:
            ingest_day(spec, sail, "2026-01-03")
        repaired = contents(spec) == expected_after
        records.append({"step": step, "commit": n, "mode": mode, "exit": proc.returncode,
                        "reader_consistent": consistent, "final_equals_clean": repaired})
        assert consistent, (step, n, mode)
        assert repaired, (step, n, mode)
    if os.environ.get("LLMREC_CRASH_RESULTS"):
        Path(os.environ["LLMREC_CRASH_RESULTS"]).write_text(json.dumps({"commits": ref["commits"], "points": records},
                                                                       indent=2))


def test_torn_commits_and_orphan_files_are_repaired_by_the_next_writer(reference, engines, tmp_path):
    """A writer that died inside a commit: a truncated or garbage commit file beyond the published
    version of a table, and data files no commit names. The next ingest sets the torn file aside,
    ignores the orphans and ends with a clean run's contents; a torn publication log is one clear
    line and exit 2 for a reader until a writer repairs it."""
    sail = engines.get("sail")
    ref = reference
    day2(ref["landing"], True)
    spec = fresh_lake(ref, "torn", "after-etl")
    lake = Lake.of(spec)
    silver = Path(lake.path("interactions"))
    head = DeltaTable(str(silver)).version()
    (silver / "_delta_log" / f"{head + 1:020d}.json").write_text('{"add": {"path": "part-0')  # torn mid-write
    (silver / "part-00000-orphan.parquet").write_bytes(b"PAR1 not a real file")
    items = Path(lake.path("item_index"))
    (items / "_delta_log" / f"{DeltaTable(str(items)).version() + 1:020d}.json").write_text("")  # empty commit file
    assert load_sequences(spec).versions == published_versions(spec)  # readers read the published versions only

    def tables() -> subprocess.CompletedProcess:  # what an operator runs: every table's latest version
        return subprocess.run([str(Path(sys.executable).parent / "llmrec"), "tables", "--spec", "movielens-100k-smoke",
                               "--set", f"lake.root={spec.lake.root}", "--set", "data.name=ds"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    cli = tables()
    assert cli.returncode == 2 and "silver/interactions" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    published = Path(dataset_root(spec)) / PUBLISHED
    (published / "_delta_log" / f"{DeltaTable(str(published)).version() + 1:020d}.json").write_text("\x00garbage")
    with pytest.raises(LakeCorrupt, match="table _etl/published"):
        published_versions(spec)
    result = ingest_day(spec, sail, "2026-01-03")
    assert {r["action"] for r in result.repairs} == {"torn_commit_set_aside"}
    assert contents(spec) == ref["after_ingest"] and tables().returncode == 0
    assert (silver / "_delta_log" / "_torn").is_dir() and (published / "_delta_log" / "_torn").is_dir()


def test_a_real_etl_killed_at_random_moments_never_shows_readers_a_mix(reference, engines):
    """`llmrec etl` as a user runs it, SIGKILLed at a random moment (seeded) after its first commit,
    then run again: a full rebuild of base + both landed days, which ends with what the daily ingest
    gave."""
    ref = reference
    day2(ref["landing"], True)
    seeds = range(6) if os.environ.get("LLMREC_CRASH_POINTS") == "all" else range(2)
    for seed in seeds:
        spec = fresh_lake(ref, f"kill-{seed}", "after-etl")
        args = [str(Path(sys.executable).parent / "llmrec"), "etl", "--quiet", "--spec", "movielens-100k-smoke",
                "--set", f"lake.root={spec.lake.root}", "--set", "data.name=ds",
                "--set", f"data={json.dumps(spec.data.model_dump(mode='json'))}"]
        lake = Lake.of(spec)
        before = {t: lake.version(t) for t in ETL_TABLES}
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        # its first commit (the kill lands inside the ETL's writes, not in its start-up), then a random moment
        deadline = time.monotonic() + 240
        while proc.poll() is None and {t: lake.version(t) for t in ETL_TABLES} == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
        assert proc.poll() is None, f"seed {seed}: the ETL ended before the kill"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert {t: lake.version(t) for t in ETL_TABLES} != before  # killed after a commit of its own
        assert contents(spec) in (ref["after_etl"], ref["after_ingest"])
        again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert contents(spec) == ref["after_ingest"]
