"""Is a registered model data only? The checks `llmrec verify-model` runs on a downloaded model folder
before anyone calls `mlflow.pyfunc.load_model` on it: `MLmodel` must name this project's loader
(`ray_jobs.serving`, or `ray_jobs.tracking` for models registered before it moved) as its pyfunc
`loader_module` and nothing that carries code (a `python_model`,
cloudpickle), and every file must be data of a kind we read as data — the checkpoint with
`torch.load(weights_only=True)`, Parquet, safetensors, and MLmodel's own text files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

LOADERS = ("ray_jobs.serving", "ray_jobs.tracking")  # `serving.LOADER_MODULE` and the earlier one; kept in step by a test
TEXT_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "registered_model_meta",
              "input_example.json", "serving_input_example.json"}


@dataclass
class Finding:
    path: str
    ok: bool
    what: str


def verify_model_folder(folder: str) -> list[Finding]:
    """One finding per file (and one for MLmodel's loader)."""
    findings: list[Finding] = []
    mlmodel = os.path.join(folder, "MLmodel")
    if not os.path.isfile(mlmodel):
        return [Finding("MLmodel", False, "missing: not an MLflow model folder")]
    findings.append(_loader(mlmodel))
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            findings.append(_file(os.path.relpath(path, folder), path))
    return findings


def _loader(path: str) -> Finding:
    try:
        doc = yaml.safe_load(open(path)) or {}
    except yaml.YAMLError as exc:
        return Finding("MLmodel", False, f"not YAML: {exc}")
    pyfunc = (doc.get("flavors") or {}).get("python_function") or {}
    loader = pyfunc.get("loader_module")
    code = [k for k in ("python_model", "cloudpickle_version", "code") if pyfunc.get(k)]
    if loader not in LOADERS:
        return Finding("MLmodel", False, f"pyfunc loader_module is {loader!r}, not one of {', '.join(LOADERS)}")
    if code or set(doc.get("flavors") or {}) - {"python_function"}:
        return Finding("MLmodel", False, f"carries code or other flavors: {code or sorted(doc['flavors'])}")
    return Finding("MLmodel", True, f"loader_module {loader}, no code")


def _file(rel: str, path: str) -> Finding:
    name = os.path.basename(rel)
    if os.path.islink(path):
        return Finding(rel, False, "a symbolic link")
    if name in TEXT_FILES or name.endswith((".yaml", ".yml", ".txt")) and "/" not in rel.replace(os.sep, "/"):
        return Finding(rel, True, "MLflow metadata text")
    if name == "model.pt":
        from ray_jobs.checkpoint import read_model
        try:
            ckpt = read_model(path)
        except ValueError as exc:
            return Finding(rel, False, str(exc))
        return Finding(rel, True, f"checkpoint of tensors and values ({ckpt.spec.model.kind}, {ckpt.num_items} items)")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for a file that is not Parquet
            return Finding(rel, False, f"not Parquet: {exc}")
        return Finding(rel, True, f"Parquet, {rows} rows")
    if name.endswith(".safetensors"):
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as exc:
            return Finding(rel, False, f"not safetensors: {exc}")
        return Finding(rel, True, f"safetensors, {len([k for k in header if k != '__metadata__'])} tensors")
    if name.endswith(".json"):
        try:
            json.load(open(path))
        except ValueError as exc:
            return Finding(rel, False, f"not JSON: {exc}")
        return Finding(rel, True, "JSON")
    return Finding(rel, False, "not a kind of data this model ships (code or pickle could hide here)")
