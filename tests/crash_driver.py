"""Run one ETL step of a spec and stop it after its n-th Delta commit — by raising (the run's own
failure path) or by exiting the process on the spot (a crash: nothing after it runs). The crash-
consistency test and `bench/crash_consistency.py` start it as a subprocess:

    python tests/crash_driver.py SPEC_JSON etl|ingest:DAY N raise|crash
"""
from __future__ import annotations

import json
import os
import sys

from jobs.lake import observe_commits
from jobs.spec import validate_spec
from spark.etl import engine_for, ingest_day, run_etl

CRASHED = 86


class InjectedFault(RuntimeError):
    pass


def main(spec_json: str, step: str, n: int, mode: str) -> int:
    spec = validate_spec(json.loads(spec_json))
    seen: list[tuple[str, int]] = []

    def after_commit(path: str, version: int) -> None:
        seen.append((path, version))
        if len(seen) == n:
            if mode == "crash":
                os._exit(CRASHED)
            raise InjectedFault(f"injected after commit {n} ({path} v{version})")

    with engine_for(spec) as engine, observe_commits(after_commit):
        try:
            if step == "etl":
                run_etl(spec, engine)
            else:
                ingest_day(spec, engine, step.split(":", 1)[1])
        except InjectedFault:
            print(json.dumps({"commits": len(seen), "fault": "raised"}))
            return 0
    print(json.dumps({"commits": len(seen), "fault": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
