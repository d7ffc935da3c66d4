"""Kubernetes manifests rendered from a job spec (`llmrec render k8s`): a ConfigMap holding the
resolved spec, a KubeRay `RayCluster` sized by the spec (worker count, GPUs and CPUs per worker,
shared storage for Ray Train checkpoints and the item-embedding cache, /dev/shm for DeepSpeed and
NCCL) and one `RayJob` per entry point (train, align, evaluate, recommend) running the same
`python -m ray_jobs.<job>` against that cluster. Manifests come from the spec, so they never drift
from it; credentials stay in a Kubernetes Secret and reach the pods as environment variables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from jobs.rayjob import JOB_MODULES, job_command_line
from jobs.secrets import env_references, literal_credentials
from jobs.errors import SpecError
from jobs.schema import JobSpec
from jobs.spec import dump_spec

SPEC_DIR = "/etc/llmrec"  # where the ConfigMap's spec.yaml is mounted on the head
SHARED = "/mnt/shared"   # where the shared volume is mounted on every pod
PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
_PINNED_TAG = re.compile(r"^[^\s:@]+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")


@dataclass
class K8sOptions:
    image: str
    namespace: str = "llmrec"
    shared_claim: str = "llmrec-shared"      # a ReadWriteMany PersistentVolumeClaim mounted at SHARED
    credentials_secret: str = "llmrec-credentials"  # holds every ${env:NAME} the spec names, and RAY_AUTH_TOKEN
    shm_size: str = "16Gi"
    worker_memory: str = "64Gi"
    head_cpus: int = 4
    head_memory: str = "16Gi"
    max_workers: int | None = None          # autoscaling bound (default: the spec's worker count)


def check_image(image: str) -> None:
    """An image pinned by tag or digest; `latest` or no tag is refused (a rollout would change code)."""
    if not _PINNED_TAG.match(image) or image.endswith(":latest"):
        raise SpecError(f"--image {image}: name the image with a pinned tag or digest (not latest), "
                        f"e.g. ghcr.io/acme/llmrec-gpu:0.1.0")


def check_cluster_spec(spec: JobSpec) -> None:
    """What a multi-pod run needs: shared or object-store paths, a tracking server, no literal secrets."""
    problems = []
    for key, value in (("train.storage_path", spec.train.storage_path), ("model.cache_dir", spec.model.cache_dir),
                       ("train.checkpoint_dir", spec.train.checkpoint_dir)):
        if "://" not in value and not value.startswith(SHARED + "/"):
            problems.append(f"{key}={value}: must lie on the shared volume ({SHARED}/...) that every pod mounts")
    if "://" not in spec.lake.root and not spec.lake.root.startswith(SHARED + "/"):
        problems.append(f"lake.root={spec.lake.root}: an object store (s3://, gs://, abfss://) or {SHARED}/...")
    if not spec.tracking.uri or spec.tracking.uri.startswith("sqlite:"):
        problems.append("tracking.uri: a tracking server (http(s)://...) that every pod reaches")
    literal = literal_credentials(spec)
    if literal:
        problems.append(f"{', '.join(literal)}: credentials would be written into a ConfigMap; "
                        f"write them as ${{env:NAME}} and put NAME in the Secret")
    if problems:
        raise SpecError(f"spec {spec.name} can't run on Kubernetes as it is:\n  " + "\n  ".join(problems))


def _env(spec: JobSpec, opts: K8sOptions) -> list[dict]:
    """Every pod: token auth for Ray, the spec's credentials from the Secret, DeepSpeed's accelerator."""
    secret = opts.credentials_secret
    env = [{"name": "RAY_AUTH_MODE", "value": "token"},
           {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "RAY_AUTH_TOKEN"}}},
           {"name": "DS_ACCELERATOR", "value": "cuda" if spec.train.use_gpu else "cpu"}]
    env += [{"name": n, "valueFrom": {"secretKeyRef": {"name": secret, "key": n}}} for n in sorted(env_references(spec))]
    return env


def _volumes(spec: JobSpec, opts: K8sOptions, with_spec: bool) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": opts.shared_claim}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}]
    mounts = [{"name": "shared", "mountPath": SHARED}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if with_spec:
        volumes.append({"name": "spec", "configMap": {"name": f"{spec.name}-spec"}})
        mounts.append({"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})
    return volumes, mounts


def ray_cluster(spec: JobSpec, opts: K8sOptions) -> dict:
    t = spec.train
    env = _env(spec, opts)
    head_volumes, head_mounts = _volumes(spec, opts, with_spec=True)
    worker_volumes, worker_mounts = _volumes(spec, opts, with_spec=False)
    worker_resources = {"cpu": f"{t.cpus_per_worker:g}", "memory": opts.worker_memory}
    if t.use_gpu:
        worker_resources["nvidia.com/gpu"] = "1"
    security = {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0", "num-cpus": "0",
                           "port": str(PORTS["gcs"]), "dashboard-port": str(PORTS["dashboard"]),
                           "ray-client-server-port": str(PORTS["client"]), "metrics-export-port": str(PORTS["metrics"])},
        "template": {"spec": {
            "securityContext": security,
            "containers": [{"name": "ray-head", "image": opts.image, "env": env,
                            "ports": [{"name": k, "containerPort": v} for k, v in PORTS.items()],
                            "resources": {"requests": {"cpu": str(opts.head_cpus), "memory": opts.head_memory},
                                          "limits": {"cpu": str(opts.head_cpus), "memory": opts.head_memory}},
                            "volumeMounts": head_mounts}],
            "volumes": head_volumes}},
    }
    worker_pod: dict = {
        "securityContext": security,
        "containers": [{"name": "ray-worker", "image": opts.image, "env": env,
                        "resources": {"requests": dict(worker_resources), "limits": dict(worker_resources)},
                        "volumeMounts": worker_mounts}],
        "volumes": worker_volumes}
    if t.use_gpu:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    group = {"groupName": "gpu-workers" if t.use_gpu else "cpu-workers", "replicas": t.workers,
             "minReplicas": t.workers, "maxReplicas": max(opts.max_workers or t.workers, t.workers),
             "rayStartParams": {"num-gpus": "1" if t.use_gpu else "0", "num-cpus": f"{t.cpus_per_worker:g}"},
             "template": {"spec": worker_pod}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": spec.name, "namespace": opts.namespace, "labels": {"app.kubernetes.io/part-of": "llmrec"}},
            "spec": {"rayVersion": _ray_version(), "enableInTreeAutoscaling": True,
                     "headGroupSpec": head, "workerGroupSpecs": [group]}}


def ray_job(spec: JobSpec, job: str, opts: K8sOptions) -> dict:
    """A RayJob that runs `python -m ray_jobs.<job>` with the mounted spec on the spec's RayCluster
    (kept running between jobs); the submitter pod carries the token to reach the Jobs API."""
    entry = job_command_line(job, f"{SPEC_DIR}/spec.yaml")
    submitter = {"spec": {"restartPolicy": "Never", "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                          "containers": [{"name": "submitter", "image": opts.image, "env": _env(spec, opts)[:2]}]}}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"{spec.name}-{job}", "namespace": opts.namespace,
                         "labels": {"app.kubernetes.io/part-of": "llmrec", "llmrec/job": job}},
            "spec": {"entrypoint": entry, "clusterSelector": {"ray.io/cluster": spec.name},
                     "submissionMode": "K8sJobMode", "submitterPodTemplate": submitter,
                     "backoffLimit": 0, "shutdownAfterJobFinishes": False}}


def ray_job_with_cluster(spec: JobSpec, job: str, opts: K8sOptions, name: str, entrypoint: str) -> dict:
    """A RayJob that brings its own RayCluster (the spec's, as `ray_cluster` renders it, with the
    spec ConfigMap mounted on the head) and deletes it when the job ends: what Dagster's KubeRay
    launcher creates for each model asset (dagster-ray's PipesKubeRayJobClient adds the Pipes
    environment and follows the job)."""
    check_image(opts.image)
    check_cluster_spec(spec)
    doc = ray_job(spec, job, opts)
    del doc["spec"]["clusterSelector"]
    doc["metadata"]["name"] = name
    doc["spec"].update(entrypoint=entrypoint, rayClusterSpec=ray_cluster(spec, opts)["spec"],
                       shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600)
    return doc


def config_map(spec: JobSpec, opts: K8sOptions) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{spec.name}-spec", "namespace": opts.namespace,
                         "labels": {"app.kubernetes.io/part-of": "llmrec"}},
            "data": {"spec.yaml": dump_spec(spec)}}


def render_k8s(spec: JobSpec, opts: K8sOptions) -> dict[str, str]:
    """File name -> YAML text: `configmap.yaml`, `raycluster.yaml`, `rayjob-<job>.yaml` per entry point."""
    check_image(opts.image)
    check_cluster_spec(spec)
    docs = {"configmap.yaml": config_map(spec, opts), "raycluster.yaml": ray_cluster(spec, opts)}
    docs |= {f"rayjob-{job}.yaml": ray_job(spec, job, opts) for job in JOB_MODULES}
    header = f"# rendered by `llmrec render k8s --spec {spec.name}`: edit the spec, not this file\n"
    return {name: header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False) for name, doc in docs.items()}


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people: no anchors for repeated blocks, multi-line strings as literal blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _ray_version() -> str:
    from importlib.metadata import version
    return version("ray")
