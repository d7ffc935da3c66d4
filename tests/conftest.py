"""Shared fixtures: real Spark engines (one live at a time), specs over tmp lakes, small fixture files,
one MovieLens-100K lake and one local Ray for every test that needs them."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

# The pytest-xdist workers (`make test`) and the Ray workers, servers and JVMs they start share two
# cores: OpenMP threads that spin while they wait for work burn the core the other process needs
# (a torch-heavy test ran 6x slower beside another). Waiting threads sleep instead; every process
# the tests start inherits this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from jobs.rayjob import local_token_auth  # noqa: E402

local_token_auth()  # before anything imports ray: the session's local Ray and heads ask for one token

from jobs.schema import JobSpec

from jobs.spec import load_spec, validate_spec  # noqa: E402
from spark.session import Engine, start_engine  # noqa: E402

SMOKE = "jobs/specs/movielens-100k-smoke.yaml"
ROOT = Path(__file__).resolve().parents[1]

ENGINES = ["sail", "local"]
# The tests' JVM runs many small queries and lives minutes: C2 compilation and a parallel collector
# cost more CPU than they save there (the 16 JVM tests on their own: 255 core-seconds with the JVM's
# defaults, 216-224 with these, on the 2-core machine)
JVM_TEST_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


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
            doc = _spec_doc("x", engine=name)
            if name == "local":
                doc["spark"]["conf"] = {"spark.driver.extraJavaOptions": JVM_TEST_OPTIONS}
            self.current = start_engine(validate_spec(doc).spark)
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


# what makes a test slow without a mark of its own: the shared lake (a Spark ETL), a Ray cluster, a
# server process, the day-0 models of test_grown_catalogue
SLOW_FIXTURES = {"ml100k_lake", "local_ray", "local_server", "ray_overrides", "grown"}


def unit_of(nodeid: str) -> str:
    """The unit a test is scheduled in under pytest-xdist (`make test`): "jvm" for a test on the JVM Spark
    engine (a worker starts the JVM once; `JVM_IN_PROCESS` names those without an engine parameter),
    else its module (a module-scoped fixture — a Ray head, day-0 models — is built once, on the worker
    that runs the module) or, for a module in `SECOND_HALF`, one of its two halves."""
    path, _, name = nodeid.partition("::")
    params = name[name.index("[") + 1:-1].split("-") if name.endswith("]") else []
    if "local" in params or name in JVM_IN_PROCESS:
        return "jvm"
    module = Path(path).stem
    return f"{module}-2" if name in SECOND_HALF.get(module, ()) else module


# tests that run the JVM engine in process without an engine parameter
JVM_IN_PROCESS = {"test_engines_build_identical_tables"}


# modules long enough to hold up the whole suite on one worker, run as two units (each worker that
# runs one starts the module's fixtures, e.g. a local Ray, ~10 s): these tests form the second
SECOND_HALF = {"test_distributed": {"test_zero2_two_workers_match_single_process",
                                    "test_alignment_raises_training_reward_within_kl_and_resumes",
                                    "test_a_failed_run_is_marked_failed_in_mlflow"}}


# the longest units, started first (--no-loadscope-reorder keeps this order), so that no long unit
# is left to run alone at the end
FIRST = ["test_dagster", "test_distributed", "test_distributed-2", "jvm", "test_submit", "test_grown_catalogue"]


def cpu_probe(seconds: float = 1.0) -> float:
    """A fixed single-core workload (a pure-Python loop of 10,000 integer additions) per second: the
    machine's speed at the start of a run, so that suite times from runs on different days can be
    told apart from a slower or busier machine. A figure, never asserted."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        total = 0
        for i in range(10_000):
            total += i
        n += 1
    return n / seconds


def pytest_sessionstart(session):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller only, before any worker starts
        session.config.stash[PROBE] = cpu_probe()


def pytest_terminal_summary(terminalreporter, config):
    if PROBE in config.stash:
        terminalreporter.write_line(f"CPU probe at the start: {config.stash[PROBE]:,.0f} loops of 10,000 additions a "
                                    "second on one core (tests/conftest.py cpu_probe)")


PROBE = pytest.StashKey[float]()


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by scope, the scope being `unit_of` (its own `loadgroup` renames
    node ids through an attribute pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)
    return ByUnit(config, log)


def pytest_collection_modifyitems(items):
    """Mark JVM-engine tests and tests on slow fixtures `slow` (`make test-fast` leaves them out);
    tests run in their scheduling units (`unit_of`, the one order a plain run and xdist share: the
    JVM tests together, so the JVM starts once), the longest units first."""
    for item in items:
        jvm = unit_of(item.nodeid) == "jvm" or item.get_closest_marker("jvm") is not None
        if jvm or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: FIRST.index(unit_of(item.nodeid)) if unit_of(item.nodeid) in FIRST else len(FIRST))


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


@pytest.fixture(scope="session")
def ml100k_lake(tmp_path_factory, engines) -> Path:
    """A lake with the smoke spec's MovieLens-100K tables (943 users, 1,349 items), built once."""
    from spark.etl import run_etl
    root = tmp_path_factory.mktemp("ml100k-lake")
    run_etl(load_spec(SMOKE, [f"lake.root={root}"]), engines.get("sail"))
    return root


@pytest.fixture(scope="session")
def ml100k_item_embeddings(ml100k_lake, tmp_path_factory) -> Path:
    """An item-embedding cache holding MiniLM's embeddings of the ML-100K items (what HLLM's cached
    mode reads and the diversity metrics are measured in), computed once per run: under pytest-xdist
    the first worker to ask computes it, the other waits for it. Copied by `copy_item_embeddings`."""
    from filelock import FileLock

    from ray_jobs.data import read_catalogue
    from ray_jobs.models.llm import minilm_item_embeddings
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ml100k-item-embeddings"
    with FileLock(f"{shared}.lock"):
        if not (shared / "complete").exists():
            spec = load_spec(SMOKE, [f"lake.root={ml100k_lake}", f"model.cache_dir={shared}"])
            minilm_item_embeddings(spec.model, read_catalogue(spec, None).item_text)
            (shared / "complete").touch()
    return shared


def copy_item_embeddings(folder: Path, ml100k_item_embeddings: Path) -> Path:
    """`folder` as an item-embedding cache of its own that starts with the ML-100K items' MiniLM
    embeddings (a job embeds only texts it lacks: a landed day's new items)."""
    shutil.copytree(ml100k_item_embeddings, folder, ignore=shutil.ignore_patterns("complete", ".lock"))
    return folder


@pytest.fixture
def warm_cache(tmp_path, ml100k_item_embeddings) -> Path:
    """`tmp_path / "cache"`, a test's own item-embedding cache, warm with the ML-100K items."""
    return copy_item_embeddings(tmp_path / "cache", ml100k_item_embeddings)


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray for the tests of one module that run Ray jobs in this process, shut
    down when the module's tests end: the driver's core worker exits the whole process if its local
    cluster goes away, so it never outlives the tests that need it."""
    import ray

    from ray_jobs.runtime import start_local_ray
    # the runs here last seconds: sample system metrics often enough to see some
    start_local_ray(2, {"DS_ACCELERATOR": "cpu", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"})
    yield
    ray.shutdown()


def head_env(num_cpus: int, **extra: str) -> dict:
    """The environment of infra/local/ray-up.sh for a head of its own: free ports (the in-process Ray
    of `local_ray` holds the default agent and client ports) and a private (0700, unpredictable) temp
    dir directly under /tmp (Ray's socket paths must stay short)."""
    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_PORT": str(port()),
            "RAY_DASHBOARD_PORT": str(port()), "RAY_AGENT_PORT": str(port()), "RAY_CLIENT_PORT": str(port()),
            "RAY_NUM_CPUS": str(num_cpus), "RAY_HEAD_DIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp"), **extra}


@pytest.fixture(scope="module")
def ray_head():
    """One local head (infra/local/ray-up.sh, 127.0.0.1, 2 CPUs, stopped by its process group) for the
    tests of a module that submit to it; each tells its own jobs apart. Its environment carries a
    credential the jobs may read (`${env:LLMREC_TEST_TOKEN}` in a spec), a canary no output may show."""
    env = head_env(2, LLMREC_TEST_TOKEN=f"canary-{uuid.uuid4().hex}")
    up = subprocess.run([str(ROOT / "infra/local/ray-up.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    yield up.stdout.strip().splitlines()[-1], env
    subprocess.run([str(ROOT / "infra/local/ray-down.sh")], env=env, capture_output=True, timeout=120)


@pytest.fixture
def free_port():
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick


@pytest.fixture
def ray_overrides(ml100k_lake, ml100k_item_embeddings):
    """`--set` overrides of a small run (SASRec unless `extra` names another model.kind) on the shared
    lake, its checkpoints, Ray storage, MLflow store and item-embedding cache under `tmp` (the cache
    warm with the ML-100K items' MiniLM embeddings, which every evaluation's ILD reads: a job
    submitted to a head would otherwise embed them all again in its own working directory)."""
    def make(tmp: Path, name: str, *extra: str) -> list[str]:
        kind = next((e.split("=", 1)[1] for e in extra if e.startswith("model.kind=")), "sasrec")
        shape = ["model.dim=32", "model.dropout=0.0"] if kind in ("sasrec", "hstu") else []
        cache = tmp / "item-cache"
        if not cache.exists():
            copy_item_embeddings(cache, ml100k_item_embeddings)
        return [f"name={name}", f"lake.root={ml100k_lake}", f"train.checkpoint_dir={tmp}/ckpt",
                f"train.storage_path={tmp}/ray", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"model.kind={kind}",
                f"model.cache_dir={cache}", *shape, "train.batch_size=128", "train.negatives=128", "train.lr=0.003",
                "train.eval_every=1", "train.workers=2", "train.max_failures=0", *extra]
    return make


@pytest.fixture
def local_server(tmp_path):
    """Start a server process (its own session, output to a log), wait until `health` answers over
    HTTP, and stop its whole process group when the test ends."""
    procs = []

    def start(cmd: list[str], health: str, env: dict, cwd: Path | None = None, attempts: int = 240) -> None:
        log = tmp_path / f"server-{len(procs)}.log"
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        for _ in range(attempts):
            try:
                urllib.request.urlopen(health, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"{cmd[0]} did not answer {health}: {log.read_text()[-3000:]}")

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
