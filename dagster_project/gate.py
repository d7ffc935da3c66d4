"""The champion/challenger gate: which model serves. Pure: the evaluation report in, a decision out."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from jobs.contracts import EvaluationReport
from jobs.schema import GateConstraint, GateSpec


@dataclass
class GateDecision:
    promote: bool
    candidate: str | None            # the best new model's registry version
    candidate_metric: float | None
    champion: str | None             # the current champion's version (None: no champion yet)
    champion_metric: float | None
    metric: str
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(report: EvaluationReport, gate: GateSpec) -> GateDecision:
    """Every model of the report measured on the same data version; its candidates (the new models,
    by file, with their registry versions) against its champion. The best candidate on `gate.metric`
    (on `gate.split`) becomes champion when there is none, or when it beats the champion's figure by
    more than `gate.margin` — or, when the gate declares `constraints`, when it meets every one."""
    metric, champion, rows = f"{gate.split}/{gate.metric}", report.champion_version, report.evaluation.models
    new = [r for r in rows if r.model in report.candidates]
    if not new:
        return GateDecision(False, None, None, champion, None, metric, "no new model to judge")
    best = max(new, key=lambda r: r.results[gate.split][gate.metric])
    version, score = report.candidates[best.model], best.results[gate.split][gate.metric]
    if champion is None:
        return GateDecision(True, version, score, None, None, metric, "no champion yet: the best new model becomes champion")
    current = next((r for r in rows if r.model.startswith("models:/") and r.version == champion), None)
    if current is None:
        raise ValueError(f"the evaluation report has no row for champion version {champion}")
    held = current.results[gate.split][gate.metric]
    if version == champion:
        return GateDecision(False, version, score, champion, held, metric, "the best new model is already champion")
    if gate.constraints:
        checks = [(c, figure(best, gate.split, c.metric), figure(current, gate.split, c.metric))
                  for c in gate.constraints]
        failed = [f"{c.describe()}: {mine:.4f} vs {held_:.4f}" for c, mine, held_ in checks if not meets(c, mine, held_)]
        if failed:
            return GateDecision(False, version, score, champion, held, metric, "does not meet the rule: " + "; ".join(failed))
        return GateDecision(True, version, score, champion, held, metric, "meets the rule: " + "; ".join(
            f"{c.describe()}: {mine:.4f} vs {held_:.4f}" for c, mine, held_ in checks))
    if score > held + gate.margin:
        return GateDecision(True, version, score, champion, held, metric,
                            f"{metric} {score:.4f} beats the champion's {held:.4f} by more than {gate.margin}")
    return GateDecision(False, version, score, champion, held, metric,
                        f"{metric} {score:.4f} does not beat the champion's {held:.4f} by more than {gate.margin}")


def meets(c: GateConstraint, candidate: float, champion: float) -> bool:
    """Whether the candidate's figure meets one condition against the champion's."""
    change = candidate - champion
    if c.relative:
        return change >= c.min_change * abs(champion)
    return change >= c.min_change


def figure(row, split: str, metric: str) -> float:
    try:
        return row.results[split][metric]
    except KeyError:
        raise ValueError(f"gate.constraints: {row.label(split)} has no {metric} (its figures: "
                         f"{', '.join(sorted(row.results.get(split, {})))})") from None
