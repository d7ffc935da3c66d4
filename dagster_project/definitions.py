"""The Dagster code location for local development (workspace.yaml): the spec named by LLMREC_SPEC
(default the demo spec; `make ui SPEC=...` sets it), a Ray head and an MLflow store on this machine,
automation stopped (start the schedule and sensors in the UI). A spec with `data.landing` gets the
landed-day partitions, the ingest and nightly jobs and the landing sensor, as production does, so
the nightly loop can be tried on one machine. Resource values can be changed per run in the
launchpad or with `dagster asset materialize -c`."""
import os

from dagster import Definitions

from dagster_project.deployment import build_definitions
from dagster_project.resources import MLflowResource, RayResource, SpecResource

DEMO_SPEC = "jobs/specs/movielens-1m-demo.yaml"


def local_definitions(spec_path: str = DEMO_SPEC) -> Definitions:
    spec = SpecResource(spec_path=spec_path)
    return build_definitions(spec, RayResource(), MLflowResource(), landing=spec.load().data.landing is not None)


defs = local_definitions(os.environ.get("LLMREC_SPEC") or DEMO_SPEC)
