"""The spec reference, generated from the schema: every key of `JobSpec` with its type, default and
the description its pydantic field carries — one source of truth for docs/spec-reference.md, which
a test keeps equal to this output.

    python -m jobs.reference > docs/spec-reference.md
"""
from __future__ import annotations

import json
import sys
import typing
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from jobs.schema import JobSpec

PREAMBLE = """# The job spec: reference

Generated from the schema (`python -m jobs.reference > docs/spec-reference.md`; a test fails when
this file and the schema disagree). One YAML file describes a run; unknown keys are an error that
names the key. Every command and job takes `--spec PATH` (a file, or a name under `jobs/specs/`)
and `--set key.path=value` overrides (values read as YAML: `--set data.kcore.user=10`, `--set
'data.source={kind: synthetic, n_interactions: 1000000}'`). A spec may build on another: `base:
other.yaml` (a path relative to the spec, or a packaged spec name) is loaded first and the spec's
own keys are merged on top (mappings key by key; a `source` of another `kind` replaces the base's
whole), then the overrides; chains are allowed, cycles refused. Relative paths are relative to the
working directory. Credentials are never written in a spec: `${env:NAME}` in `lake.storage_options`,
`spark.conf`, `spark.remote` and `tracking.uri` is read from the environment where it is used.
`llmrec spec --spec S` prints the resolved spec, credentials masked.
"""


def type_name(annotation: Any) -> str:
    """A field's type as a reader wants it: `sail | local`, `int`, `list[int]`, `mapping`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        name = " \\| ".join(type_name(a) for a in args)
        return f"{name} or none" if len(args) < len(get_args(annotation)) else name
    if origin is typing.Annotated:
        return type_name(get_args(annotation)[0])
    if origin in (list, tuple):
        return f"list of {type_name(get_args(annotation)[0])}" if get_args(annotation) else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def section_type(annotation: Any) -> str | None:
    """A discriminated union of sections: `section: kind a \| b \| ...`."""
    kinds = [m.model_fields["kind"].annotation for m in models_of(annotation) if "kind" in m.model_fields]
    if len(models_of(annotation)) < 2 or not kinds:
        return None
    return "section: kind " + " \\| ".join(f"`{k}`" for kind in kinds for k in get_args(kind))


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "see below"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return f"`{text}`" if len(text) < 60 else f"`{text[:57]}...`"


def models_of(annotation: Any) -> list[type[BaseModel]]:
    """The section classes a field holds (one, or the kinds of a discriminated union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in models_of(a)]


def rows(model: type[BaseModel], prefix: str) -> list[str]:
    out, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sections = models_of(field.annotation)
        description = field.description or ""
        if not description and len(sections) == 1:  # a section: its class says what it is
            description = ((sections[0].__doc__ or "").strip().splitlines() or [""])[0]
        description = description.replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{key}` | {section_type(field.annotation) or type_name(field.annotation)} | {default_text(field)} | "
                   f"{description} |")
        for section in sections:
            nested.append((key, section))
    for key, section in nested:
        kind = section.model_fields.get("kind")
        union = kind is not None and len(models_of(model.model_fields[key.rsplit(".", 1)[-1]].annotation)) > 1
        label = f"`{key}`, kind " + ", ".join(f"`{k}`" for k in get_args(kind.annotation)) if union else f"`{key}`"
        doc = (section.__doc__ or "").strip().replace("\n", " ")
        out += ["", f"### {label}", ""] + ([doc, ""] if doc else []) + \
            ["| key | type | default | meaning |", "|---|---|---|---|"] + rows(section, f"{key}.")
    return out


def render() -> str:
    lines = [PREAMBLE, "## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += rows(JobSpec, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
