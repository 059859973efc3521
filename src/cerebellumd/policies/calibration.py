"""Self-calibrating readiness: the latency budget for unannounced challenges, learned from the
policy's own late wakes (in the spirit of cpuidle's TEO governor, which corrects its state
choice from the idle durations it mispredicted).

Pure: no I/O, no clock. `CerebellumFirst` keeps a `Calibration` in its state and calls
`tighten` when a wake for an unannounced challenge came late (or its consumer reports that a
challenge it served on time allowed less than the deadline the wake counted on), `relax` at its
timer.

- Untightened (`budget_s is None`): the configured `latency_budget_s` bounds the *exit* latency
  of the resting state, as before calibration existed.
- Tightened: the budget is what the late wake showed the challenge allowed (its wake latency
  minus its lateness) less `margin_s`, and it bounds the *worst case* of a challenge that
  arrives while the accelerator enters the state: the whole entry plus the exit.
- After `relax_after_s` without a late wake the budget grows by `relax_step_s`, once per
  `relax_after_s`; when it reaches the configured budget calibration is back to untightened.

The state is a small frozen value: the daemon can export `budget_s` and persist `to_dict(now)`
(with the clean stretch run so far, which a restore continues).

With entry risk on (policies/entry_risk.py, the default), `CerebellumFirst` tightens only for a
challenge that allowed less than the configured budget by more than `margin_s`; a late wake whose
challenge allowed the configured budget arrived mid-entry, and is only counted (`note_late`):
keeping such arrivals rare is entry risk's job.

Probation (`probation_s`, `[policy] budget_probation_s`): a policy that has never met an
unannounced challenge has only the config's word for what such a challenge allows. Until it
has, it rests no deeper than idle for `probation_s` seconds of rest (counted only while the
probation is what holds it at idle), so that the first unannounced challenge is met from idle
and its consumer's report can tighten the budget before a wake from sleep comes late. The first
unannounced challenge met whose configured deadline tests the budget ends it (`trusted`), as
does any tightening; so does the time running out. `trusted` and the time used are persisted: a
car pays the probation once, not at every start.

Only what the world taught is persisted: a challenge that allowed *less* than the configured
budget by more than `margin_s` (`deadline_lesson`). A tightening whose challenges all allowed
about the configured budget says only that one arrived while an entry was under way (the
consumer's "allowed" falls short of the deadline by the detection delay, a few tens of ms). That
is a coincidence of timing, no likelier in the next drive than in this one. It holds for the
rest of the drive and is not carried across a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .numbers import is_finite_number


@dataclass(frozen=True, slots=True)
class CalibrationParams:
    enabled: bool = True
    margin_s: float = 0.1  # below what a late wake showed the challenge allowed
    relax_after_s: float = 900.0  # a clean stretch this long relaxes one step
    relax_step_s: float = 0.1
    floor_s: float = 0.0  # never learn a budget below this
    #: Until the world has confirmed the configured budget, rest no deeper than idle for this
    #: many seconds of rest (the time an unannounced challenge would find the accelerator
    #: resting deeper); the first unannounced challenge served confirms it sooner.
    probation_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Calibration:
    """What the policy learned. `budget_s` None: untightened (the configured budget)."""

    budget_s: float | None = None
    since: float = -math.inf  # time of the last tighten or relax step (monotonic s)
    late_wakes: int = 0
    worst_lateness_s: float = 0.0
    first_late_at: float | None = None  # when the first lesson (late or served report) tightened: adaptation start
    #: Since the last untightening, a lesson showed a challenge allowing less than the configured budget.
    deadline_lesson: bool = False
    #: Seconds of rest spent held at idle by the probation so far; and whether the configured
    #: budget is trusted (probation over: served, or `probation_s` of rest without a challenge).
    probation_used_s: float = 0.0
    trusted: bool = False

    def on_probation(self, p: CalibrationParams) -> bool:
        return p.enabled and not self.trusted and self.budget_s is None and self.probation_used_s < p.probation_s

    def effective(self, configured_s: float) -> tuple[float, bool]:
        """(latency budget, whether the worst case of a mid-entry challenge counts)."""
        if self.budget_s is None:
            return configured_s, False
        return self.budget_s, True

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """Persistable form. Times are monotonic seconds of the run that learned them, so none is
        kept as such: `clean_s` is how far the clean stretch toward the next relax step had run
        at `now` (the moment of saving). A restored calibration continues that stretch instead of
        restarting it; otherwise a car whose drives are all shorter than `relax_after_s` would
        never relax a budget it once tightened."""
        kept = self.budget_s if self.deadline_lesson else None  # a mid-entry coincidence stays with its drive
        out: dict[str, Any] = {"budget_s": kept, "late_wakes": self.late_wakes,
                               "worst_lateness_s": self.worst_lateness_s,
                               "trusted": self.trusted, "probation_used_s": round(self.probation_used_s, 3)}
        if now is not None and kept is not None and math.isfinite(self.since):
            out["clean_s"] = max(0.0, now - self.since)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], now: float) -> Calibration:
        budget = data.get("budget_s")
        return cls(
            budget_s=None if budget is None else float(budget),
            since=now - float(data.get("clean_s", 0.0)),
            late_wakes=int(data.get("late_wakes", 0)),
            worst_lateness_s=float(data.get("worst_lateness_s", 0.0)),
            # A restored lesson was learned before: adaptation counts from the restore.
            first_late_at=None if budget is None else now,
            deadline_lesson=budget is not None,  # only those are persisted
            probation_used_s=float(data.get("probation_used_s", 0.0)),
            trusted=bool(data.get("trusted", False)),
        )


def tighten(
    cal: Calibration, now: float, allowed_s: float, lateness_s: float, p: CalibrationParams, count: bool = True,
    configured_s: float = math.inf,
) -> Calibration:
    """A wake for an unannounced challenge came `lateness_s` late; the challenge allowed
    `allowed_s` from its onset. Idempotent for the same evidence (`count`: a new late wake).
    `configured_s`: the configured budget; a challenge that allowed less by more than `margin_s`
    taught a deadline."""
    if not p.enabled:
        return cal
    learned = max(p.floor_s, allowed_s - p.margin_s)
    budget = learned if cal.budget_s is None else min(cal.budget_s, learned)
    return Calibration(
        budget_s=budget,
        since=now,
        late_wakes=cal.late_wakes + (1 if count else 0),
        worst_lateness_s=max(cal.worst_lateness_s, lateness_s),
        first_late_at=cal.first_late_at if cal.first_late_at is not None else now,
        deadline_lesson=(cal.deadline_lesson and cal.budget_s is not None) or allowed_s < configured_s - p.margin_s,
        probation_used_s=cal.probation_used_s,
        trusted=True,  # the world has spoken: the learned budget rules from here
    )


def note_late(cal: Calibration, lateness_s: float, p: CalibrationParams, count: bool = True) -> Calibration:
    """A late wake that teaches no budget: it is counted, the budget stays."""
    if not p.enabled:
        return cal
    return replace(cal, late_wakes=cal.late_wakes + (1 if count else 0),
                   worst_lateness_s=max(cal.worst_lateness_s, lateness_s))


def relax(cal: Calibration, now: float, configured_s: float, p: CalibrationParams) -> Calibration:
    """One relax step per clean `relax_after_s` (call at any time; it applies the steps due)."""
    if cal.budget_s is None:
        return cal
    if not math.isfinite(cal.since):  # a budget given without a time: its clean stretch starts now
        return replace(cal, since=now)
    if now - cal.since < p.relax_after_s - 1e-9:
        return cal
    steps = math.floor((now - cal.since) / p.relax_after_s + 1e-9)
    budget = cal.budget_s + steps * p.relax_step_s
    since = cal.since + steps * p.relax_after_s
    if budget >= configured_s - 1e-9:
        return replace(cal, budget_s=None, since=since, deadline_lesson=False)
    return replace(cal, budget_s=budget, since=since)


def next_relax(cal: Calibration, p: CalibrationParams) -> float | None:
    if cal.budget_s is None or not p.enabled or not math.isfinite(cal.since):
        return None
    return cal.since + p.relax_after_s


def parse_calibration(raw: Any, now: float) -> Calibration | None:
    """A persisted calibration (`Calibration.to_dict`) read back, or None where it does not read
    back: not an object, a budget, lateness, clean stretch or probation that is no finite
    non-negative number, a count that is no non-negative integer, a `trusted` that is no boolean."""
    if not isinstance(raw, dict):
        return None
    budget = raw.get("budget_s")
    late = raw.get("late_wakes", 0)
    worst = raw.get("worst_lateness_s", 0.0)
    numbers = [v for v in (budget, worst, raw.get("clean_s"), raw.get("probation_used_s")) if v is not None]
    if any(not is_finite_number(v) or v < 0 for v in numbers):
        return None
    if isinstance(late, bool) or not isinstance(late, int) or late < 0:
        return None
    if not isinstance(raw.get("trusted", False), bool):
        return None
    return Calibration.from_dict(raw, now)
