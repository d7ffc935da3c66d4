"""A Dagster command with its progress in a few lines: the command's own output goes to a log file,
and each step of the run it starts is printed as it ends, with its duration and key figures read
from the run's events in the instance (`$DAGSTER_HOME`).

    python -m dagster_project.progress --log .dagster/demo.log -- dagster asset materialize ...
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance

SHOWN = (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE,
         DagsterEventType.ASSET_CHECK_EVALUATION, DagsterEventType.RUN_FAILURE)
HIDDEN_FIGURES = ("version", "versions", "seconds", "run_id", "_ms")


def figures(metadata: dict, most: int = 4) -> str:
    """The first few numeric entries of an asset's metadata (versions, ids and timings aside)."""
    out = []
    for key, entry in metadata.items():
        value = getattr(entry, "value", entry)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key.endswith(HIDDEN_FIGURES):
            continue
        out.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value:,}")
        if len(out) == most:
            break
    return ", ".join(out)


class RunFollower:
    """The events of the newest run started after `since`, turned into lines as they arrive."""

    def __init__(self, instance: DagsterInstance, since: float) -> None:
        self.instance, self.since = instance, since
        self.run_id: str | None = None
        self.cursor: str | None = None
        self.materialized: dict[str, dict] = {}

    def find_run(self) -> str | None:
        if self.run_id is None:
            for record in self.instance.get_run_records(limit=1):
                if record.create_timestamp.timestamp() >= self.since - 1:
                    self.run_id = record.dagster_run.run_id
        return self.run_id

    def lines(self) -> list[str]:
        if self.find_run() is None:
            return []
        conn = self.instance.get_records_for_run(self.run_id, cursor=self.cursor, of_type=set(SHOWN))
        self.cursor = conn.cursor
        return [line for record in conn.records if (line := self.line(record.event_log_entry))]

    def line(self, entry) -> str | None:
        event = entry.dagster_event
        step = entry.step_key or ""
        kind = event.event_type
        if kind == DagsterEventType.ASSET_MATERIALIZATION:
            self.materialized.setdefault(step, {}).update(entry.asset_materialization.metadata)
            return None
        if kind == DagsterEventType.STEP_SUCCESS:
            seconds = event.event_specific_data.duration_ms / 1000
            return f"  ok    {step:<28} {seconds:7.1f}s  {figures(self.materialized.get(step, {}))}".rstrip()
        if kind == DagsterEventType.STEP_FAILURE:
            error = event.event_specific_data.error
            while error is not None and error.cause is not None:  # the exception the step raised, not its wrapper
                error = error.cause
            message = (error.message if error else entry.user_message).strip().splitlines()
            return f"  FAIL  {step:<28} {message[-1] if message else ''}"
        if kind == DagsterEventType.ASSET_CHECK_EVALUATION:
            check = event.event_specific_data
            if not check.passed:
                return f"  check {check.asset_check_key.name} on {step} failed"
            return None
        if kind == DagsterEventType.RUN_FAILURE:
            return f"  run failed: {entry.user_message.strip().splitlines()[0]}"
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True, help="where the command's whole output goes")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the Dagster command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given after --")
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"{datetime.now(timezone.utc):%H:%M:%S} {' '.join(command[:3])} ... (whole output: {log})", flush=True)
    # The instance is opened before the command starts: opening it creates a fresh DAGSTER_HOME's
    # sqlite storage, and two processes creating it at once can stamp its schema version twice,
    # which leaves the instance unreadable ("more than one head present").
    follower = RunFollower(DagsterInstance.get(), started)
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while True:
            done = proc.poll() is not None
            for line in follower.lines():
                print(line, flush=True)
            if done:
                break
            time.sleep(2)
    minutes = (time.time() - started) / 60
    if proc.returncode:
        print(f"failed after {minutes:.1f} min (exit {proc.returncode}); the last lines of {log}:", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
    else:
        print(f"done in {minutes:.1f} min (run {follower.run_id})")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
