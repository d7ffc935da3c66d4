"""Deployment files that can fail on CPU: every YAML/JSON under infra/ parses, the committed KubeRay
manifests are exactly what `llmrec render k8s` makes of their spec (no drift), rendered manifests
carry the spec's workers, GPUs and storage, images are pinned and agree across files, entry points
import, ports agree, bad specs are refused, and shellcheck passes on every script."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.rayjob import JOB_MODULES
from jobs.render import PORTS, SHARED, SPEC_DIR, K8sOptions, render_k8s
from jobs.errors import SpecError
from jobs.spec import load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[1]
K8S_SPEC = "jobs/specs/movielens-1m-hllm-k8s.yaml"
IMAGE = "ghcr.io/llmrec/llmrec-gpu:0.1.0"


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_infra_yaml_and_json_parses():
    files = sorted(p for p in (ROOT / "infra").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 10
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert _docs(p), f"{p}: empty"


def test_committed_manifests_are_the_render_of_their_spec():
    rendered = render_k8s(load_spec(K8S_SPEC), K8sOptions(image=IMAGE))
    committed = {p.name: p.read_text() for p in (ROOT / "infra/k8s").glob("*.yaml")}
    assert committed == rendered, "infra/k8s drifted from its spec: llmrec render k8s --spec " + K8S_SPEC + " --out infra/k8s"


def test_rendered_manifests_follow_the_spec():
    spec = load_spec(K8S_SPEC, ["train.workers=3", "train.cpus_per_worker=6"])
    files = {name: yaml.safe_load(text) for name, text in render_k8s(spec, K8sOptions(image=IMAGE, max_workers=5)).items()}
    cluster = files["raycluster.yaml"]["spec"]
    [group] = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 5)
    [worker] = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"cpu": "6", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert group["rayStartParams"] == {"num-gpus": "1", "num-cpus": "6"}
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    head = cluster["headGroupSpec"]
    for pod, container in ((head["template"]["spec"], head["template"]["spec"]["containers"][0]),
                           (group["template"]["spec"], worker)):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[SHARED] == "shared" and mounts["/dev/shm"] == "dshm"
        assert spec.train.storage_path.startswith(SHARED) and spec.model.cache_dir.startswith(SHARED)
        assert {v["name"] for v in pod["volumes"]} >= {"shared", "dshm"}
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= set(env)  # every ${env:NAME} of the spec
        assert all("value" not in e or "secret" not in e["name"].lower() for e in container["env"])
    assert head["rayStartParams"]["dashboard-port"] == str(PORTS["dashboard"])
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} == set(PORTS.values())
    # the spec travels as a ConfigMap mounted on the head; it loads back to the same spec
    config = files["configmap.yaml"]
    assert validate_spec(yaml.safe_load(config["data"]["spec.yaml"])) == spec
    head_mounts = {m["mountPath"]: m["name"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert head_mounts[SPEC_DIR] == "spec"
    for job, module in JOB_MODULES.items():
        rj = files[f"rayjob-{job}.yaml"]["spec"]
        assert rj["clusterSelector"] == {"ray.io/cluster": spec.name}
        assert rj["entrypoint"] == f"python -m {module} --spec {SPEC_DIR}/spec.yaml"
        assert importlib.util.find_spec(module) is not None


def test_render_refuses_what_would_break_on_a_cluster():
    with pytest.raises(SpecError, match="train.storage_path=./.ray_results: must lie on the shared volume"):
        render_k8s(load_spec("movielens-1m-hllm-gpu"), K8sOptions(image=IMAGE))
    literal = load_spec(K8S_SPEC, ["lake.storage_options.AWS_SECRET_ACCESS_KEY=abc123"])
    with pytest.raises(SpecError, match="lake.storage_options.AWS_SECRET_ACCESS_KEY: credentials would be written"):
        render_k8s(literal, K8sOptions(image=IMAGE))
    for image in ("ghcr.io/llmrec/llmrec-gpu:latest", "ghcr.io/llmrec/llmrec-gpu"):
        with pytest.raises(SpecError, match="pinned tag or digest"):
            render_k8s(load_spec(K8S_SPEC), K8sOptions(image=image))
    out = subprocess.run([str(Path(sys.executable).parent / "llmrec"), "render", "k8s", "--spec", "movielens-1m-hllm-gpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "can't run on Kubernetes as it is" in out.stderr and "Traceback" not in out.stderr


def test_images_are_pinned_and_agree_across_files():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    images = set()
    for p in list((ROOT / "infra").rglob("*.yaml")):
        images |= set(re.findall(r"^\s*-?\s*image:\s*(\S+)", p.read_text(), re.M))
    ours = {f"ghcr.io/llmrec/llmrec-gpu:{version}", f"ghcr.io/llmrec/llmrec-cpu:{version}"}
    proxy = images - ours
    assert images >= ours and proxy == {"quay.io/oauth2-proxy/oauth2-proxy:v7.8.1"}, images  # a pinned release
    for dockerfile in (ROOT / "infra/docker").glob("Dockerfile*"):
        text = dockerfile.read_text()
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), base
        assert "USER llmrec" in text and "torch==${TORCH}" in text and "-c constraints.txt" in text
        from jobs.provenance import COMMIT_ENV  # an image has no .git: its commit comes in at build time
        assert f"ENV {COMMIT_ENV}=${{{COMMIT_ENV}}}" in text and f"--build-arg {COMMIT_ENV}=" in text
        for copied in re.findall(r"^COPY (\S+) \./", text, re.M):
            assert (ROOT / copied).exists(), copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".lake", ".checkpoints", ".ray_results", "mlruns", "mlflow.db"} <= set(ignored)
    launcher = yaml.safe_load((ROOT / "infra/ray/cluster-gpu.yaml").read_text())
    assert launcher["docker"]["image"] == f"ghcr.io/llmrec/llmrec-gpu:{version}"
    assert "--dashboard-port=8265" in " ".join(launcher["head_start_ray_commands"])


def test_dagster_and_mlflow_deployments_point_at_each_other():
    dagster = {(d["kind"], d["metadata"]["name"]): d for d in _docs(ROOT / "infra/dagster/k8s.yaml")}
    code = dagster["Deployment", "dagster-code"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in code["env"]}
    spec = load_spec(K8S_SPEC)
    assert env["LLMREC_RAY_ADDRESS"] == f"http://{spec.name}-head-svc.llmrec.svc:{PORTS['dashboard']}"
    assert env["MLFLOW_TRACKING_URI"] == spec.tracking.uri
    assert code["command"][-1] == "dagster_project.production" and importlib.util.find_spec("dagster_project.production")
    mlflow_svc = [d for d in _docs(ROOT / "infra/mlflow/mlflow.yaml") if d["kind"] == "Service"][0]
    assert f"@{mlflow_svc['metadata']['name']}.llmrec.svc:{mlflow_svc['spec']['ports'][0]['port']}" in spec.tracking.uri


def test_production_manifests_keep_the_ui_and_the_registry_behind_authentication():
    """No cluster here: the manifests are read. The Dagster webserver listens on its pod's loopback,
    reachable only through the OIDC proxy beside it, behind a ClusterIP Service and a NetworkPolicy
    admitting the proxy's port alone; nothing exposes it outside the cluster. MLflow's auth config is
    written at start from the Secret (no password in a ConfigMap), its user database a Postgres
    database from the Secret (persistent), never a file in the pod."""
    dagster = {(d["kind"], d["metadata"]["name"]): d for d in _docs(ROOT / "infra/dagster/k8s.yaml")}
    pod = dagster["Deployment", "dagster-webserver"]["spec"]["template"]["spec"]
    web, proxy = pod["containers"]
    assert web["command"][web["command"].index("-h") + 1] == "127.0.0.1" and "ports" not in web
    assert proxy["args"][:2] == ["--http-address=0.0.0.0:4180", "--upstream=http://127.0.0.1:3000"]
    assert {e["name"] for e in proxy["env"] if "secretKeyRef" in e["valueFrom"]} >= {"OAUTH2_PROXY_CLIENT_SECRET",
                                                                                       "OAUTH2_PROXY_COOKIE_SECRET"}
    service = dagster["Service", "dagster-webserver"]["spec"]
    assert service["type"] == "ClusterIP" and service["ports"][0]["targetPort"] == 4180
    policy = dagster["NetworkPolicy", "dagster-webserver"]["spec"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": 4180}]}]
    everything = [d for p in (ROOT / "infra").rglob("*.yaml") for d in _docs(p) if isinstance(d, dict)]
    assert not [d for d in everything if d.get("kind") == "Ingress" or
                (d.get("kind") == "Service" and d["spec"].get("type") in ("NodePort", "LoadBalancer"))]
    mlflow_docs = _docs(ROOT / "infra/mlflow/mlflow.yaml")
    assert not [d for d in mlflow_docs if d["kind"] == "ConfigMap"]  # the auth config is no ConfigMap
    container = next(d for d in mlflow_docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    assert "admin_password = %s" in script and '"$MLFLOW_TRACKING_PASSWORD"' in script and "umask 077" in script
    assert '"$MLFLOW_AUTH_DATABASE_URI"' in script and "sqlite" not in script
    assert {e["name"]: e["value"] for e in container["env"]}["MLFLOW_AUTH_CONFIG_PATH"].startswith("/run/mlflow/")


def test_shellcheck_passes_on_every_script():
    assert shutil.which("shellcheck"), "shellcheck missing: `make install` installs Debian's"
    # the project's scripts: tracked or to be committed (not what git ignores: venvs, logs, scratch)
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.sh", ".ci/*"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    scripts = sorted(str(ROOT / p) for p in listed if p.endswith(".sh") or p.startswith(".ci/"))
    assert scripts
    done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_spark_driver_is_reachable_on_a_cluster_and_private_locally():
    from jobs.schema import SparkSpec
    from spark.session import driver_addresses
    assert driver_addresses(SparkSpec(engine="local", driver_host="10.0.0.5")) == {
        "spark.driver.bindAddress": "127.0.0.1", "spark.driver.host": "127.0.0.1"}
    assert driver_addresses(SparkSpec(engine="cluster", master="spark://m:7077")) == {}
    assert driver_addresses(SparkSpec(engine="cluster", master="spark://m:7077", driver_host="driver.llmrec.svc",
                                      driver_bind_address="0.0.0.0")) == {
        "spark.driver.host": "driver.llmrec.svc", "spark.driver.bindAddress": "0.0.0.0"}


@pytest.mark.slow
def test_the_images_requirement_set_resolves(tmp_path):
    """What the images install after torch (`pip install -c constraints.txt .` in both Dockerfiles)
    resolves with pip's own resolver (`--dry-run`: nothing is installed), torch held at the pin;
    a conflict in pyproject's pins fails here, not in an image build. (The project's metadata is built
    with this environment's setuptools, not in a fresh build environment: the resolution is the same,
    at a third less CPU.)"""
    dockerfiles = [(ROOT / f"infra/docker/Dockerfile.{k}").read_text() for k in ("gpu", "cpu")]
    assert all("pip install -c constraints.txt ." in d for d in dockerfiles)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--no-build-isolation", "--report", str(report), "-c", "constraints.txt", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    pin = next(line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines()
               if line.startswith("torch=="))
    assert resolved["torch"].split("+")[0] == pin
    for name in ("ray", "deepspeed", "dagster", "mlflow", "pyspark", "deltalake", "dagster-ray"):
        assert name in resolved, name
