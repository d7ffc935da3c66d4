"""The Spark session builder: engines sail (embedded Spark Connect), local (JVM), remote, cluster."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from pyspark.sql import DataFrame, SparkSession

from jobs.secrets import from_env
from jobs.schema import SparkSpec

# Global windows (dense id assignment) are intended; PySpark's Connect client warns on each one.
warnings.filterwarnings("ignore", message=".*No Partition Defined for Window operation.*")

# PySpark sets this process-wide once a Connect session exists; classic sessions refuse to start
# while it is set, so it is cleared when a Connect session stops and before a JVM session starts.
_CONNECT_FLAG = "SPARK_CONNECT_MODE_ENABLED"
_live_connect_engines = 0

# Sail removes a Spark Connect session idle for `spark.session_timeout_secs` (900 s by default) and
# every later call on it fails ("session ... is not running"). The embedded server serves one
# session, its Engine's, which stop() ends: it never expires idle (a year), unless the environment
# sets its own timeout. Sail reads its configuration when the server object is built.
SAIL_SESSION_TIMEOUT_ENV = "SAIL_SPARK__SESSION_TIMEOUT_SECS"
SAIL_SESSION_IDLE_S = 365 * 24 * 3600


@dataclass
class Engine:
    """A live Spark session plus what the rest of the data layer needs to know about it."""

    name: str
    session: SparkSession
    native_delta: bool  # True: format("delta") + SQL MERGE; False: Delta through delta-rs
    scratch: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="llmrec-spark-"))
    _server: object | None = None
    _owns_scratch: bool = True

    def materialize(self, df: DataFrame) -> DataFrame:
        """Cut a long lineage: write to scratch Parquet and read it back (persist is a no-op on Sail)."""
        path = os.path.join(self.scratch, f"m-{uuid.uuid4().hex}")
        df.write.mode("overwrite").parquet(path)
        return self.session.read.parquet(path)

    def stop(self) -> None:
        try:
            self.session.stop()
        finally:
            if self._server is not None:
                self._server.stop()
                self._server = None
            if self.name in ("sail", "remote"):
                global _live_connect_engines
                _live_connect_engines -= 1
                if _live_connect_engines == 0:
                    os.environ.pop(_CONNECT_FLAG, None)
            if self._owns_scratch:
                shutil.rmtree(self.scratch, ignore_errors=True)


def _sail(spec: SparkSpec) -> Engine:
    os.environ.setdefault("RUST_LOG", "error")  # Sail logs every shutdown as "aborting N task(s)"
    from pysail.spark import SparkConnectServer

    preset = os.environ.get(SAIL_SESSION_TIMEOUT_ENV)
    os.environ[SAIL_SESSION_TIMEOUT_ENV] = preset or str(SAIL_SESSION_IDLE_S)
    try:
        server = SparkConnectServer(ip="127.0.0.1", port=0)
    finally:
        if preset is None:
            os.environ.pop(SAIL_SESSION_TIMEOUT_ENV, None)
    server.start(background=True)
    host, port = server.listening_address
    # create(), not getOrCreate(): the latter returns any active Connect session, whatever its URL
    session = SparkSession.builder.remote(f"sc://{host}:{port}").create()
    _apply_conf(session, spec)
    return Engine("sail", session, native_delta=True, _server=server)


def _remote(spec: SparkSpec) -> Engine:
    session = SparkSession.builder.remote(from_env(spec.remote, "spark.remote")).create()
    _apply_conf(session, spec)
    return Engine("remote", session, native_delta=True)


def driver_addresses(spec: SparkSpec) -> dict[str, str]:
    """Where the JVM driver listens and what it tells executors: loopback for the single-machine
    `local` engine; on a `cluster`, `spark.driver_host` / `spark.driver_bind_address` when set, else
    Spark's own choice (the machine's hostname, all interfaces), so remote executors can reach it."""
    if spec.engine == "local":
        return {"spark.driver.bindAddress": "127.0.0.1", "spark.driver.host": "127.0.0.1"}
    out = {}
    if spec.driver_host:
        out["spark.driver.host"] = spec.driver_host
    if spec.driver_bind_address:
        out["spark.driver.bindAddress"] = spec.driver_bind_address
    return out


def _jvm_builder(spec: SparkSpec, app_name: str) -> SparkSession.Builder:
    os.environ.pop(_CONNECT_FLAG, None)
    builder = (
        SparkSession.builder.master(spec.master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", spec.driver_memory)
        .config("spark.sql.shuffle.partitions", str(spec.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
    )
    for key, value in driver_addresses(spec).items():
        builder = builder.config(key, value)
    for key, value in spec.conf.items():
        builder = builder.config(key, from_env(value, f"spark.conf.{key}"))
    return builder


def _local(spec: SparkSpec, app_name: str) -> Engine:
    session = _jvm_builder(spec, app_name).getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    ext = session.conf.get("spark.sql.extensions", "") or ""
    return Engine("local", session, native_delta="DeltaSparkSessionExtension" in ext)


def _cluster(spec: SparkSpec, app_name: str) -> Engine:
    from delta import configure_spark_with_delta_pip

    builder = (
        _jvm_builder(spec, app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
    )
    session = configure_spark_with_delta_pip(builder).getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return Engine("cluster", session, native_delta=True)


def _apply_conf(session: SparkSession, spec: SparkSpec) -> None:
    session.conf.set("spark.sql.session.timeZone", "UTC")
    session.conf.set("spark.sql.shuffle.partitions", str(spec.shuffle_partitions))
    for key, value in spec.conf.items():
        session.conf.set(key, from_env(value, f"spark.conf.{key}"))


def start_engine(spec: SparkSpec, app_name: str = "llmrec", scratch_root: str | None = None) -> Engine:
    """Start the spec's engine. `scratch_root` must be reachable by the Spark server (a shared path
    on a cluster); by default a local temp folder, fine for sail and local."""
    global _live_connect_engines
    builders = {"sail": _sail, "remote": _remote}
    if spec.engine in builders:
        engine = builders[spec.engine](spec)
        _live_connect_engines += 1
    elif spec.engine == "local":
        engine = _local(spec, app_name)
    elif spec.engine == "cluster":
        engine = _cluster(spec, app_name)
    else:
        raise ValueError(f"spark.engine: unknown engine {spec.engine!r}")
    if scratch_root:
        shutil.rmtree(engine.scratch, ignore_errors=True)
        engine.scratch = f"{scratch_root.rstrip('/')}/{uuid.uuid4().hex}"
        engine._owns_scratch = not engine.scratch.startswith(("s3", "gs:", "abfs", "hdfs"))
    return engine


@contextmanager
def spark_engine(spec: SparkSpec, app_name: str = "llmrec", scratch_root: str | None = None) -> Iterator[Engine]:
    """`start_engine`, stopped when the block ends (also on an error)."""
    engine = start_engine(spec, app_name, scratch_root)
    try:
        yield engine
    finally:
        engine.stop()
