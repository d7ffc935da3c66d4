"""Dagster resources, each chosen per deployment by config (never by editing code): the job spec, the
Ray cluster the model assets' jobs run on, and the MLflow store the champion gate reads and writes."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from jobs.render import SPEC_DIR, K8sOptions, ray_job_with_cluster
from jobs.rayjob import PROJECT, client_token_auth, job_runtime_env, project_spec_path, submit_when_ready
from jobs.schema import JobSpec
from jobs.spec import load_spec, local_overrides

ROOT = PROJECT


class SpecResource(ConfigurableResource):
    """Which spec the assets build, plus `--set`-style overrides (e.g. `spark.engine=remote`)."""

    spec_path: str = Field("jobs/specs/movielens-1m.yaml", description="spec YAML path or name under jobs/specs")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as with --set")

    def load(self, *extra: str) -> JobSpec:
        return load_spec(self.spec_path, [*self.overrides, *extra])

    def job_spec_path(self) -> str:
        """The spec as a path inside the project: a submitted job runs in an uploaded copy of it."""
        return project_spec_path(self.spec_path)


class SparkResource(ConfigurableResource):
    """The Spark engine the data assets run on, over the spec's `spark` section: unset fields keep the
    spec's (the embedded Sail server by default); `remote` with a Spark Connect URL, `cluster` with
    delta-spark on a master (see the README's cluster guide)."""

    engine: str | None = Field(None, description="sail | local | remote | cluster")
    remote: str | None = Field(None, description="Spark Connect URL for engine=remote (sc://host:15002)")
    master: str | None = Field(None, description="JVM master for engine=local/cluster")

    def spec_overrides(self) -> list[str]:
        return [f"spark.{k}={v}" for k, v in (("engine", self.engine), ("remote", self.remote),
                                               ("master", self.master)) if v]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayResource(ConfigurableResource):
    """Where the model assets' Ray jobs run, chosen by `launcher`:
    - `jobs_api` (default): Ray's Jobs API through dagster-ray's PipesRayJobClient. `address`: a Ray
      cluster's dashboard, e.g. http://ray-head:8265; unset: a head started for the run on 127.0.0.1
      with token auth and free ports (infra/local/ray-up.sh), stopped with its processes at the end.
    - `kuberay`: each job a KubeRay RayJob with its own RayCluster rendered from the spec
      (`jobs.render.ray_job_with_cluster`: workers, GPUs, CPUs, shared storage as `llmrec render k8s`
      writes them), through dagster-ray's PipesKubeRayJobClient, in `namespace`, from `image`; the
      job reads the spec from the ConfigMap `llmrec render k8s` wrote for the same spec, with the
      asset's overrides on its command line."""

    launcher: Literal["jobs_api", "kuberay"] = Field("jobs_api", description="jobs_api | kuberay")
    address: str | None = Field(None, description="jobs_api: Ray dashboard address; unset = a local head for the run")
    num_cpus: int | None = Field(None, description="jobs_api: CPUs of the local head (default: all)")
    image: str | None = Field(None, description="kuberay: the pinned image of the Ray pods (infra/docker/Dockerfile.gpu)")
    namespace: str = Field("llmrec", description="kuberay: namespace of the RayJobs (and the spec ConfigMap)")
    kube_api: str | None = Field(None, description="kuberay: Kubernetes API URL (e.g. a `kubectl proxy`); unset = "
                                 "the in-cluster service account or ~/.kube/config")
    port_forward: bool = Field(False, description="kuberay: reach each job's dashboard by port-forwarding "
                               "(Dagster outside the cluster)")
    _local_address: str | None = PrivateAttr(None)

    @contextmanager
    def yield_for_execution(self, context: InitResourceContext) -> Iterator["RayResource"]:
        if self.launcher == "kuberay" and not self.image:
            raise ValueError("RayResource(launcher='kuberay') needs `image`: the pinned image of the Ray pods")
        if self.address or self.launcher == "kuberay":
            yield self
            return
        head_dir = tempfile.mkdtemp(prefix="llmrec-ray-")  # private (0700); short: Ray's socket paths live under it
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY": f"{bin_dir}/ray",
               "RAY_PORT": str(_free_port()), "RAY_DASHBOARD_PORT": str(_free_port()),
               "RAY_AGENT_PORT": str(_free_port()), "RAY_CLIENT_PORT": str(_free_port()), "RAY_HEAD_DIR": head_dir}
        if self.num_cpus:
            env["RAY_NUM_CPUS"] = str(self.num_cpus)
        up = subprocess.run([str(ROOT / "infra/local/ray-up.sh")], env=env, capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            raise RuntimeError(f"local Ray head did not start: {up.stderr[-2000:]}")
        client_token_auth()  # the head requires the token ray-up.sh made; the Jobs API client reads the mode
        self._local_address = up.stdout.strip().splitlines()[-1]
        context.log.info(f"local Ray head at {self._local_address} (temp dir {head_dir})")
        try:
            _wait_for_job_agent(self._local_address)
            yield self
        finally:
            subprocess.run([str(ROOT / "infra/local/ray-down.sh")], env=env, capture_output=True, timeout=120)
            shutil.rmtree(head_dir, ignore_errors=True)
            self._local_address = None

    @property
    def dashboard(self) -> str:
        address = self.address or self._local_address
        if not address:
            raise RuntimeError("RayResource used outside a run: no address and no local head")
        return address

    def spec_overrides(self, spec: JobSpec) -> list[str]:
        """A job on a head of this machine runs in an uploaded copy of the project: relative local
        paths (lake, caches, checkpoints, Ray storage, sqlite tracking store) go absolute."""
        return [] if self.address or self.launcher == "kuberay" else local_overrides(spec)

    def job_spec_path(self, spec: SpecResource) -> str:
        """The `--spec` argument of a job: the project's spec file (uploaded with the job), or on
        KubeRay the ConfigMap's copy mounted on the head."""
        return f"{SPEC_DIR}/spec.yaml" if self.launcher == "kuberay" else spec.job_spec_path()

    def run(self, context, job: str, spec: JobSpec, entrypoint: list[str]):
        """Run `entrypoint` (`jobs.rayjob.job_command`) as a Ray job through Dagster Pipes."""
        if self.launcher == "kuberay":
            from dagster_ray.kuberay import PipesKubeRayJobClient
            from dagster_ray.kuberay.client import RayJobClient
            api = None
            if self.kube_api:
                from kubernetes import client as k8s
                cfg = k8s.Configuration()
                cfg.host = self.kube_api
                api = k8s.ApiClient(cfg)
            manifest = ray_job_with_cluster(spec, job, K8sOptions(image=self.image, namespace=self.namespace),
                                            f"{spec.name}-{job}-{context.run_id[:8]}", shlex.join(entrypoint))
            client = PipesKubeRayJobClient(client=RayJobClient(api_client=api), port_forward=self.port_forward,
                                           poll_interval=2)
            return client.run(context=context, ray_job=manifest)
        from dagster_ray import PipesRayJobClient
        return PipesRayJobClient(address=self.dashboard, poll_interval=2).run(context=context, submit_job_params={
            "entrypoint": shlex.join(entrypoint), "runtime_env": job_runtime_env(spec)})


def _wait_for_job_agent(address: str) -> None:
    """A fresh head answers its dashboard before its job agent runs: a no-op job, submitted once an
    agent takes it, and waited for."""
    import time

    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(address)
    job = submit_when_ready(client, attempts=60, entrypoint="true")
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.5)


class MLflowResource(ConfigurableResource):
    """The MLflow tracking store and model registry (unset: the spec's, else $MLFLOW_TRACKING_URI,
    else sqlite:///mlflow.db in the project)."""

    tracking_uri: str | None = Field(None, description="e.g. http://mlflow:5000 or sqlite:////abs/mlflow.db; "
                                     "a URI with a token as ${env:NAME} (read where it is used, never on a command line)")

    def spec_overrides(self) -> list[str]:
        return [f"tracking.uri={self.tracking_uri}"] if self.tracking_uri else []

    def client(self, spec: JobSpec):
        from mlflow import MlflowClient

        from jobs.secrets import from_env
        from jobs.spec import tracking_uri
        uri = from_env(self.tracking_uri, "MLflowResource.tracking_uri") if self.tracking_uri else tracking_uri(spec)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
