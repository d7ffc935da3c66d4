"""The Dagster code location for local development (workspace.yaml): the demo spec, a Ray head and
an MLflow store on this machine, automation stopped (start the schedule and sensors in the UI).
Resource values can be changed per run in the launchpad or with `dagster asset materialize -c`."""
from dagster_project.deployment import build_definitions
from dagster_project.resources import MLflowResource, RayResource, SpecResource

defs = build_definitions(SpecResource(spec_path="jobs/specs/movielens-1m-demo.yaml"), RayResource(), MLflowResource())
