"""Loading a job spec: YAML files (a spec may build on a `base:` spec), `--set a.b=value` overrides,
validation against `jobs.schema` with one-line errors, and the paths a job derives from its spec."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.errors import SpecError
from jobs.schema import MODEL_KINDS, JobSpec, model_fields_of
from jobs.secrets import from_env, mask_uri, public_doc, remember_spec_secrets

SPECS_DIR = Path(__file__).parent / "specs"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value typed as YAML would type it)."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise SpecError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a date YAML reads as one, 2020-13-01
        raise SpecError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """`--set` overrides on top of `doc`. `model.kind=K` switching to another model family keeps only
    the model fields K has (the others belong to the old kind; the overrides given beside it apply)."""
    doc = copy.deepcopy(doc)
    kinds = [value for parts, value in map(parse_override, overrides) if parts == ["model", "kind"]]
    model = doc.get("model")
    if kinds and isinstance(model, dict) and kinds[-1] in MODEL_KINDS and model.get("kind", "sasrec") != kinds[-1]:
        doc["model"] = {k: v for k, v in model.items() if k in model_fields_of(kinds[-1])}
    for text in overrides:
        parts, value = parse_override(text)
        node = doc
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {text!r}: '{'.'.join(parts[:i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return doc


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _KINDS))
    if err["type"] == "value_error" and loc == "model":  # a field of another model kind (jobs.schema.model_section)
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if err["type"] == "missing":
        return f"missing key '{loc}'"
    return f"'{loc}': {err['msg']} (got {err.get('input')!r})"


_KINDS = {"movielens_packaged", "movielens", "amazon2018", "amazon2023", "generic", "synthetic", *MODEL_KINDS}


def validate_spec(doc: Any, origin: str = "<spec>") -> JobSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"spec {origin}: top level must be a mapping, got {type(doc).__name__}")
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise SpecError(f"spec {origin}: {problems}") from None


def resolve_spec_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A path as given (or relative to the folder of the spec that names it as its base), or a bare
    name found in the packaged specs folder."""
    p = Path(path)
    candidates = [relative_to / p] if relative_to is not None and not p.is_absolute() else []
    candidates += [p, SPECS_DIR / p.name, SPECS_DIR / f"{p.name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SpecError(f"spec file not found: {path}")


def merge_docs(base: dict, override: dict) -> dict:
    """`override` on top of `base`: mappings merge key by key, anything else replaces. A mapping
    whose `kind` differs from the base's (another data source) replaces it whole."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        same_kind = not (isinstance(value, dict) and isinstance(old, dict) and "kind" in value
                         and old.get("kind") not in (None, value["kind"]))
        out[key] = merge_docs(old, value) if isinstance(old, dict) and isinstance(value, dict) and same_kind \
            else copy.deepcopy(value)
    return out


def read_spec_doc(path: str | Path, relative_to: Path | None = None, chain: tuple[Path, ...] = ()) -> dict:
    """A spec file as a mapping, with its `base:` chain merged underneath (a base is a path relative
    to the spec naming it, or a packaged spec name; a base may name its own base)."""
    p = resolve_spec_path(path, relative_to).resolve()
    if p in chain:
        raise SpecError(f"spec {chain[0]}: base cycle {' -> '.join(str(c) for c in (*chain, p))}")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, ValueError) as exc:
        raise SpecError(f"spec {p}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"spec {p}: top level must be a mapping")
    base = doc.pop("base", None)
    if base is None:
        return doc
    if not isinstance(base, str) or not base:
        raise SpecError(f"spec {p}: 'base' must name a spec file, got {base!r}")
    return merge_docs(read_spec_doc(base, p.parent, (*chain, p)), doc)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """The spec file with its base chain and `--set` overrides, validated. Its credentials (the values
    of the `${env:NAME}` it names, literal ones) are remembered for redaction (`jobs.secrets.redact`)."""
    doc = read_spec_doc(path)
    spec = validate_spec(apply_overrides(doc, overrides or []), origin=str(resolve_spec_path(path)))
    remember_spec_secrets(spec)
    return spec


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute against the current directory; URIs (`s3://...`, `sqlite:`,
    `databricks`) and empty values are returned as they are."""
    if not path or "://" in path or path.startswith(("sqlite:", "databricks")):
        return path
    return os.path.abspath(path)


def absolute_paths(spec: JobSpec) -> JobSpec:
    """The spec with its relative local paths (lake root, checkpoints, caches, Ray storage, a
    sqlite tracking store) made absolute against the current directory: what a job hands to Ray
    workers and submitted jobs, whose working directories differ. URIs are left as they are."""
    doc = spec.model_dump(mode="json")
    doc["lake"]["root"] = absolute_path(doc["lake"]["root"])
    doc["model"]["cache_dir"] = absolute_path(doc["model"]["cache_dir"])
    for key in ("checkpoint_dir", "storage_path"):
        doc["train"][key] = absolute_path(doc["train"][key])
    if doc["align"]["init"] and not doc["align"]["init"].startswith("models:/"):
        doc["align"]["init"] = absolute_path(doc["align"]["init"])
    # no URI in the spec: the driver's store, pinned, since a worker runs in another directory and
    # without the driver's environment (mlflow.set_tracking_uri, which publishing calls, sets
    # MLFLOW_TRACKING_URI in this process after Ray's workers started): the default store, or the
    # environment's sqlite file; a server's URI (it may carry a token) is left to the environment
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if doc["tracking"]["uri"]:
        doc["tracking"]["uri"] = _absolute_sqlite(doc["tracking"]["uri"])
    elif not env or env.startswith("sqlite:"):
        doc["tracking"]["uri"] = _absolute_sqlite(env or DEFAULT_TRACKING_URI)
    return JobSpec.model_validate(doc)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + absolute_path(uri[len("sqlite:///"):])
    return uri


def tracking_uri(spec: JobSpec) -> str:
    """The spec's MLflow URI, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; a sqlite
    path is made absolute, so Ray workers and submitted jobs write to the same store. `${env:NAME}`
    in the spec's URI is read from the environment here, where it is used."""
    uri = from_env(spec.tracking.uri, "tracking.uri") if spec.tracking.uri else None
    uri = _absolute_sqlite(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    if mask_uri(uri) != uri:  # MLflow prints "View run ... at: <uri>/#/..." when a run ends
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def local_overrides(spec: JobSpec) -> list[str]:
    """`--set` overrides that make the spec's relative local paths (lake, caches, checkpoints, Ray
    storage, a sqlite tracking store) absolute: what a job submitted to a head on this machine needs,
    since it runs in an uploaded copy of the project where `./.lake` would be empty. A tracking
    server's URI is left to the spec and the job's environment (it may carry a token)."""
    a = absolute_paths(spec)
    sets = [f"lake.root={a.lake.root}", f"model.cache_dir={a.model.cache_dir}",
            f"train.checkpoint_dir={a.train.checkpoint_dir}", f"train.storage_path={a.train.storage_path}"]
    uri = tracking_uri(a)
    return sets + ([f"tracking.uri={uri}"] if uri.startswith("sqlite:") else [])


def storage_options(spec: JobSpec) -> dict[str, str] | None:
    """`lake.storage_options` with environment references read (None when empty, as deltalake wants)."""
    opts = {k: from_env(v, f"lake.storage_options.{k}") for k, v in spec.lake.storage_options.items()}
    return opts or None


def dump_spec(spec: JobSpec) -> str:
    """The spec as YAML, secrets masked (`public_doc`)."""
    return yaml.safe_dump(public_doc(spec), sort_keys=False)
