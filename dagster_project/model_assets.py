"""Model assets: training, alignment, evaluation, the champion gate and batch recommendations.

Training code never runs in the Dagster process: each asset submits a `python -m ray_jobs.<job>`
entry point as a Ray job through Dagster Pipes (`dagster-ray`'s PipesRayJobClient: the job's logs
stream into the run, a failed job fails the asset, a cancelled run stops the job), and the job
reports its metadata and check results back. Every job reads the table versions the ETL published
for this lineage (`data.pinned_versions`), never the latest of each table.
"""

import json

from dagster import (AssetCheckResult, AssetCheckSpec, AssetExecutionContext, AssetKey, Failure, MaterializeResult,
                     MetadataValue, asset)

from dagster_project.data_assets import asset_key
from dagster_project.gate import decide
from dagster_project.resources import MLflowResource, RayResource, SpecResource
from jobs.contracts import CHAMPION, Check, EvaluateOutcome, EvaluationReport, ModelRecord, Tag
from jobs.lake import ingested_days, published_versions
from jobs.rayjob import job_command
from jobs.secrets import check_override_secrets, scrubbed_errors
from jobs.schema import JobSpec


def upstream(context: AssetExecutionContext, key: AssetKey) -> dict:
    """The latest materialization metadata of an upstream asset, as plain values."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise ValueError(f"asset {key.to_user_string()} has not been materialized yet")
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def model_record(context: AssetExecutionContext, key: str) -> ModelRecord:
    """The model an upstream model asset (trained_model, aligned_model) holds."""
    return ModelRecord.from_metadata(upstream(context, AssetKey(key)))


def dagster_metadata(raw: dict) -> dict:
    """Pipes-form metadata (`jobs.contracts.meta`) as Dagster metadata values."""
    kinds = {"path": MetadataValue.path, "json": MetadataValue.json, "md": MetadataValue.md,
             "null": lambda _: MetadataValue.null()}
    return {k: kinds[v["type"]](v["raw_value"]) if isinstance(v, dict) and v.get("type") in kinds else v
            for k, v in raw.items()}


def pinned_versions(context: AssetExecutionContext, spec: JobSpec) -> dict[str, int]:
    """The version set published most recently by this deployment's data assets (the full ETL records
    it with gold/sequences, a landed day with bronze/landed_day); a lake built outside Dagster falls
    back to its latest published set."""
    events = [context.instance.get_latest_materialization_event(k)
              for k in (asset_key("sequences"), AssetKey(["bronze", "landed_day"]))]
    published = [(e.timestamp, e.asset_materialization.metadata["published_versions"].value) for e in events
                 if e is not None and e.asset_materialization is not None
                 and "published_versions" in e.asset_materialization.metadata]
    versions = max(((t, v) for t, v in published if v), default=(0, None), key=lambda x: x[0])[1]
    versions = versions or published_versions(spec)
    if not versions:
        raise ValueError(f"dataset {spec.data.name} has no published version set: materialize the data assets first")
    return {k: int(v) for k, v in versions.items()}


def run_job(context: AssetExecutionContext, job: str, spec: SpecResource, ray: RayResource, mlflow: MLflowResource,
            overrides: list[str], args: list[str] = ()):
    """Submit `python -m ray_jobs.<job>` with the deployment's spec and overrides as a Ray job through Pipes
    (an error on the way is redacted before Dagster records it)."""
    with scrubbed_errors():
        base = spec.load(*mlflow.spec_overrides())
        sets = [*spec.overrides, *ray.spec_overrides(base), *mlflow.spec_overrides(), *overrides]
        check_override_secrets(sets)
        return ray.run(context, job, spec.load(*sets), job_command(job, ray.job_spec_path(spec), sets, args))


def check_day_published(job: JobSpec, versions: dict[str, int], day: str) -> None:
    """A nightly run trains only on data that holds its landed day: when the day's ingest failed (or
    has not run), the night stops here instead of retraining, gating and recommending on yesterday's
    data under today's partition."""
    if day not in ingested_days(job, versions):
        raise Failure(f"landed day {day} is not in the published data {versions}: its ingest failed or has not "
                      "run, so this night does not retrain (ingest the day, then run the night again)")


def data_through(job: JobSpec, versions: dict[str, int], fallback: str) -> str:
    """The last landed day a model's data holds (a backfilled day's night trains on later days too)."""
    return max(ingested_days(job, versions), default=fallback)


def versions_override(versions: dict[str, int]) -> str:
    return f"data.pinned_versions={json.dumps(versions)}"


@asset(key="trained_model", group_name="training", kinds={"ray", "pytorch", "mlflow"},
       deps=[asset_key("sequences"), asset_key("item_index")],
       check_specs=[AssetCheckSpec(Check.BEATS_POPULARITY, asset="trained_model", blocking=True,
                                   description="validation NDCG@10 above popularity's by checks.min_gain_over_popularity")])
def trained_model(context: AssetExecutionContext, spec: SpecResource, ray: RayResource, mlflow: MLflowResource):
    """The spec's recommender (HLLM or SASRec) trained by `ray_jobs.train` on Ray Train + DeepSpeed,
    logged to MLflow and registered (alias challenger)."""
    job = spec.load(*mlflow.spec_overrides())
    versions = pinned_versions(context, job)
    if context.has_partition_key:
        check_day_published(job, versions, context.partition_key)
    run_name = f"{job.name}-{context.run_id[:8]}"
    warm = []
    if job.train.warm_start_from_champion and current_champion(mlflow, job) is not None:
        warm = [f"train.init_from=models:/{job.registered_model_name()}@{CHAMPION}"]
    return run_job(context, "train", spec, ray, mlflow, [versions_override(versions), *warm],
                   ["--run-name", run_name]).get_results()


@asset(key="aligned_model", group_name="alignment", kinds={"ray", "pytorch", "mlflow"}, deps=["trained_model"],
       check_specs=[AssetCheckSpec(Check.ALIGN_BOUNDS, asset="aligned_model", blocking=True,
                                   description="KL to the trained model at most checks.max_align_kl; coverage@10 "
                                               "at least checks.min_coverage_ratio of the trained model's")])
def aligned_model(context: AssetExecutionContext, spec: SpecResource, ray: RayResource, mlflow: MLflowResource):
    """A model aligned on list rewards by `ray_jobs.align` (method from the spec, BLADE by default):
    the trained model on its holdout, or with `align.landed_day_rewards` in a nightly run the champion
    on the landed day (`align_overrides`); with `align.enabled: false`, the trained model passed on
    as it is (recorded as skipped)."""
    trained = model_record(context, "trained_model")
    job = spec.load()
    day = context.partition_key if context.has_partition_key else None
    champion = judged_day = None
    if job.align.enabled and day is not None and job.align.landed_day_rewards:
        champion = current_champion(mlflow, job)
        if champion is not None:
            with scrubbed_errors():
                tags = mlflow.client(job).get_model_version(job.registered_model_name(), champion).tags
            judged_day = tags.get(Tag.GATE_DAY)
    overrides = align_overrides(job, trained, champion, judged_day, day)
    skipped = skip_alignment(job, str(upstream(context, AssetKey("trained_model")).get("warm_start", "fresh start")),
                             overrides)
    if skipped:
        context.log.info(f"{skipped}: the trained model goes on unaligned")
        yield MaterializeResult(metadata={"skipped": skipped, **dagster_metadata(trained.to_metadata())})
        yield AssetCheckResult(check_name=Check.ALIGN_BOUNDS, passed=True,
                               metadata={"skipped": "not aligned: the trained model itself"})
        return
    run_name = f"{job.name}-align-{job.align.method}-{context.run_id[:8]}"
    yield from run_job(context, "align", spec, ray, mlflow, overrides, ["--run-name", run_name]).get_results()


def skip_alignment(job: JobSpec, warm_start: str, overrides: list[str]) -> str | None:
    """Why the trained model goes on unaligned, if it does: alignment is off, or it would start from
    the night's trained model on its holdout while that model was warm-started from earlier weights
    (which may have trained, or been aligned, on those items) and `align.allow_seen_rewards` is false
    — a start the align job refuses. None: align (`overrides`)."""
    if not job.align.enabled:
        return "align.enabled is false"
    on_holdout = not any(o.startswith("align.reward_day=") for o in overrides)
    if on_holdout and not job.align.allow_seen_rewards and not warm_start.startswith("fresh start"):
        return (f"the trained model was warm-started ({warm_start}), so it may have seen its holdout rewards "
                "(align.allow_seen_rewards is false)")
    return None


def align_overrides(job: JobSpec, trained: ModelRecord, champion: str | None, judged_day: str | None,
                    day: str | None) -> list[str]:
    """What the align job starts from: the night's trained model, rewarded on its holdout; with
    `align.landed_day_rewards` on a landed `day`, the champion version, rewarded on the day's
    interactions — unless there is none, or the gate that promoted it judged this day or a later one
    (`judged_day`: a rerun or a backfill; its data holds the day). A champion promoted outside the
    nightly runs has no judged day: the align job checks its data. Both read today's tables."""
    fresh = judged_day is None or (day is not None and judged_day < day)
    if job.align.landed_day_rewards and day is not None and champion is not None and fresh:
        start = [f"align.init=models:/{job.registered_model_name()}/{champion}", f"align.reward_day={day}"]
    else:
        start = [f"align.init={trained.model_file}"]
    return [versions_override(trained.delta_versions), *start]


@asset(key="evaluation_report", group_name="evaluation", kinds={"ray", "mlflow"},
       deps=["trained_model", "aligned_model"])
def evaluation_report(context: AssetExecutionContext, spec: SpecResource, ray: RayResource,
                      mlflow: MLflowResource) -> MaterializeResult:
    """The trained model, the aligned model and the current champion, evaluated by one
    `ray_jobs.evaluate` job on the same split data (valid and test, full ranking) over today's
    catalogue (the champion may be older than some items: an HLLM scores them from their text, an ID
    model counts them as unscorable). In a nightly run (partitioned by the landed day), the models
    that served that day — the champion and the previous night's candidate — are also judged on it
    (next-day metrics, beside the leave-one-out figures; the gate still decides on validation)."""
    job = spec.load(*mlflow.spec_overrides())
    trained, aligned = model_record(context, "trained_model"), model_record(context, "aligned_model")
    champion = current_champion(mlflow, job)
    day = context.partition_key if context.has_partition_key else None
    previous = None
    if day is not None and champion is not None:
        previous = previous_candidate(mlflow, job, champion, {str(trained.model_version), str(aligned.model_version)})
    args = evaluation_args(job.registered_model_name(), trained, aligned, champion, day, previous)
    result = run_job(context, "evaluate", spec, ray, mlflow, [versions_override(trained.delta_versions)],
                     args).get_materialize_result()
    evaluation = EvaluateOutcome.from_metadata({k: v.value for k, v in result.metadata.items()})
    report = EvaluationReport(evaluation, {m.model_file: str(m.model_version) for m in (trained, aligned)}, champion)
    extra = {}
    if evaluation.next_day is not None:
        days = next_day_history(context) + [r.to_dict() for r in evaluation.next_day]
        extra["next_day_curve"] = MetadataValue.md(next_day_plot(days))
    files = {r.label(): r.model for r in report.labelled()}  # the model each row is, as detail
    return MaterializeResult(metadata={**result.metadata, **dagster_metadata(report.to_metadata()), **extra,
                                       "metrics": MetadataValue.md(report.table()),
                                       "models": MetadataValue.json(files)})


def evaluation_args(name: str, trained: ModelRecord, aligned: ModelRecord, champion: str | None, day: str | None,
                    previous: str | None) -> list[str]:
    """The evaluate job's arguments: the trained and aligned models (one, when alignment was skipped)
    and the champion on valid and test; on a landed `day`, the models that served it — the champion
    and `previous`, the candidate the night before judged — on that day's interactions."""
    models = [f"trained={trained.model_file}"]
    if aligned.model_file != trained.model_file:
        models.append(f"aligned={aligned.model_file}")
    if champion is not None:
        models.append(f"champion=models:/{name}@{CHAMPION}")
    args = [x for m in models for x in ("--model", m)] + ["--split", "valid", "--split", "test"]
    if day is not None and champion is not None:
        served = [f"champion=models:/{name}/{champion}"] + ([f"candidate=models:/{name}/{previous}"] if previous else [])
        args += ["--next-day", day, *[x for m in served for x in ("--next-day-model", m)]]
    return args


def next_day_history(context: AssetExecutionContext, limit: int = 60) -> list[dict]:
    """The next-day results of this asset's earlier nightly materialisations, oldest first."""
    from dagster import AssetRecordsFilter
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("evaluation_report")), limit=limit).records
    rows = []
    for record in reversed(records):
        meta = record.asset_materialization.metadata if record.asset_materialization else {}
        if "next_day_results" in meta:
            rows += list(meta["next_day_results"].value)
    return rows


def next_day_plot(rows: list[dict]) -> str:
    """Next-day NDCG@10 by day of the champion that served each day and of the candidate beside it,
    as inline markdown (the UI shows it without file access)."""
    import base64
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for role in ("champion", "candidate"):
        points = sorted({r["day"]: r["metrics"].get("ndcg@10", 0.0) for r in rows if r.get("role") == role}.items())
        if points:
            ax.plot([d[5:] for d, _ in points], [v for _, v in points], marker="o", label=f"{role} (served the day)"
                    if role == "champion" else role)
    ax.set_title("next-day NDCG@10 (the day's interactions)")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return f"![next-day NDCG@10](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def previous_candidate(mlflow: MLflowResource, spec: JobSpec, champion: str, tonight: set[str]) -> str | None:
    """The candidate the previous night's gate judged and kept out: the newest version a gate judged
    (tagged with its decision) other than tonight's — None when that is the champion (it was
    promoted: it serves as champion) or there is none; never an older night's."""
    versions = mlflow.client(spec).search_model_versions(f"name='{spec.registered_model_name()}'")
    judged = [int(v.version) for v in versions if Tag.GATE_DECISION in (v.tags or {}) and str(v.version) not in tonight]
    newest = str(max(judged)) if judged else None
    return None if newest == champion else newest


def check_champion_unchanged(mlflow: MLflowResource, spec: JobSpec, judged: str | None) -> None:
    """The alias moves only from the champion the evaluation judged the candidate against: a run
    beside this one (a manual retrain, an earlier report gated late) may have promoted another since."""
    now = current_champion(mlflow, spec)
    if now != judged:
        raise Failure(f"the champion of {spec.registered_model_name()} is version {now}, not version {judged} that the "
                      "evaluation report judged against: nothing promoted (evaluate again, then gate)")


def current_champion(mlflow: MLflowResource, spec: JobSpec) -> str | None:
    from mlflow.exceptions import MlflowException
    try:
        with scrubbed_errors():
            return str(mlflow.client(spec).get_model_version_by_alias(spec.registered_model_name(), CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(exc).lower():
            raise  # an unreachable registry is a failure, not "no champion"
        return None


@asset(key="champion_model", group_name="serving", kinds={"mlflow"}, deps=["evaluation_report"])
def champion_model(context: AssetExecutionContext, spec: SpecResource, mlflow: MLflowResource) -> MaterializeResult:
    """The champion/challenger gate: the best new model takes the registry alias `champion` only when
    it beats the current champion on `gate.metric` (`gate.split`) by more than `gate.margin`; the
    decision and both figures are recorded here and as MLflow tags either way."""
    with scrubbed_errors():
        return decide_and_tag(context, spec.load(*mlflow.spec_overrides()), mlflow)


def decide_and_tag(context: AssetExecutionContext, job: JobSpec, mlflow: MLflowResource) -> MaterializeResult:
    report = EvaluationReport.from_metadata(upstream(context, AssetKey("evaluation_report")))
    decision = decide(report, job.gate)
    client, name = mlflow.client(job), job.registered_model_name()
    if decision.promote:
        check_champion_unchanged(mlflow, job, report.champion_version)
        client.set_registered_model_alias(name, CHAMPION, decision.candidate)
    if decision.candidate is not None:
        tags = {Tag.GATE_DECISION: "promoted" if decision.promote else "kept",
                Tag.GATE_METRIC: decision.metric, Tag.GATE_REASON: decision.reason,
                Tag.GATE_CANDIDATE_METRIC: str(decision.candidate_metric),
                Tag.GATE_CHAMPION_METRIC: str(decision.champion_metric),
                Tag.GATE_CHAMPION_VERSION: str(decision.champion)}
        if context.has_partition_key:  # the last landed day its data holds (a backfill's night: a later one)
            tags[Tag.GATE_DAY] = data_through(job, model_record(context, "trained_model").delta_versions,
                                              context.partition_key)
        version = client.get_model_version(name, decision.candidate)
        for k, v in tags.items():
            client.set_model_version_tag(name, decision.candidate, k, v)
            client.set_tag(version.run_id, k, v)
    serving = decision.candidate if decision.promote else decision.champion
    context.log.info(f"champion gate: {decision.reason}; champion is version {serving}")
    return MaterializeResult(metadata={**{k: v for k, v in decision.as_dict().items() if v is not None},
                                       "model_name": name, "champion_version": MetadataValue.null() if serving is None
                                       else serving, "model_uri": f"models:/{name}@{CHAMPION}"})


@asset(key=asset_key("recommendations"), group_name="serving", kinds={"ray", "delta"}, deps=["champion_model"])
def recommendations(context: AssetExecutionContext, spec: SpecResource, ray: RayResource,
                    mlflow: MLflowResource) -> MaterializeResult:
    """Top-K for every user from the champion (`ray_jobs.recommend`) into gold/recommendations."""
    job = spec.load(*mlflow.spec_overrides())
    champion = upstream(context, AssetKey("champion_model"))
    if champion.get("champion_version") is None:
        raise ValueError("no champion model: the gate has promoted nothing yet")
    trained = model_record(context, "trained_model")
    return run_job(context, "recommend", spec, ray, mlflow, [versions_override(trained.delta_versions)],
                   ["--model", f"models:/{job.registered_model_name()}@{CHAMPION}"]).get_materialize_result()
