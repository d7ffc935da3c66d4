"""The champion/challenger gate: which model serves. Pure: the evaluation report in, a decision out."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from jobs.contracts import EvaluationReport
from jobs.schema import GateSpec


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
    more than `gate.margin`. With declared `constraints` (a rule), the candidates that meet every one
    against the champion compete, and the best of them on `gate.metric` is promoted; when none
    meets them, the best candidate is kept out with its failed conditions as the reason."""
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
    if gate.constraints:
        return _by_rule(report, gate, new, current, held)
    if version == champion:
        return GateDecision(False, version, score, champion, held, metric, "the best new model is already champion")
    if score > held + gate.margin:
        return GateDecision(True, version, score, champion, held, metric,
                            f"{metric} {score:.4f} beats the champion's {held:.4f} by more than {gate.margin}")
    return GateDecision(False, version, score, champion, held, metric,
                        f"{metric} {score:.4f} does not beat the champion's {held:.4f} by more than {gate.margin}")


def _by_rule(report: EvaluationReport, gate: GateSpec, new: list, current, held: float) -> GateDecision:
    metric, champion = f"{gate.split}/{gate.metric}", report.champion_version

    def conditions(row) -> list[tuple[str, bool]]:
        return [(f"{c.describe()}: {mine:.4f} vs {theirs:.4f}", c.meets(mine, theirs))
                for c in gate.constraints
                for mine, theirs in [(figure(row, gate.split, c.metric), figure(current, gate.split, c.metric))]]
    judged = [(r, conditions(r)) for r in new if report.candidates[r.model] != champion]
    passing = [(r, cs) for r, cs in judged if all(ok for _, ok in cs)]
    if not judged:
        best = max(new, key=lambda r: r.results[gate.split][gate.metric])
        return GateDecision(False, report.candidates[best.model], best.results[gate.split][gate.metric], champion,
                            held, metric, "the best new model is already champion")
    pool = passing or judged
    best, cs = max(pool, key=lambda rc: rc[0].results[gate.split][gate.metric])
    version, score = report.candidates[best.model], best.results[gate.split][gate.metric]
    if passing:
        return GateDecision(True, version, score, champion, held, metric,
                            f"{report.label(best, gate.split)} meets the rule: " + "; ".join(text for text, _ in cs))
    return GateDecision(False, version, score, champion, held, metric,
                        "no new model meets the rule; the best, " + f"{report.label(best, gate.split)}: "
                        + "; ".join(text for text, ok in cs if not ok))


def figure(row, split: str, metric: str) -> float:
    try:
        return row.results[split][metric]
    except KeyError:
        raise ValueError(f"gate.constraints: {row.label(split)} has no {metric} (its figures: "
                         f"{', '.join(sorted(row.results.get(split, {})))})") from None
