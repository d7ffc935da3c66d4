"""The Dagster code location for production (infra/dagster/workspace.yaml): the spec, the Ray
launcher and the MLflow tracking server come from the deployment's environment, landed days are
ingested, and the nightly schedule and sensors run.

LLMREC_RAY_LAUNCHER (read when the code location loads) chooses where the model assets' Ray jobs run:
`jobs_api` (default) — the Jobs API of a running cluster at LLMREC_RAY_ADDRESS; `kuberay` — one KubeRay
RayJob per asset run with its own RayCluster from the spec, image LLMREC_IMAGE, namespace
LLMREC_NAMESPACE (the in-cluster service account needs the Role in infra/dagster/k8s.yaml). The other
values are read when a run starts, not at import."""
import os

from dagster import EnvVar

from dagster_project.deployment import build_definitions
from dagster_project.resources import MLflowResource, RayResource, SpecResource


def ray_resource(launcher: str) -> RayResource:
    if launcher == "kuberay":
        return RayResource(launcher="kuberay", image=EnvVar("LLMREC_IMAGE"), namespace=EnvVar("LLMREC_NAMESPACE"))
    if launcher == "jobs_api":
        return RayResource(address=EnvVar("LLMREC_RAY_ADDRESS"))
    raise ValueError(f"LLMREC_RAY_LAUNCHER={launcher!r}: expected jobs_api or kuberay")


defs = build_definitions(
    SpecResource(spec_path=EnvVar("LLMREC_SPEC")),
    ray_resource(os.environ.get("LLMREC_RAY_LAUNCHER", "jobs_api")),
    MLflowResource(tracking_uri=EnvVar("MLFLOW_TRACKING_URI")),
    landing=True, timezone="UTC", automation_running=True)
