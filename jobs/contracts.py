"""The typed seams between the layers.

What each job returns (`TrainOutcome`, `AlignOutcome`, `EvaluateOutcome`, `RecommendOutcome`), the
shape of an evaluation (`EvalResult`), a run's progress as its checkpoints record it (`RunProgress`),
the models a job hands to the next asset (`ModelRecord`), and the names that jobs, the Dagster
assets, tracking and the command line all spell the same (registry aliases, MLflow tags, asset
checks, metric names).

Jobs report to the Dagster asset that launched them through Pipes metadata: each outcome says what
it reports (`to_metadata`, in Pipes' raw form) and the assets read back what they need
(`from_metadata`, from the plain values of a materialisation), so no asset spells a job's keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

# ----------------------------------------------------------------------------- names

CHAMPION = "champion"      # the registry alias of the model that serves
CHALLENGER = "challenger"  # the alias every newly registered version takes


class Tag:
    """MLflow run and model-version tags."""
    KIND = "llmrec.kind"                    # train | align
    SPEC = "llmrec.spec"                    # the spec's name
    COMMIT = "git.commit"
    DAGSTER_RUN = "dagster.run_id"
    DAGSTER_ASSET = "dagster.asset_key"
    ALIGN_METHOD = "llmrec.align.method"
    ALIGN_INIT = "llmrec.align.init"
    GATE_DECISION = "llmrec.gate.decision"  # promoted | kept (set on the judged version and its run)
    GATE_METRIC = "llmrec.gate.metric"
    GATE_REASON = "llmrec.gate.reason"
    GATE_CANDIDATE_METRIC = "llmrec.gate.candidate_metric"
    GATE_CHAMPION_METRIC = "llmrec.gate.champion_metric"
    GATE_CHAMPION_VERSION = "llmrec.gate.champion_version"
    GATE_DAY = "llmrec.gate.day"            # the landed day of the nightly run whose gate judged the version
    RESUMES = "llmrec.resumes"              # a run resumed from a checkpoint: the MLflow run that wrote it
    RESUMED_BY = "llmrec.resumed_by"        # ... and on that run, the run that resumed it


class Check:
    """The asset checks a job reports through Pipes (blocking: a failed one stops what follows)."""
    BEATS_POPULARITY = "beats_popularity"                   # trained_model
    ALIGN_BOUNDS = "kl_and_coverage_within_bounds"          # aligned_model


def mlflow_metric(name: str) -> str:
    """MLflow metric names allow no '@': `hr@10` -> `hr_at_10`."""
    return name.replace("@", "_at_")


def final_metric(role: str, split: str, name: str) -> str:
    """The MLflow name of a finished run's figure: `final_metric("final", "test", "ndcg@10")` ->
    `final_test/ndcg_at_10` (roles: final, popularity, base)."""
    return f"{role}_{split}/{mlflow_metric(name)}"


# ----------------------------------------------------------------------------- Pipes metadata

def meta(value: Any, kind: str | None = None) -> Any:
    """A Pipes metadata value: scalars bare, everything else with its type (path, json, md, null)."""
    if value is None:
        return {"raw_value": None, "type": "null"}
    if kind is not None:
        return {"raw_value": value, "type": kind}
    if isinstance(value, (dict, list)):
        return {"raw_value": value, "type": "json"}
    return value


def _fields(cls, doc: Mapping[str, Any]) -> dict:
    """The keys of `doc` that are fields of the dataclass `cls` (a record written by an older or a
    newer version keeps loading: unknown keys are ignored, missing ones take their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in doc.items() if k in names}


class Record:
    """A dataclass with a plain-dict form (JSON, MLflow documents, checkpoints)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]):
        return cls(**_fields(cls, doc))


# ----------------------------------------------------------------------------- evaluation

@dataclass
class EvalResult(Record):
    """Full-ranking figures of one model on one split (`ray_jobs.metrics`)."""
    metrics: dict[str, float]                  # users, mrr, hr@k, recall@k, ndcg@k, candidates, unscorable_items
    beyond_accuracy: dict[str, float] = field(default_factory=dict)  # coverage@k, tail_share@k, gini@k, ild@k
    slices: dict[str, dict[str, float]] = field(default_factory=dict)  # cold/warm targets, short/long histories
    split: str | None = None
    versions: dict[str, int] | None = None     # the gold table versions read
    workers: int | None = None                 # Ray tasks the users were spread over

    def flat(self) -> dict[str, float]:
        """Accuracy and beyond-accuracy figures in one mapping."""
        return {**self.metrics, **self.beyond_accuracy}


@dataclass
class NextDayResult(Record):
    """A model judged on one day's interactions (`ray_jobs.next_day`): Recall/NDCG/HR@K over the
    day's items, new-item figures, and the new-item and new-user slices."""
    day: str
    metrics: dict[str, float]
    slices: dict[str, dict[str, float]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- runs

@dataclass
class RunProgress(Record):
    """Counters and history of a training or alignment run, as every checkpoint records them."""
    epoch: int = 0
    step: int = 0
    batch: int = 0                  # batches of the current epoch already trained
    epoch_losses: list[float] = field(default_factory=list)
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    seconds: float = 0.0
    restarts: int = 0               # times the run resumed from a checkpoint
    stopped: str = ""               # epochs | steps | early_stopping | time_budget | interrupted
    history: list[dict] = field(default_factory=list)  # a record per epoch (training) or step (alignment)
    evals: list[dict] = field(default_factory=list)    # alignment: validation records by step
    shipped_step: int = 0           # alignment: the step whose weights the run ships (align.ship)


@dataclass(frozen=True)
class ModelRecord(Record):
    """A model a job produced, as the next asset needs it: its file, where the registry holds it,
    the gold table versions it was trained on and its MLflow run."""
    model_file: str
    model_name: str
    model_version: int | None       # None: logged but not registered
    delta_versions: dict[str, int]
    run_id: str | None = None

    def to_metadata(self) -> dict:
        return {"model_file": meta(self.model_file, "path"), "model_name": self.model_name,
                "model_version": meta(self.model_version), "delta_versions": meta(self.delta_versions, "json"),
                "mlflow_run_id": meta(self.run_id)}

    @classmethod
    def from_metadata(cls, m: Mapping[str, Any]) -> "ModelRecord":
        version = m.get("model_version")
        return cls(str(m["model_file"]), str(m.get("model_name") or ""), None if version is None else int(version),
                   {k: int(v) for k, v in dict(m["delta_versions"]).items()}, m.get("mlflow_run_id"))


@dataclass
class TrainOutcome(Record):
    """What `ray_jobs.train` returns: the model, how the run went, its figures beside popularity."""
    run_name: str
    run_id: str
    model: ModelRecord
    best_epoch: int
    epochs_run: int
    steps: int
    restarts: int
    stopped: str
    seconds: float
    warm_start: str                           # scratch | a warm-start description
    valid: dict[str, float]                   # EvalResult.flat() of the shipped model
    test: dict[str, float]
    popularity_valid: dict[str, float]
    plots: dict[str, str] = field(default_factory=dict)  # name -> local PNG

    @property
    def model_file(self) -> str:
        return self.model.model_file

    @property
    def gain_over_popularity(self) -> float:
        return self.valid["ndcg@10"] - self.popularity_valid["ndcg@10"]


@dataclass
class AlignOutcome(Record):
    """What `ray_jobs.align` returns: the aligned model, the run, start vs aligned on valid and test."""
    run_name: str
    run_id: str
    model: ModelRecord
    method: str
    init: str                                 # the starting model's reference
    steps: int
    restarts: int
    stopped: str
    seconds: float
    first_step: dict | None
    last_step: dict | None
    evals: list[dict]
    results: dict[str, dict[str, float]]      # "base_valid", "base_test", "aligned_valid", "aligned_test" -> figures
    plots: dict[str, str] = field(default_factory=dict)
    shipped: dict | None = None               # the step record of the weights shipped (align.ship); None: the last
    kl_of_shipped: float | None = None        # see shipped_kl

    @property
    def model_file(self) -> str:
        return self.model.model_file

    @property
    def shipped_kl(self) -> float:
        """The whole-list KL of the shipped weights to the start model. A step record's `kl` is that of
        the policy that sampled the step's rollouts — the weights before its update — so the shipped
        weights' KL is the next step's record (`kl_of_shipped`); after the run's last step, where no
        later record exists, the shipped step's own (one update older)."""
        if self.kl_of_shipped is not None:
            return float(self.kl_of_shipped)
        return float((self.shipped or self.last_step or {}).get("kl", 0.0))

    @property
    def coverage_ratio(self) -> float:
        """Aligned coverage@10 over the start model's, on validation."""
        return self.results["aligned_valid"]["coverage@10"] / max(self.results["base_valid"]["coverage@10"], 1e-12)


@dataclass
class ModelRow(Record):
    """One model in an evaluation: its reference, role (trained, aligned, champion, candidate) and
    registry version, and its figures per split (or, for a next-day row, on the day)."""
    model: str                                # what was asked for: models:/NAME@alias or a file
    role: str | None
    name: str
    version: str                              # registry version, or file:<path>
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> EvalResult.flat()
    day: str | None = None                    # next-day rows: the day judged
    metrics: dict[str, float] = field(default_factory=dict)   # next-day rows: the day's figures
    slices: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def registry_version(self) -> str | None:
        return None if self.version.startswith("file:") else self.version

    def label(self, split: str | None = None) -> str:
        """`trained v3 (valid)`: the role and registry version, else the reference."""
        version = self.registry_version
        base = f"{self.role}" + (f" v{version}" if version else "") if self.role else self.model
        return f"{base} ({split})" if split else base


def markdown_table(results: dict[str, dict[str, float]], ks: tuple[int, ...] = (10, 50)) -> str:
    """One row per model (its figures, `EvalResult.flat()`): HR/NDCG @ks, MRR, coverage and tail share @10."""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    extra = ["coverage@10", "tail_share@10"]
    lines = ["| model | " + " | ".join(cols + extra) + " |", "|---" * (len(cols) + len(extra) + 1) + "|"]
    for name, r in results.items():
        vals = [r.get(c, float("nan")) for c in cols + extra]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" if v == v else "–" for v in vals) + " |")
    return "\n".join(lines)


@dataclass
class EvaluateOutcome(Record):
    """What `ray_jobs.evaluate` returns; read back by the champion gate."""
    versions: dict[str, int]
    splits: list[str]
    models: list[ModelRow]
    next_day: list[ModelRow] | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "EvaluateOutcome":
        nd = doc.get("next_day")
        return cls(dict(doc["versions"]), list(doc["splits"]), [ModelRow.from_dict(r) for r in doc["models"]],
                   None if nd is None else [ModelRow.from_dict(r) for r in nd])

    def row(self, model: str) -> ModelRow | None:
        return next((r for r in self.models if r.model == model), None)

    def to_metadata(self) -> dict:
        m = {"results": meta([r.to_dict() for r in self.models], "json"), "splits": meta(self.splits, "json"),
             "delta_versions": meta(self.versions, "json")}
        if self.next_day is not None:
            m["next_day_results"] = meta([r.to_dict() for r in self.next_day], "json")
        return m

    @classmethod
    def from_metadata(cls, m: Mapping[str, Any]) -> "EvaluateOutcome":
        """From asset metadata values (a record from before `splits` was kept: valid and test)."""
        nd = m.get("next_day_results")
        return cls(dict(m["delta_versions"]), list(m.get("splits") or ["valid", "test"]),
                   [ModelRow.from_dict(r) for r in m["results"]], None if nd is None else [ModelRow.from_dict(r) for r in nd])


@dataclass
class EvaluationReport(Record):
    """The evaluation_report asset as the gate reads it: the evaluation, the new models by file with
    their registry versions, and the champion's version at the time (None: no champion yet)."""
    evaluation: EvaluateOutcome
    candidates: dict[str, str]               # model file -> registry version of the new models
    champion_version: str | None

    def versioned(self, row: ModelRow) -> ModelRow:
        """A row with its registry version: a new model's (evaluated as a file) from `candidates`."""
        return dataclasses.replace(row, version=self.candidates[row.model]) if row.model in self.candidates else row

    def labelled(self) -> list[ModelRow]:
        return [self.versioned(r) for r in self.evaluation.models]

    def label(self, row: ModelRow, split: str | None = None) -> str:
        """`aligned v3 (valid)`: the role and registry version, a new model's too."""
        return self.versioned(row).label(split)

    def table(self) -> str:
        """The figures by role and registry version (`trained v3 (valid)`), what the asset shows."""
        return markdown_table({r.label(s): r.results[s] for r in self.labelled() for s in self.evaluation.splits})

    def to_metadata(self) -> dict:
        return {**self.evaluation.to_metadata(), "candidates": meta(self.candidates, "json"),
                "champion_version": meta(self.champion_version)}

    @classmethod
    def from_metadata(cls, m: Mapping[str, Any]) -> "EvaluationReport":
        champion = m.get("champion_version")
        return cls(EvaluateOutcome.from_metadata(m), dict(m["candidates"]),
                   None if champion in (None, "none") else str(champion))


@dataclass
class RecommendOutcome(Record):
    """What `ray_jobs.recommend` returns."""
    table: str                               # the recommendations Delta table
    delta_version: int
    users: int
    users_by_source: dict[str, int]
    rows: int
    k: int
    users_with_fewer_than_k: int
    unscorable_items: int
    model_name: str
    model_version: str
    versions: dict[str, int]                 # the gold table versions read
    preview: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- worker configs

@dataclass
class TrainWorkerConfig(Record):
    """What the training driver hands every Ray Train worker."""
    spec: dict                               # the spec, as JSON
    versions: dict[str, int]                 # the pinned gold table versions
    deepspeed: dict
    run_id: str | None = None                # rank 0 logs to it
    pid_dir: str | None = None               # where each worker writes rank<N>.pid
    init_file: str | None = None             # warm start


@dataclass
class AlignWorkerConfig(Record):
    """What the alignment driver hands every Ray Train worker."""
    spec: dict
    versions: dict[str, int]
    deepspeed: dict
    init: str                                # the starting model's local file
    cache_dir: str | None = None             # its item-embedding cache
    run_id: str | None = None
    pid_dir: str | None = None
