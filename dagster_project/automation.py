"""Automation: the jobs the schedule and sensors launch, the nightly retraining schedule, the sensor
on the landing folder and the run-failure sensor. All stopped in local development (start them in
the UI); running in the production definitions (`dagster_project.production`).

The assets that write the lake share the concurrency pool `llmrec_lake` (limit 1 in the instance's
config, infra/dagster/dagster*.yaml): one lake-writing run at a time, whichever sensor, schedule or
person launched it; a run that still finds the lake busy (an ETL started outside Dagster) is retried
(`RetryRequested` on `LakeBusy`). Landed days go in date order (`dagster_project.landing`)."""

import os
import time
from datetime import datetime
from pathlib import Path

from dagster import (
    AssetSelection,
    RunsFilter,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    schedule,
    sensor,
)

from dagster_project.data_assets import LANDING_DAYS
from dagster_project.landing import landing_plan
from dagster_project.resources import SpecResource
from jobs.files import write_atomic
from jobs.secrets import redact

MODEL_GROUPS = ("training", "alignment", "evaluation", "serving")
retrain_job = define_asset_job("retrain", selection=AssetSelection.groups(*MODEL_GROUPS),
                               description="train, align, evaluate, gate and recommend on the published data")
ingest_job = define_asset_job("ingest_landing_day", selection=AssetSelection.keys("bronze/landed_day"),
                              partitions_def=LANDING_DAYS, description="MERGE one landed day and republish gold")
nightly_job = define_asset_job("nightly", partitions_def=LANDING_DAYS,
                               selection=AssetSelection.keys("bronze/landed_day") | AssetSelection.groups(*MODEL_GROUPS),
                               description="ingest the next landed day (in date order), then retrain, evaluate the "
                                           "models that served it on it, gate and recommend")


def nightly_schedule(landing: bool, timezone: str, running: bool):
    """02:00 every night in `timezone`. In a deployment with a landing folder: one run that ingests
    yesterday's landed day (or re-runs the latest landed day, a no-op MERGE, when yesterday has none)
    and retrains; otherwise a retraining run on the published data."""
    status = DefaultScheduleStatus.RUNNING if running else DefaultScheduleStatus.STOPPED

    if not landing:
        @schedule(cron_schedule="0 2 * * *", execution_timezone=timezone, name="nightly_retraining",
                  job=retrain_job, default_status=status)
        def retrain(context: ScheduleEvaluationContext):
            return RunRequest(run_key=f"nightly-{context.scheduled_execution_time.isoformat()}")
        return retrain

    @schedule(cron_schedule="0 2 * * *", execution_timezone=timezone, name="nightly_retraining",
              job=nightly_job, default_status=status)
    def ingest_and_retrain(context: ScheduleEvaluationContext, spec: SpecResource):
        job = spec.load()
        if job.data.landing is None:
            return SkipReason("data.landing is not configured")
        plan = landing_plan(job, context.scheduled_execution_time.timestamp())
        landed = sorted(plan.fingerprints)
        if not landed:
            return SkipReason("no landed day yet")
        if plan.day is None and plan.pending:
            return SkipReason(plan.reason)  # an earlier day is still missing: retraining waits with it
        day = plan.day or landed[-1]  # nothing new: the latest day again (a no-op MERGE), then retrain
        if not context.instance.has_dynamic_partition(LANDING_DAYS.name, day):
            context.instance.add_dynamic_partitions(LANDING_DAYS.name, [day])
        return RunRequest(run_key=f"nightly-{context.scheduled_execution_time.isoformat()}", partition_key=day)
    return ingest_and_retrain


def landing_sensor(running: bool):
    """The next landed day to ingest (date order; a re-delivered day again; a missing earlier day
    waited for) becomes a partition and an ingestion run, one at a time. The run key names the day's
    contents and the runs already tried with them, so a failed day is asked for again (after
    `retry_minutes`) and never dropped, and a re-delivered day is ingested again, also when its
    contents are ones ingested before."""
    @sensor(name="landing_folder", job=ingest_job, minimum_interval_seconds=60,
            default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED)
    def watch(context: SensorEvaluationContext, spec: SpecResource):
        job = spec.load()
        landing = job.data.landing
        if landing is None:
            return SkipReason("data.landing is not configured")
        if not os.path.isdir(landing.path):
            return SkipReason(f"landing folder {landing.path} does not exist")
        plan = landing_plan(job, time.time())
        if plan.day is None:
            return SkipReason(plan.reason)
        runs = context.instance.get_runs(filters=RunsFilter(job_name=ingest_job.name, tags={
            "dagster/partition": plan.day, "llmrec/fingerprint": plan.fingerprints[plan.day]}))
        if any(not r.is_finished for r in runs):
            return SkipReason(f"{plan.day} is being ingested")
        failed = [r for r in runs if r.is_failure_or_canceled]  # a cancelled try is a try: a new run key
        records = [context.instance.get_run_record_by_id(r.run_id) for r in failed]
        last = max((rec.end_time or rec.update_timestamp.timestamp() for rec in records), default=0)
        if len(failed) >= MAX_ATTEMPTS:
            return SkipReason(f"{plan.day} failed {len(failed)} times as it is; fix the data and deliver it again "
                              "(other contents are tried afresh)")
        if failed and time.time() - last < RETRY_MINUTES * 60:
            return SkipReason(f"{plan.day} failed {len(failed)} time(s); trying again {RETRY_MINUTES} minutes after")
        new_partition = [] if context.instance.has_dynamic_partition(LANDING_DAYS.name, plan.day) else [plan.day]
        # every run tried for these contents in the key: a failed one is asked for again, and contents
        # ingested before, replaced, then delivered again (A, B, A) get a key of their own
        request = RunRequest(run_key=f"landing-{plan.day}-{plan.fingerprints[plan.day]}-{len(runs)}",
                             partition_key=plan.day, tags={"llmrec/fingerprint": plan.fingerprints[plan.day]})
        return SensorResult(run_requests=[request], dynamic_partitions_requests=
                            [LANDING_DAYS.build_add_request(new_partition)] if new_partition else [])
    return watch


RETRY_MINUTES = 10
MAX_ATTEMPTS = 5


def failure_summary(context: RunFailureSensorContext) -> str:
    """The failed run's job, steps and errors, redacted (an error may quote a URI with a credential)."""
    return redact(_failure_text(context))


def _failure_text(context: RunFailureSensorContext) -> str:
    run, event = context.dagster_run, context.failure_event
    steps = [e.step_key for e in context.get_step_failure_events()]
    lines = [f"# Run {run.run_id} of {run.job_name} failed", "",
             f"- when: {datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- failed steps: {', '.join(s for s in steps if s) or 'none (the run itself failed)'}",
             f"- tags: {dict(run.tags)}", "", "## Error", "", event.message or "(no message)"]
    for e in context.get_step_failure_events():
        err = e.event_specific_data.error if e.event_specific_data else None
        if err is not None:
            lines += ["", f"### {e.step_key}", "", "```", err.to_string().strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


def failure_sensor(running: bool):
    """Writes `$DAGSTER_HOME/llmrec-failures/<run id>.md` (job, failed steps, errors) for every failed run."""
    @run_failure_sensor(name="run_failure_summary", monitor_all_code_locations=False,
                        default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED)
    def summarize(context: RunFailureSensorContext) -> None:
        folder = Path(os.environ.get("DAGSTER_HOME") or ".") / "llmrec-failures"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(str(folder / f"{context.dagster_run.run_id}.md"),
                     lambda tmp: Path(tmp).write_text(failure_summary(context)))
        context.log.error(f"run {context.dagster_run.run_id} failed: summary in {folder}")
    return summarize
