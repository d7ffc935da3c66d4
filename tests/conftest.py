"""Shared fixtures: real Spark engines (one live at a time), specs over tmp lakes, small fixture files."""
from __future__ import annotations

import os
import shutil

import pytest

from jobs.spec import JobSpec, validate_spec
from spark.session import Engine, start_engine

ENGINES = ["sail", "local"]


class EngineHolder:
    """PySpark marks the whole process as 'Connect' once a Connect session exists, so Sail and the
    JVM engine can't be live together: the holder keeps one and switches on demand."""

    def __init__(self) -> None:
        self.current: Engine | None = None

    def get(self, name: str) -> Engine:
        if name == "local" and shutil.which("java") is None:
            pytest.fail("the local engine needs java on PATH (make install installs openjdk-17)")
        if self.current is not None and self.current.name != name:
            self.current.stop()
            self.current = None
        if self.current is None:
            self.current = start_engine(validate_spec(_spec_doc("x", engine=name)).spark)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def engines():
    holder = EngineHolder()
    yield holder
    holder.close()


@pytest.fixture(params=ENGINES)
def engine(request, engines) -> Engine:
    """A live engine, every test using it runs on both Sail and JVM Spark."""
    return engines.get(request.param)


@pytest.fixture
def sail(engines) -> Engine:
    return engines.get("sail")


def pytest_collection_modifyitems(items):
    """Run every JVM-engine test after the Sail ones so the JVM starts once."""
    def uses_local(item) -> bool:
        callspec = getattr(item, "callspec", None)
        return bool(callspec and "local" in callspec.params.values()) or item.get_closest_marker("jvm") is not None
    items.sort(key=uses_local)


def _spec_doc(lake_root: str, engine: str = "sail", **data) -> dict:
    doc = {"name": "test", "data": {"name": "ds", "source": {"kind": "movielens_packaged", "variant": "ml-100k"}},
           "spark": {"engine": engine}, "lake": {"root": lake_root}}
    doc["data"].update(data)
    return doc


@pytest.fixture
def make_spec(tmp_path):
    def make(engine: str = "sail", lake: str | None = None, **data) -> JobSpec:
        return validate_spec(_spec_doc(lake or str(tmp_path / "lake"), engine, **data))
    return make


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
