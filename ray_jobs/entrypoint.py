"""`python -m ray_jobs.<job>`: the entry point every job uses (its options, the redacted exit on
errors, SIGTERM as a clean stop with the job's MLflow runs ended KILLED) and what a job tells the
Dagster asset that launched it."""
from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jobs.allocator import exec_with_allocator
from jobs.contracts import Record, meta
from jobs.errors import SpecError
from jobs.schema import JobSpec
from jobs.spec import load_spec

USER_ERRORS = (SpecError, FileNotFoundError, ValueError)  # CatalogueMismatch, SourceError, UnsafeFile are ValueErrors


def run_options(default_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """The options of a job that runs on Ray Train and registers a model."""
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--run-name", help=f"Ray Train run name (default: {default_name}); the same name resumes")
        ap.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    return add


@dataclass
class DagsterReport:
    """What a job tells the Dagster asset that launched it (through Dagster Pipes): materialization
    metadata and the results of the asset's checks (name -> (passed, metadata))."""
    metadata: dict
    checks: dict[str, tuple[bool, dict]]


def markdown_image(path: str, title: str) -> dict:
    """A PNG as Dagster markdown metadata (inline, so the UI shows it without file access)."""
    import base64
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return meta(f"![{title}](data:image/png;base64,{data})", "md")


class JobStopped(KeyboardInterrupt):
    """The job was asked to stop (SIGTERM: `ray job stop`, a cancelled Dagster run); a KeyboardInterrupt
    so that nothing on the way out mistakes it for an error of the job, and every run it had open is
    ended as KILLED (`tracking.failed_on_error`)."""


_stop_hooks: list[Callable[[], None]] = []
_stopped: list[int] = []
_stop_installed: list[bool] = []


def on_stop(hook: Callable[[], None]) -> None:
    """Run `hook` as soon as the job is asked to stop (before anything unwinds: Ray sends SIGKILL a few
    seconds after SIGTERM, so what must be recorded is recorded first)."""
    _stop_hooks.append(hook)


def stop_requested() -> bool:
    return bool(_stopped)


def stop_on_sigterm() -> None:
    """On SIGTERM: run the stop hooks (the open MLflow runs are ended KILLED), then raise `JobStopped`
    in this (main) thread."""
    import signal

    def stop(signum, frame):
        _stopped.append(signum)
        for hook in list(_stop_hooks):
            try:
                hook()
            except Exception as exc:  # a hook that fails must not keep the job from stopping
                print(f"on stop: {type(exc).__name__}", file=sys.stderr)
        raise JobStopped(f"stopped by signal {signum}")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        _stop_installed.append(True)


def reinstall_stop_handler() -> None:
    """`ray.init` puts its own SIGTERM handler (a bare exit) in place of the job's: put the job's back."""
    if _stop_installed:
        stop_on_sigterm()


def job_main(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[JobSpec, argparse.Namespace], Record], argv: list[str] | None = None,
             report: Callable[[JobSpec, Record], DagsterReport] | None = None) -> int:
    """`python -m ray_jobs.<job> --spec S [--set k=v ...] [job options]`: run the job, print its
    outcome (`jobs.contracts`) as JSON; a user mistake (bad spec, missing model, mismatched data) is one line on
    stderr and exit code 2; anything else a traceback and exit 1 — both redacted (`jobs.secrets`), as
    is every log record and warning of the job; SIGTERM stops the job with its MLflow runs marked
    KILLED (exit 143). Launched by Dagster Pipes (`DAGSTER_PIPES_CONTEXT` set), the MLflow run is
    tagged with the Dagster run and asset, and `report` turns the result into the asset's
    materialization metadata and check results."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    from jobs.secrets import install_redaction, redact, redacted_exception
    install_redaction()
    stop_on_sigterm()
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    ap.add_argument("--spec", required=True, help="spec YAML (path, or a name under jobs/specs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
        if argv is None:  # a job's own process (not a call from Python): restarted with its allocator
            exec_with_allocator(spec)
        if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
            out = run(spec, args)
        else:
            with open_dagster_pipes() as pipes:
                asset = pipes.asset_keys[0] if pipes.is_asset_step else None
                spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
                    update={"dagster_run_id": pipes.run_id, "dagster_asset": asset})})
                out = run(spec, args)
                if report is not None:
                    r = report(spec, out)
                    pipes.report_asset_materialization(metadata=r.metadata)
                    for name, (passed, meta) in r.checks.items():
                        pipes.report_asset_check(check_name=name, passed=passed, metadata=meta)
    except USER_ERRORS as exc:
        print(f"error: {redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)}",
              file=sys.stderr)
        return 2
    except JobStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 143
    except Exception as exc:
        print(redacted_exception(exc), file=sys.stderr)
        return 1
    print(json.dumps(out.to_dict(), indent=2, default=float))
    return 0
