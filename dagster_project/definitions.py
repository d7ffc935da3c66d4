"""The Dagster code location (workspace.yaml): assets, checks and resources."""
from dagster import Definitions

from dagster_project.data_assets import lake_tables
from dagster_project.resources import SpecResource

defs = Definitions(assets=[lake_tables], resources={"spec": SpecResource()})
