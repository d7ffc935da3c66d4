"""Where a model is: the model file a Ray run ships, and `models:/NAME@alias` resolved to one
registry version and downloaded beside the runs."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from jobs.schema import JobSpec

from jobs.spec import absolute_paths, tracking_uri


def run_dir(spec: JobSpec, run_name: str) -> str:
    return os.path.join(absolute_paths(spec).train.storage_path, run_name)


def model_file(spec: JobSpec, run_name: str | None = None) -> str:
    """The model a Ray run ships: `<train.storage_path>/<run>/model.pt`."""
    return os.path.join(run_dir(spec, run_name or spec.name), "model.pt")


def check_storage_path(spec: JobSpec) -> None:
    """Fail before training, not after it: the final model.pt is written and read with local file I/O."""
    if "://" in spec.train.storage_path:
        raise ValueError(f"train.storage_path={spec.train.storage_path!r}: the final model.pt is written and read "
                         "with local file I/O; use a path every node mounts (NFS, a FUSE-mounted bucket)")


# ----------------------------------------------------------------------------- models from the registry

@dataclass
class ResolvedModel:
    path: str                # a local model.pt
    cache_dir: str | None    # a cached-mode HLLM's shipped item-embedding folder, if any
    label: str               # what the user named: a models:/ URI or the file
    name: str                # registered model name (or the spec's)
    version: str             # registry version, or file:<path>

    @property
    def pinned(self) -> str:
        """The model as a reference that can't move: `models:/NAME/VERSION` (an alias resolved), or the
        file with its content's digest (`PATH@sha256:HEX`, which `resolve_model` checks)."""
        if self.version.startswith("file:"):
            return f"{self.path}{PIN}{file_digest(self.path)}"
        return f"models:/{self.name}/{self.version}"


PIN = "@sha256:"


def file_digest(path: str) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


_downloads: list[str] = []  # registry downloads of this process, removed when it exits


def _remove_downloads() -> None:
    import shutil
    for folder in _downloads:
        shutil.rmtree(folder, ignore_errors=True)


def resolve_model(spec: JobSpec, ref: str | None = None) -> ResolvedModel:
    """A model to load, from `models:/NAME@alias` or `models:/NAME/VERSION`, a checkpoint file (or
    `PATH@sha256:HEX`, refused if the file's content changed), or by default the training run's
    `model.pt`. An alias is resolved to its version first and that version is downloaded (an alias
    moved meanwhile can't mix two versions), into
    `<train.storage_path>/_registry/` (every node of a cluster mounts it: workers read the file too);
    the download is removed when this process exits."""
    if ref and ref.startswith("models:/"):
        import atexit

        import mlflow
        uri = tracking_uri(spec)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        name, _, alias = ref.removeprefix("models:/").partition("@")
        if alias:
            version = str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        else:
            name, _, version = name.partition("/")
        folder = os.path.join(absolute_paths(spec).train.storage_path, "_registry")
        os.makedirs(folder, exist_ok=True)
        target = tempfile.mkdtemp(prefix="model-", dir=folder)
        if not _downloads:
            atexit.register(_remove_downloads)
        _downloads.append(target)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=target)
        files = {f: os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs}
        if "model.pt" not in files:
            raise FileNotFoundError(f"{ref}: no model.pt checkpoint inside the registered model")
        data = os.path.dirname(files["model.pt"])
        shipped_cache = any(e.startswith("items-") for e in os.listdir(data))
        return ResolvedModel(files["model.pt"], data if shipped_cache else None, ref, name, version)
    path, _, digest = (ref or model_file(spec)).partition(PIN)
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained model at {path}: train first (llmrec train) or name a checkpoint "
                                "file or models:/NAME@alias")
    if digest and (now := file_digest(path)) != digest:
        raise ValueError(f"{ref}: the file changed since it was pinned (its sha256 now begins {now})")
    return ResolvedModel(path, None, path, spec.registered_model_name(), f"file:{path}")
