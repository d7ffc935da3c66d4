"""The evaluation job: full-ranking metrics of trained models, users split over Ray tasks (on GPUs
when train.use_gpu), ranks and top lists gathered, metrics computed once from them — the same
numbers as the single-process evaluator. Several models are compared on the same data version, each
on the current catalogue (which may have grown since it was trained: an HLLM scores the new items
from their text, an ID model counts them as unscorable). With `--next-day DAY`, the models that
served that day are also judged on it (`ray_jobs.next_day`).

    python -m ray_jobs.evaluate --spec S [--model [ROLE=]models:/NAME@alias | [ROLE=]PATH ...] [--split valid --split test]
                                [--next-day YYYY-MM-DD --next-day-model [ROLE=]REF ...] [--workers 2]
"""
from __future__ import annotations

import re
import sys

from jobs.contracts import EvaluateOutcome, ModelRow, meta
from jobs.lake import included_days, publications
from jobs.schema import JobSpec
from jobs.spec import absolute_paths
from ray_jobs.data import load_sequences
from ray_jobs.entrypoint import DagsterReport, job_main
from ray_jobs.models.llm import minilm_item_embeddings
from ray_jobs.next_day import evaluate_next_day, load_next_day
from ray_jobs.registry import resolve_model
from ray_jobs.runtime import evaluate_distributed, init_ray
from ray_jobs.scoring import load_for_catalogue

ROLE = re.compile(r"([a-z][a-z0-9_]*)=(.+)")


def with_role(ref: str | None) -> tuple[str | None, str | None]:
    """`trained=/path/model.pt` -> ("trained", "/path/model.pt"); a bare reference has no role."""
    m = ROLE.fullmatch(ref or "")
    return (m.group(1), m.group(2)) if m and "://" not in m.group(1) else (None, ref)


def run(spec: JobSpec, models: list[str] | None = None, splits: tuple[str, ...] = ("test",), workers: int = 2,
        next_day: str | None = None, next_day_models: list[str] | None = None) -> EvaluateOutcome:
    """Metrics of each model (a registry URI, a checkpoint file; default the training run's model.pt,
    each optionally named by a role) on each split of the current read set of the gold tables; a
    model trained on a catalogue the current one does not extend is refused. With `next_day` (a
    landed day the data read includes), the `next_day_models` are judged on that day's interactions
    — each unless its own training data holds the day (a night run again: no leaked score)."""
    spec = absolute_paths(spec)
    named = [with_role(m) for m in (models or [None])]
    resolved = [(role, resolve_model(spec, ref)) for role, ref in named]
    init_ray(spec)
    data = load_sequences(spec)
    item_emb = minilm_item_embeddings(spec.model, data.item_text)
    out = EvaluateOutcome(data.versions, list(splits), [
        ModelRow(r.label, role, r.name, r.version, {split: result.flat() for split, result in evaluate_distributed(
            spec, r.path, splits, workers, data, item_emb, r.cache_dir).items()})
        for role, r in resolved])
    if next_day:
        pubs = publications(spec)
        if next_day not in included_days(pubs, data.versions):
            raise ValueError(f"--next-day {next_day}: the data read (versions {data.versions}) does not include that "
                             "landed day; ingest it first")
        queries = load_next_day(spec, data.versions, next_day)
        out.next_day = []
        for role, ref in (with_role(m) for m in next_day_models or []):
            r = resolve_model(spec, ref)
            loaded = load_for_catalogue(r.path, data.catalogue, data.versions.get("item_index"), r.cache_dir)
            if next_day in included_days(pubs, loaded.ckpt.versions):  # a rerun night: it trained on the day
                print(f"{r.label} is not judged on {next_day}: its training data holds the day", flush=True)
                continue
            result = evaluate_next_day(loaded.score_function(), queries, data.catalogue.active, loaded.scorable,
                                       loaded.ckpt.spec.data.max_seq_len)
            out.next_day.append(ModelRow(r.label, role, r.name, r.version, day=result.day, metrics=result.metrics,
                                         slices=result.slices))
    return out


def next_day_table(rows: list[ModelRow]) -> str:
    lines = ["| model | day | users | NDCG@10 | Recall@10 | HR@10 | new-item hit share@10 | new items recommended "
             "| unscorable items |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r.metrics
        lines.append(f"| {r.label()} | {r.day} | {m['users']} | {m.get('ndcg@10', 0):.4f} | "
                     f"{m.get('recall@10', 0):.4f} | {m.get('hr@10', 0):.4f} | {m['new_item_hit_share@10']:.3f} | "
                     f"{m['new_items_recommended@10']} | {m['unscorable_items']} |")
    return "\n".join(lines)


def dagster_report(spec: JobSpec, out: EvaluateOutcome) -> DagsterReport:
    """The evaluation_report asset's metadata: every model's figures (what the gate reads; the asset
    renders their table, labelled with the registry versions it knows), and the next-day judgement
    when there is one."""
    metadata = out.to_metadata()
    if out.next_day is not None:
        metadata["next_day"] = meta(next_day_table(out.next_day), "md")
    return DagsterReport(metadata=metadata, checks={})


def main(argv: list[str] | None = None) -> int:
    def options(ap) -> None:
        ap.add_argument("--model", "--checkpoint", dest="models", action="append",
                        help="[ROLE=]models:/NAME@alias or [ROLE=]a checkpoint file, repeatable (default: the training "
                             "run's model.pt)")
        ap.add_argument("--split", dest="splits", action="append", choices=["valid", "test"],
                        help="repeatable (default: test)")
        ap.add_argument("--next-day", help="also judge --next-day-model models on this day's interactions (YYYY-MM-DD)")
        ap.add_argument("--next-day-model", dest="next_day_models", action="append", default=[],
                        help="[ROLE=]a model that served --next-day (repeatable)")
        ap.add_argument("--workers", type=int, default=2, help="user shards, each on a Ray task on GPUs or a cluster "
                        "of several nodes (a one-node CPU cluster scores them in the driver: "
                        "ray_jobs.runtime.scores_on_tasks)")
    return job_main(__doc__, options, lambda spec, a: run(spec, a.models, tuple(a.splits or ["test"]), a.workers,
                                                          a.next_day, a.next_day_models), argv, dagster_report)


if __name__ == "__main__":
    sys.exit(main())
