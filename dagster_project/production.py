"""The Dagster code location for production (infra/dagster/workspace.yaml): the spec, the Ray
cluster's dashboard and the MLflow tracking server come from the deployment's environment (read
when a run starts, not at import), landed days are ingested, and the nightly schedule and sensors run."""
from dagster import EnvVar

from dagster_project.deployment import build_definitions
from dagster_project.resources import MLflowResource, RayResource, SpecResource

defs = build_definitions(
    SpecResource(spec_path=EnvVar("LLMREC_SPEC")),
    RayResource(address=EnvVar("LLMREC_RAY_ADDRESS")),
    MLflowResource(tracking_uri=EnvVar("MLFLOW_TRACKING_URI")),
    landing=True, timezone="UTC", automation_running=True)
