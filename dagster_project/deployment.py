"""One function builds the code location's definitions from a deployment's resources and switches:
`definitions.py` (local development) and `production.py` call it with their own."""
from __future__ import annotations

from dagster import Definitions, in_process_executor

from dagster_project.automation import (
    failure_sensor,
    ingest_job,
    landing_sensor,
    nightly_job,
    nightly_schedule,
    retrain_job,
)
from dagster_project.data_assets import lake_tables, landed_day
from dagster_project.model_assets import (
    aligned_model,
    champion_model,
    evaluation_report,
    recommendations,
    trained_model,
)
from dagster_project.resources import MLflowResource, RayResource, SparkResource, SpecResource
from jobs.secrets import install_redaction


def build_definitions(spec: SpecResource, ray: RayResource, mlflow: MLflowResource, landing: bool = False,
                      timezone: str = "UTC", automation_running: bool = False,
                      spark: SparkResource | None = None) -> Definitions:
    """The asset graph (data -> training -> alignment -> evaluation -> serving), its checks, the
    nightly schedule and the sensors. `landing` (a deployment whose spec has `data.landing`) adds the
    partitioned `bronze/landed_day` asset and the jobs that ingest it. Runs execute in one process
    (one Ray head per run when none is configured). Building them installs the process's redaction
    (`jobs.secrets.install_redaction`): the code location is a process edge too."""
    install_redaction()
    assets = [lake_tables, trained_model, aligned_model, evaluation_report, champion_model, recommendations]
    jobs = [retrain_job]
    sensors = [failure_sensor(automation_running)]
    if landing:
        assets.append(landed_day)
        jobs += [ingest_job, nightly_job]
        sensors.append(landing_sensor(automation_running))
    return Definitions(assets=assets, jobs=jobs, schedules=[nightly_schedule(landing, timezone, automation_running)],
                       sensors=sensors, resources={"spec": spec, "spark": spark or SparkResource(), "ray": ray,
                                                   "mlflow": mlflow},
                       executor=in_process_executor)
