"""Dagster resources: the job spec a deployment runs (swap the spec path or overrides per deployment)."""

from dagster import ConfigurableResource
from pydantic import Field

from jobs.spec import JobSpec, load_spec


class SpecResource(ConfigurableResource):
    """Which spec the assets build, plus `--set`-style overrides (e.g. `spark.engine=remote`)."""

    spec_path: str = Field("jobs/specs/movielens-1m.yaml", description="spec YAML path or name under jobs/specs")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as with --set")

    def load(self) -> JobSpec:
        return load_spec(self.spec_path, self.overrides)
