"""Automation: the jobs the schedule and sensors launch, the nightly retraining schedule, the sensor
on the landing folder and the run-failure sensor. All stopped in local development (start them in
the UI); running in the production definitions (`dagster_project.production`)."""

import os
from datetime import datetime, timedelta
from pathlib import Path

from dagster import (
    AssetSelection,
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
from dagster_project.resources import SpecResource
from spark.sources import landing_days

MODEL_GROUPS = ("training", "alignment", "evaluation", "serving")
retrain_job = define_asset_job("retrain", selection=AssetSelection.groups(*MODEL_GROUPS),
                               description="train, align, evaluate, gate and recommend on the published data")
ingest_job = define_asset_job("ingest_landing_day", selection=AssetSelection.keys("bronze/landed_day"),
                              partitions_def=LANDING_DAYS, description="MERGE one landed day and republish gold")
nightly_job = define_asset_job("nightly", partitions_def=LANDING_DAYS,
                               selection=AssetSelection.keys("bronze/landed_day") | AssetSelection.groups(*MODEL_GROUPS),
                               description="ingest the day's landing partition, then retrain")


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
        folder = spec.load().data.landing
        days = list(landing_days(folder)) if folder is not None else []
        if not days:
            return SkipReason("no landed day yet" if folder is not None else "data.landing is not configured")
        yesterday = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
        day = yesterday if yesterday in days else days[-1]
        if not context.instance.has_dynamic_partition(LANDING_DAYS.name, day):
            context.instance.add_dynamic_partitions(LANDING_DAYS.name, [day])
        return RunRequest(run_key=f"nightly-{context.scheduled_execution_time.isoformat()}", partition_key=day)
    return ingest_and_retrain


def landing_sensor(running: bool):
    """Every new day in the landing folder becomes a partition and an ingestion run."""
    @sensor(name="landing_folder", job=ingest_job, minimum_interval_seconds=60,
            default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED)
    def watch(context: SensorEvaluationContext, spec: SpecResource):
        landing = spec.load().data.landing
        if landing is None:
            return SkipReason("data.landing is not configured")
        if not os.path.isdir(landing.path):
            return SkipReason(f"landing folder {landing.path} does not exist")
        known = set(context.instance.get_dynamic_partitions(LANDING_DAYS.name))
        new = [d for d in landing_days(landing) if d not in known]
        if not new:
            return SkipReason(f"no new day in {landing.path}")
        return SensorResult(run_requests=[RunRequest(run_key=f"landing-{d}", partition_key=d) for d in new],
                            dynamic_partitions_requests=[LANDING_DAYS.build_add_request(new)])
    return watch


def failure_summary(context: RunFailureSensorContext) -> str:
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
        (folder / f"{context.dagster_run.run_id}.md").write_text(failure_summary(context))
        context.log.error(f"run {context.dagster_run.run_id} failed: summary in {folder}")
    return summarize
