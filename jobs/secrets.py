"""Credentials: where they come from, how they are masked, and one redaction for every process edge.

Credentials live in the environment: a spec names them as `${env:NAME}` in `lake.storage_options`,
`spark.conf`, `spark.remote` and `tracking.uri`, and they are read only where they are used
(`from_env`). Whatever the spec holds, what leaves the process as data (MLflow params and artifacts,
checkpoints, printed specs, job command lines) goes through `public_doc`, which masks secret values.

Errors are the other way out: a library's exception message may carry a resolved URI or key (MLflow
prints the tracking URI it could not reach). `redact` removes URI user info, token parameters and
every credential value this process has read or been given from any text; the command line, the
job entry points, logging handlers, warnings and the Dagster failure sensor pass what they print
through it (`install_redaction`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from jobs.errors import SpecError

_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|account_key|sas|signature|"
                         r"private|session_key|api_key|apikey|auth", re.IGNORECASE)
_URI_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@]*)@", re.IGNORECASE)
_PARAMS = r"token|password|secret|key|sig|access_token|api_key|client_secret|x-amz-security-token|x-amz-signature|" \
          r"x-amz-credential|x-goog-signature|x-goog-credential"
_URI_SECRET_PARAM = re.compile(rf"([;?&](?:{_PARAMS})=)([^;&]*)", re.IGNORECASE)
# user info anywhere in a text (an error message quoting a URL): scheme://<anything but / @ and blanks>@
_TEXT_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)([^\s/@'\"<>]+)@", re.IGNORECASE)
_TEXT_SECRET_PARAM = re.compile(rf"([;?&](?:{_PARAMS})=)([^;&\s'\"<>]*)", re.IGNORECASE)
# storage URIs whose user part names a container, not a user: abfss://container@account.dfs.core.windows.net/
CONTAINER_SCHEMES = ("abfs://", "abfss://", "wasb://", "wasbs://", "az://", "adl://")
MASK = "***"
CREDENTIAL_SECTIONS = (("lake", "storage_options"), ("spark", "conf"))
URI_FIELDS = (("tracking", "uri"), ("spark", "remote"))

_known: set[str] = set()  # credential values this process has read or been given: redacted from any text


def remember(values: Iterable[str]) -> None:
    """Credential values to redact from everything this process prints (short values are ignored:
    masking every `1` would make errors unreadable and protect nothing)."""
    _known.update(v for v in values if isinstance(v, str) and len(v) >= 4)


def from_env(value: str, where: str) -> str:
    """`value` with each `${env:NAME}` replaced by that environment variable; unset: an error naming both.
    The values read are remembered for `redact`."""
    def var(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise SpecError(f"{where}: environment variable {m.group(1)} is not set")
        remember([os.environ[m.group(1)]])
        return os.environ[m.group(1)]
    return _ENV_REF.sub(var, value)


def is_secret_key(key: str) -> bool:
    """A settings key that names a credential (`aws_secret_access_key`, Hadoop's
    `fs.azure.account.key.<account>...`: dots and dashes read as underscores)."""
    return bool(_SECRET_KEY.search(re.sub(r"[.\-]", "_", key)))


def mask_uri(uri: str) -> str:
    """A URI without the password of its user info and without token-like parameters (an
    `${env:NAME}` reference in their place is kept: it is not the secret)."""
    def userinfo(m: re.Match) -> str:
        user, colon, password = m.group(2).partition(":")
        if not colon:
            keep = _ENV_REF.fullmatch(user) or m.group(1).lower() in CONTAINER_SCHEMES
            return m.group(0) if keep else m.group(1) + MASK + "@"
        return m.group(1) + user + ":" + (password if _ENV_REF.fullmatch(password) else MASK) + "@"
    uri = _URI_USERINFO.sub(userinfo, uri)
    return _URI_SECRET_PARAM.sub(lambda m: m.group(0) if _ENV_REF.fullmatch(m.group(2)) else m.group(1) + MASK, uri)


def _mask(key: str, value: str) -> str:
    if _ENV_REF.fullmatch(value):
        return value  # a reference, not a secret
    return MASK if is_secret_key(key) else value


def public_doc(spec: Any) -> dict:
    """The spec as a plain mapping with every secret value masked: what MLflow, checkpoints, printed
    specs and logs get. Storage options and Spark settings whose key names a credential, and the
    password or token in a tracking or Spark Connect URI, become `***`; `${env:NAME}` stays."""
    doc = spec.model_dump(mode="json")
    for section, key in CREDENTIAL_SECTIONS:
        doc[section][key] = {k: _mask(k, v) for k, v in doc[section][key].items()}
    for section, key in URI_FIELDS:
        if doc[section][key]:
            doc[section][key] = mask_uri(doc[section][key])
    return doc


def flat_doc(doc: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping as dotted keys (`train.lr`) to its leaf values."""
    out: dict[str, object] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flat_doc(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def literal_credentials(spec: Any) -> list[str]:
    """Keys of the spec that hold a credential as a literal value (what `public_doc` masks)."""
    real, shown = flat_doc(spec.model_dump(mode="json")), flat_doc(public_doc(spec))
    return sorted(k for k in real if real[k] != shown.get(k))


def env_references(spec: Any) -> set[str]:
    """The environment variables a spec names as `${env:NAME}`."""
    import yaml
    return set(_ENV_REF.findall(yaml.safe_dump(spec.model_dump(mode="json"))))


def remember_spec_secrets(spec: Any) -> None:
    """Remember a loaded spec's credentials for `redact`: the values of the environment variables it
    names (where set) and the literal credentials it holds."""
    remember(os.environ[name] for name in env_references(spec) if name in os.environ)
    real = flat_doc(spec.model_dump(mode="json"))
    for key in literal_credentials(spec):
        value = str(real[key])
        remember([value] + [m.group(2).partition(":")[2] or m.group(2) for m in _TEXT_USERINFO.finditer(value)]
                 + [m.group(2) for m in _TEXT_SECRET_PARAM.finditer(value)])


def literal_credential_paths(doc: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Dotted paths in a (partial) spec document whose value is a literal credential: a credential-named
    key inside `lake.storage_options` or `spark.conf`, or any text holding a URI with a password or
    a token parameter — wherever it sits (a whole section given at once included)."""
    found: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += literal_credential_paths(v, (*path, str(k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += literal_credential_paths(v, (*path, str(i)))
    elif isinstance(doc, str) and not _ENV_REF.fullmatch(doc.strip()):
        in_section = any(path[:2] == s for s in CREDENTIAL_SECTIONS) and len(path) >= 3
        if (in_section and is_secret_key(path[-1])) or redact_uris(doc) != doc:
            found.append(".".join(path))
    return found


def redact_uris(text: str) -> str:
    """User info and token parameters of every URI in `text` masked (references kept)."""
    def userinfo(m: re.Match) -> str:
        user, colon, password = m.group(2).partition(":")
        if _ENV_REF.fullmatch(password if colon else user) or (not colon and m.group(1).lower() in CONTAINER_SCHEMES):
            return m.group(0)
        return m.group(1) + (f"{user}:{MASK}" if colon else MASK) + "@"
    text = _TEXT_USERINFO.sub(userinfo, text)
    return _TEXT_SECRET_PARAM.sub(lambda m: m.group(0) if _ENV_REF.fullmatch(m.group(2)) else m.group(1) + MASK, text)


def redact(text: Any) -> str:
    """`text` with URI user info, token parameters and every remembered credential value masked."""
    text = str(text)
    for value in sorted(_known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return redact_uris(text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (arguments merged in) before any handler
    formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments don't format: leave it to the handler
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        return True


_installed = False


def install_redaction() -> None:
    """At a process edge: every logging handler (present and future, through the root logger's
    filter on its handlers) and every warning shown pass through `redact`. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    _filter = RedactingFilter()
    logging.getLogger().addFilter(_filter)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_filter)
    original_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs):  # records of every logger, whichever handler prints them
        record = original_factory(*args, **kwargs)
        _filter.filter(record)
        return record
    logging.setLogRecordFactory(factory)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        shown(redact(message), category, filename, lineno, file if file is not None else sys.stderr, line)
    warnings.showwarning = show


def scrub(exc: BaseException) -> BaseException:
    """Redact an exception's message in place, and its causes' (what a framework that records the
    exception — Dagster's event log — will print)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.args = tuple(redact(a) if isinstance(a, str) else a for a in e.args)
        for attr in ("message", "msg", "description"):
            if isinstance(getattr(e, attr, None), str):
                try:
                    setattr(e, attr, redact(getattr(e, attr)))
                except AttributeError:
                    pass
        e = e.__cause__ or e.__context__
    return exc


@contextmanager
def scrubbed_errors() -> Iterator[None]:
    """Re-raise whatever the block raises with every message in its chain redacted (`scrub`)."""
    try:
        yield
    except Exception as exc:
        raise scrub(exc)


def redacted_exception(exc: BaseException) -> str:
    """A whole traceback, redacted: what an edge prints for an unexpected error."""
    import traceback
    return redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def check_override_secrets(overrides: list[str]) -> None:
    """Overrides go on a job's command line, which Ray keeps and shows: a credential given as a
    literal value there is refused (name it `${env:NAME}` instead). The document the overrides build
    is checked by value, wherever a credential sits in it (`literal_credential_paths`)."""
    from jobs.spec import apply_overrides
    bad = literal_credential_paths(apply_overrides({}, overrides))
    if bad:
        raise SpecError(f"--set {', '.join(bad)}: a credential would be written on the job's command line; "
                        "pass it through the environment as ${env:NAME}")
