"""Which landed day to ingest next: in date order, a re-delivered day again, a missing day waited
for at most `data.landing.missing_day_wait_hours` and then skipped (and ingested as a backfill when
it arrives). Pure: the landing folder's days and what the lake says was ingested in, a plan out —
used by the landing sensor, the nightly schedule and the landed-day asset alike."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date, timedelta

from jobs.lake import ingested_days
from jobs.schema import JobSpec
from spark.sources import LandedFiles, day_fingerprint, landing_days


@dataclass
class LandingPlan:
    day: str | None                    # the day to ingest now (None: nothing to do, or waiting)
    pending: list[str]                 # landed days not ingested as they are now, in date order
    missing: list[str] = field(default_factory=list)     # calendar days never landed before `day`
    skipped: list[str] = field(default_factory=list)     # of them, those waited for long enough
    waiting_for: list[str] = field(default_factory=list)  # of them, those still waited for
    reason: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)  # of every landed day


def arrival(files: LandedFiles) -> float:
    """When a day arrived: its newest file's modification time."""
    return max(os.path.getmtime(f) for f in files.interactions + files.items)


def plan_landing(days: dict[str, LandedFiles], ingested: dict[str, str], root: str, now: float,
                 wait_hours: float) -> LandingPlan:
    """The earliest landed day whose files differ from what was ingested (new, or re-delivered) is
    next — never a later one first. Calendar days after the latest ingested day (or the first landed
    one) and before it that never landed are missing: the day waits for them until `wait_hours` after
    it arrived, then goes ahead with them skipped — once: later days count from it. A missing day that
    lands afterwards is earlier than the latest ingested one: a backfill, ingested at once."""
    fps = {d: day_fingerprint(f, root) for d, f in days.items()}
    pending = [d for d in sorted(days) if ingested.get(d) != fps[d]]
    if not pending:
        return LandingPlan(None, [], reason="every landed day is ingested as it is", fingerprints=fps)
    day = pending[0]
    known = set(days) | set(ingested)
    start = date.fromisoformat(max(ingested) if ingested else min(days))
    gap = (date.fromisoformat(day) - start).days
    missing = [d for d in ((start + timedelta(n)).isoformat() for n in range(1, max(gap, 0))) if d not in known]
    if not missing:
        return LandingPlan(day, pending, fingerprints=fps, reason=f"{day} is the earliest day to ingest")
    waited = (now - arrival(days[day])) / 3600
    if waited < wait_hours:
        return LandingPlan(None, pending, missing, [], missing, fingerprints=fps,
                           reason=f"{day} waits for missing day(s) {', '.join(missing)} "
                                  f"({waited:.1f} of {wait_hours:g} hours)")
    return LandingPlan(day, pending, missing, missing, [], fingerprints=fps,
                       reason=f"{day} goes ahead after {waited:.1f} hours without day(s) {', '.join(missing)}")


def landing_plan(spec: JobSpec, now: float) -> LandingPlan:
    """The plan for a spec's landing folder and lake (an empty plan without a landing folder)."""
    landing = spec.data.landing
    if landing is None:
        return LandingPlan(None, [], reason="data.landing is not configured")
    return plan_landing(landing_days(landing), ingested_days(spec), landing.path, now, landing.missing_day_wait_hours)
