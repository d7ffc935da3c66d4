"""The `llmrec` command line: one subcommand per pipeline stage, each taking --spec and --set."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobs.contracts import CHAMPION, Tag, final_metric
from jobs.files import UnsafeFile
from jobs.lake import Lake, LakeBusy, LakeCorrupt
from jobs.progress import Steps
from jobs.rayjob import JOB_MODULES
from jobs.secrets import check_override_secrets, install_redaction, mask_uri, redact, redacted_exception
from jobs.errors import SpecError
from jobs.schema import JobSpec, safe_name
from jobs.spec import dump_spec, load_spec, local_overrides

console = Console()
errors = Console(stderr=True, soft_wrap=True)


def run_name(value: str) -> str:
    """An argparse type: a run name becomes a folder, so it is a safe name (`jobs.spec.safe_name`)."""
    try:
        return safe_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="spec YAML (path, or a name under jobs/specs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set spark.engine=local (repeatable)")


def cmd_spec(args: argparse.Namespace) -> int:
    print(dump_spec(load_spec(args.spec, args.overrides)), end="")
    return 0


def cmd_etl(args: argparse.Namespace) -> int:
    from spark import etl  # each command imports its layer when it runs: `llmrec --help` starts fast
    spec = load_spec(args.spec, args.overrides)
    steps = Steps(enabled=not args.quiet)
    with contextlib.ExitStack() as stack:
        with steps.step(f"start spark ({spec.spark.engine})"):
            engine = stack.enter_context(etl.engine_for(spec))
        summary = etl.run_etl(spec, engine, steps, renumber=args.renumber, force=args.force)
    if summary.unchanged:
        errors.print(f"unchanged: publication {summary.published} was built from this source, these landed days, "
                     "settings and ETL code; nothing written (--force rebuilds)", highlight=False)
    if args.renumber:
        errors.print(f"--renumber: a new id lineage ({summary.lineage}); models trained on earlier ids no longer "
                     "match this lake's catalogue", highlight=False)
    summary.step_seconds = {k: round(v, 3) for k, v in steps.timings.items()}
    return _report(summary, args.summary_out, Lake.of(spec))


def cmd_ingest(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    if spec.data.landing is None:
        raise ValueError(f"spec {args.spec}: data.landing is not configured; there is nothing to ingest")
    from spark import etl
    from spark.sources import landing_days
    steps = Steps(enabled=not args.quiet)
    with contextlib.ExitStack() as stack:
        with steps.step(f"start spark ({spec.spark.engine})"):
            engine = stack.enter_context(etl.engine_for(spec))
        days = [args.date] if args.date else list(landing_days(spec.data.landing))
        results = []
        for day in days:  # in date order; a day whose gold fails its checks stops the rest (it was rolled back)
            results.append(etl.ingest_day(spec, engine, day, steps))
            if results[-1].gold is not None and results[-1].gold.published is None:
                break
    print(json.dumps([dataclasses.asdict(r) for r in results], indent=2, default=str))
    failed = [r.day for r in results if not r.accounting.accounted or (r.gold is not None and r.gold.published is None)]
    if failed:
        errors.print(f"day {failed[0]}: its rows are not accounted for or its gold failed a check: nothing of it was "
                     "published" + (f"; {len(days) - len(results)} later day(s) not ingested" if len(results) < len(days)
                                    else ""), highlight=False)
    return 3 if failed else 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llmrec")
    except PackageNotFoundError:
        return "0.1.0"


def cmd_render(args: argparse.Namespace) -> int:
    """Manifests from the spec: printed, or one file each under --out."""
    from jobs import render
    opts = render.K8sOptions(image=args.image, namespace=args.namespace, shared_claim=args.shared_claim,
                             credentials_secret=args.credentials_secret, shm_size=args.shm_size,
                             worker_memory=args.worker_memory, max_workers=args.max_workers)
    files = render.render_k8s(load_spec(args.spec, args.overrides), opts)
    if not args.out:
        print("---\n".join(files.values()), end="")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(args.out, name), "w") as fh:
            fh.write(text)
        errors.print(f"wrote {os.path.join(args.out, name)}", highlight=False)
    return 0


def restart_with_allocator(args: argparse.Namespace, spec: JobSpec) -> None:
    """A command that trains, aligns or scores in this process runs under the spec's CPU allocator
    (`jobs.allocator`): run as `llmrec ...`, it re-executes itself with it (before its heavy imports)."""
    if args.own_process:
        from jobs.allocator import exec_with_allocator
        exec_with_allocator(spec)


def cmd_train(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    restart_with_allocator(args, spec)
    from ray_jobs import train
    from ray_jobs.loop import ConsoleReporter, Reporter
    if not args.local:
        print(json.dumps(train.run(spec, args.run_name).to_dict(), indent=2, default=float))
        return 0
    reporter = Reporter() if args.quiet else ConsoleReporter()
    result = train.train_local(spec, resume=not args.restart, reporter=reporter)
    split = "valid" if spec.train.fit_on == "train" else "test"
    out = {f"best_{split}_ndcg@10" if split == "valid" else "final_test_ndcg@10": result.best_metric,
           "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
           "steps": result.steps, "seconds": round(result.seconds, 1), "stopped": result.stopped,
           "checkpoint": result.checkpoint,
           "time_to_quality": [{"seconds": round(h["seconds"], 1), "epoch": h["epoch"], f"{split}_hr@10": h[f"{split}_hr@10"]}
                               for h in result.history if f"{split}_hr@10" in h]}
    print(json.dumps(out, indent=2))
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    restart_with_allocator(args, spec)
    from ray_jobs import align
    out = align.run(spec, args.run_name, register=not args.no_register)
    print(json.dumps(out.to_dict(), indent=2, default=float))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """In this process: a baseline (model.kind pop / graph) or a trained checkpoint on one split."""
    spec = load_spec(args.spec, args.overrides)
    restart_with_allocator(args, spec)
    from ray_jobs import scoring
    from ray_jobs.data import load_sequences
    from jobs.contracts import markdown_table
    from ray_jobs.models.llm import minilm_item_embeddings
    from ray_jobs.train import local_dir
    data = load_sequences(spec)
    text_emb = minilm_item_embeddings(spec.model, data.item_text)
    checkpoint = None
    if spec.model.kind not in ("pop", "graph"):
        checkpoint = args.checkpoint or os.path.join(local_dir(spec), "best.pt")
    score, name, scorable = scoring.score_function(spec, data, text_emb, checkpoint)
    result = scoring.evaluate_split(spec, score, data, args.split, text_emb, scorable)
    result.split, result.versions = args.split, data.versions
    console.print(markdown_table({name: result.flat()}), highlight=False)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": name, **result.to_dict()}, fh, indent=2)
        console.print(f"written {args.out}")
    return 0


LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")


def submit_overrides(spec, address: str) -> list[str]:
    """For a head on this machine, the spec's relative paths as absolute ones (`jobs.spec.local_overrides`)."""
    from urllib.parse import urlparse
    if (urlparse(address).hostname or "") not in LOCAL_HOSTS:
        return []
    return local_overrides(spec)


def job_arg_overrides(job_args: list[str]) -> list[str]:
    """The `--set` overrides hidden in `--job-arg` values (`--set=K=V`, or `--set` then `K=V`)."""
    out, it = [], iter(job_args)
    for a in it:
        if a.startswith("--set="):
            out.append(a.split("=", 1)[1])
        elif a == "--set":
            out.append(next(it, ""))
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    """`ray job submit` through the Jobs API: upload the project, run the entrypoint, stream logs."""
    import asyncio

    from jobs.rayjob import client_token_auth, job_command_line, job_runtime_env, project_spec_path, submit_when_ready
    client_token_auth()  # before Ray is imported: a head started by infra/local/ray-up.sh requires the token
    from ray.job_submission import JobStatus, JobSubmissionClient
    spec = load_spec(args.spec, args.overrides)
    spec_arg = project_spec_path(args.spec)
    overrides = args.overrides + submit_overrides(spec, args.address)
    check_override_secrets(overrides + job_arg_overrides(args.job_args))
    entry = job_command_line(args.job, spec_arg, overrides, args.job_args)
    client = JobSubmissionClient(args.address)
    job_id = submit_when_ready(client, entrypoint=entry, runtime_env=job_runtime_env(spec),
                               submission_id=args.submission_id)
    errors.print(f"submitted {job_id} to {args.address}: {entry}", highlight=False)
    if args.no_wait:
        print(job_id)
        return 0

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(stream())
    status = client.get_job_status(job_id)
    errors.print(f"job {job_id}: {status}", highlight=False)
    return 0 if status == JobStatus.SUCCEEDED else 4


def cmd_verify_model(args: argparse.Namespace) -> int:
    """Check a registered (or downloaded) model before anyone loads it: its `MLmodel` names our loader
    and nothing else, and every file is data of a known kind, read as such. Exit 0 when it is, 3 (and
    what is wrong, file by file) when it is not."""
    import tempfile

    from ray_jobs.registry_check import verify_model_folder
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if args.model.startswith(("models:/", "runs:/")):
            import mlflow
            folder = mlflow.artifacts.download_artifacts(artifact_uri=args.model, dst_path=tmp)
        elif not os.path.isdir(folder):
            raise FileNotFoundError(f"{args.model}: neither a models:/ or runs:/ URI nor a folder")
        findings = verify_model_folder(folder)
    for f in findings:
        console.print(f"{'ok  ' if f.ok else 'FAIL'} {f.path}: {f.what}", highlight=False, markup=False)
    bad = [f for f in findings if not f.ok]
    console.print(f"{args.model}: {'data only, loads with the llmrec loader' if not bad else f'{len(bad)} problem(s)'}",
                  highlight=False, markup=False)
    return 0 if not bad else 3


def cmd_tables(args: argparse.Namespace) -> int:
    """Every table's latest version, rows and last operation (delta-rs only: no Spark is started)."""
    from jobs.lake import TABLES, open_table, published_versions, table_path
    from jobs.spec import storage_options
    spec = load_spec(args.spec, args.overrides)
    table = Table("table", "path", "version", "rows", "last operation")
    for name in TABLES:
        path = table_path(spec, name)
        t = open_table(path, options=storage_options(spec), table=name)
        if t is None:
            table.add_row(name, path, "-", "-", "-")
            continue
        table.add_row(name, path, str(t.version()), f"{t.count():,}", t.history(1)[0].get("operation", "?"))
    console.print(table)
    published = published_versions(spec)
    console.print(f"published version set (what readers use): {json.dumps(published) if published else 'none'}")
    return 0


def _report(summary, out: str | None, lake) -> int:
    """The ETL summary as a table; exit 3 when a data-quality check failed or rows are unaccounted for."""
    acc, gold = summary.accounting, summary.gold
    t = Table(title=f"{summary.dataset} — engine {summary.engine}", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")
    rows = [("raw rows (bronze)", acc.raw_rows), ("quarantined rows", acc.quarantined_rows),
            ("duplicates removed", acc.duplicates_removed),
            ("  of them: keys with conflicting values (largest kept)", acc.conflicting_keys),
            ("silver interactions", acc.silver_rows),
            ("accounted (raw = silver + quarantined + duplicates)", acc.accounted),
            ("gold interactions", gold.interactions), ("users", gold.users), ("items", gold.items),
            ("k-core rounds", len(gold.kcore_rounds))]
    rows += [(f"  quarantined: {reason}", n) for reason, n in acc.quarantined_by_reason.items()]
    rows += [(f"sequences: {split}", n) for split, n in gold.sequences_by_split.items()]
    rows += [(f"delta version: {name}", v) for name, v in summary.versions.items()]
    rows += [(f"check: {c.name}", "pass" if c.passed else f"FAIL {c.metrics}") for c in summary.checks]
    rows.append(("published for readers", f"yes (publication {summary.published})" if summary.published is not None
                 else "NO: readers keep the previous published version set"))
    for name, value in rows:
        t.add_row(name, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(t)
    console.print(f"summary written to {lake.summary_path}")
    if out:
        with open(out, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=2, default=str)
        console.print(f"summary written to {out}")
    return 0 if summary.published is not None else 3


def cmd_report(args: argparse.Namespace) -> int:
    """The latest trained and aligned models of the spec next to popularity, the champion, and where
    the recommendations are: what `make demo` prints at the end."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from jobs.lake import table_path
    from jobs.spec import tracking_uri
    spec = load_spec(args.spec, args.overrides)
    uri = tracking_uri(spec)
    client, name = MlflowClient(tracking_uri=uri, registry_uri=uri), spec.registered_model_name()
    exp = client.get_experiment_by_name(spec.tracking.experiment)

    def latest(kind: str):
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], f"tags.`{Tag.KIND}` = '{kind}' and tags.`{Tag.SPEC}` = '{spec.name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    cols = [("valid NDCG@10", "valid", "ndcg@10"), ("HR@10", "test", "hr@10"), ("NDCG@10", "test", "ndcg@10"),
            ("cover@10", "test", "coverage@10"), ("tail@10", "test", "tail_share@10"), ("ILD@10", "test", "ild@10")]
    t = Table(title=f"{spec.name}: full ranking over the catalogue, test split unless marked")
    t.add_column("model")
    for label, _, _ in cols:
        t.add_column(label, justify="right")
    train, align = latest("train"), latest("align")
    rows = [("popularity", train, "popularity"), ("trained", train, "final"), ("aligned", align, "final")]
    wide = Console(width=max(console.width, 100))
    for label, run, role in rows:
        if run is not None:
            m = run.data.metrics
            mark = " (champion)" if role == "final" and champion is not None and champion.run_id == run.info.run_id else ""
            keys = [final_metric(role, split, metric) for _, split, metric in cols]
            t.add_row(f"{label}{mark}", *[f"{m[k]:.4f}" if k in m else "–" for k in keys])
    wide.print(t)
    wide.print(f"champion: {f'models:/{name}@{CHAMPION} = version {champion.version}' if champion else 'none yet'}")
    wide.print(f"recommendations: {table_path(spec, 'recommendations')} (Delta; `llmrec tables --spec {args.spec}`)")
    wide.print("look at it all: `make ui` (Dagster, http://127.0.0.1:3000) and "
               f"`.venv/bin/mlflow ui --backend-store-uri {mask_uri(uri)} --host 127.0.0.1` (MLflow)", soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description="LLM recommender pipeline: data, training, "
                                     "alignment, evaluation. Every command takes --spec and --set.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("etl", help="build bronze/silver/gold Delta tables from the spec's source")
    _spec_args(p)
    p.add_argument("--summary-out", help="also write the summary JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--renumber", action="store_true", help="give every user and item a new id (a new lineage: models "
                   "trained before no longer match); by default a rebuild keeps the published ids")
    p.add_argument("--force", action="store_true", help="rebuild even when the published set was built from the same "
                   "source files, landed days, data settings and ETL code (by default such a run writes nothing)")
    p.set_defaults(func=cmd_etl)

    p = sub.add_parser("ingest", help="MERGE landed daily files into silver (idempotent) and rebuild gold")
    _spec_args(p)
    p.add_argument("--date", help="the landing day YYYY-MM-DD (default: every landed day, in order)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="train the spec's model on the gold tables (--local: one process)")
    _spec_args(p)
    p.add_argument("--local", action="store_true", help="single-process trainer (no Ray)")
    p.add_argument("--run-name", type=run_name, help="Ray Train run name (default: the spec name); the same name resumes")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint instead of resuming")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("align", help="list-wise alignment (align.method: blade | static_bon | grpo | flame | pars | "
                       "gflownet | dpo) of a "
                       "trained model on Ray Train + DeepSpeed; registers the aligned model")
    _spec_args(p)
    p.add_argument("--run-name", type=run_name,
                   help="Ray Train run name (default: <spec>-align-<method>); the same name resumes")
    p.add_argument("--no-register", action="store_true", help="log the model to MLflow but do not register it")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("evaluate", help="full-ranking evaluation of a trained model (or model.kind=pop / graph)")
    _spec_args(p)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--checkpoint", help="a trained model's checkpoint file (default: <train.checkpoint_dir>/<name>/best.pt)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("submit", help="submit a job (train | align | evaluate | recommend) to a Ray cluster, stream its logs")
    p.add_argument("job", choices=sorted(JOB_MODULES))
    _spec_args(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--job-arg", dest="job_args", action="append", default=[],
                   help="extra argument for the job entrypoint, e.g. --job-arg=--run-name=nightly (repeatable)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("verify-model", help="check a registered model (models:/NAME@alias, runs:/..., or a folder) "
                       "is data only with our loader, before anyone loads it")
    p.add_argument("model")
    p.set_defaults(func=cmd_verify_model)

    p = sub.add_parser("tables", help="list the dataset's Delta tables with version and row count")
    _spec_args(p)
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("report", help="the latest trained and aligned models beside popularity, the champion, "
                       "where the recommendations are")
    _spec_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("render", help="render deployment manifests from a spec (k8s: ConfigMap, KubeRay RayCluster, "
                       "RayJobs for train / align / evaluate / recommend)")
    p.add_argument("target", choices=["k8s"])
    _spec_args(p)
    p.add_argument("--image", default=f"ghcr.io/llmrec/llmrec-gpu:{_version()}",
                   help="container image with a pinned tag or digest (default: %(default)s)")
    p.add_argument("--namespace", default="llmrec")
    p.add_argument("--shared-claim", default="llmrec-shared",
                   help="ReadWriteMany PersistentVolumeClaim mounted at /mnt/shared on every pod")
    p.add_argument("--credentials-secret", default="llmrec-credentials",
                   help="Secret with RAY_AUTH_TOKEN and every ${env:NAME} the spec names")
    p.add_argument("--shm-size", default="16Gi", help="/dev/shm size per pod (DeepSpeed, NCCL)")
    p.add_argument("--worker-memory", default="64Gi")
    p.add_argument("--max-workers", type=int, help="autoscaling upper bound (default: train.workers)")
    p.add_argument("--out", help="write one file per manifest into this folder (default: print them)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("spec", help="print the resolved spec (after --set overrides)")
    _spec_args(p)
    p.set_defaults(func=cmd_spec)
    return parser


USER_ERRORS = (SpecError, FileNotFoundError, ValueError, LakeBusy, LakeCorrupt, UnsafeFile)


def known_failures() -> tuple[type[BaseException], ...]:
    """Failures of the world, not of our code: an unreachable tracking server or object store. They
    are reported in one line like input mistakes."""
    from mlflow.exceptions import MlflowException
    return (MlflowException, ConnectionError, TimeoutError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Every command's edge: an input mistake or a known failure is one redacted line and exit 2
    (3: data that fails its checks, from the command itself); anything else is a redacted traceback
    and exit 1. Nothing a credential was resolved into leaves this process unredacted."""
    install_redaction()
    args = build_parser().parse_args(argv)
    args.own_process = argv is None
    try:
        return args.func(args)
    except (*USER_ERRORS, *known_failures()) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        errors.print(f"[red]error:[/red] {escape(redact(message))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted", highlight=False)
        return 130
    except Exception as exc:
        errors.print(escape(redacted_exception(exc)), highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
