"""Entry risk: how much of its time the policy may spend where an unannounced challenge would
come late because the accelerator is entering a resting state.

A transition under way is never cut short (accel.py `next_leg`). A challenge that arrives `x`
seconds into the entry of a state waits `enter - x` for the entry and then the state's exit, so
when `enter + exit` is over the latency budget, the first `enter + exit - budget` seconds of the
entry are a window in which an unannounced challenge is late (orin_nano's SC7 sleep: 1.5 s enter,
1.0 s exit, a 1.5 s budget: the first 1.0 s). Only the exit counts against the configured budget
when choosing a depth (calibration.py; counting the whole entry would rule sleep out, and an
urban drive pays that at every stop), so these windows are the price of sleeping.

Unannounced challenges arrive independently of what the accelerator does, so the share of them
that arrives inside such windows is the share of time the windows cover (Poisson arrivals see
time averages). Challenges made late this way, as a share of all challenges, are therefore
`window time / time * unannounced share of challenges`. The policy keeps that under
`late_share` with a token bucket of window seconds: it refills at `late_share / unannounced
share` seconds per second and holds at most `burst_s`; an entry with a window takes its window's
seconds, and an entry that finds too few rests shallower until they have refilled. The
unannounced share is learned from the challenges seen (the onsets of waking demands; unannounced:
a critical demand, or any that began while no anticipation was in force) from a prior.

Where unannounced challenges are a small share of all (an urban drive with a surprise now and
then), the refill is several times what the policy spends and nothing changes; where they are
most of them (surprises at one a minute on a motorway), entries are spaced out.

Pure: no I/O, no clock; `CerebellumFirst` keeps an `EntryRisk` in its state. The counts are
persisted (`to_dict`, the state file's `entry_risk` section) so that a restart starts from the
share the car has seen, not from the prior; the bucket is not (a restart starts it full). The
counts hold at most `REMEMBERED` challenges' worth (older ones fade in proportion), so that a
car that moves to another world, or a daemon that has run for months, learns it within a few
drives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..accel import AcceleratorModel, AccelState
from .numbers import is_finite_number

#: The bucket refills at most this fast (a share of 0 unannounced would be an infinite rate).
_MIN_SHARE = 1e-3
#: Challenges' worth of counts an `EntryRisk` keeps (the share, scaled down to this many).
REMEMBERED = 200.0


@dataclass(frozen=True, slots=True)
class EntryRiskParams:
    #: Challenges made late by a mid-entry arrival, as a share of all challenges; 0 disables.
    late_share: float = 0.005  # [policy] mid_entry_late_share: half of a 0.99 readiness target's misses
    burst_s: float = 2.0  # [policy] mid_entry_burst_ms: window seconds that may be spent back to back
    prior_challenges: float = 5.0  # [policy] mid_entry_prior_challenges: weight of the prior share
    prior_unannounced_share: float = 0.3  # [policy] mid_entry_prior_unannounced_share

    @property
    def enabled(self) -> bool:
        return self.late_share > 0


@dataclass(frozen=True, slots=True)
class EntryRisk:
    """Challenges seen, and the bucket: `tokens_s` window seconds left at time `at` (before the
    first entry: full)."""

    challenges: float = 0.0
    unannounced: float = 0.0
    tokens_s: float = 0.0
    at: float = -math.inf

    def to_dict(self) -> dict[str, float]:
        """The counts, persistable: at most `REMEMBERED` challenges' worth, the share kept."""
        scale = min(1.0, REMEMBERED / self.challenges) if self.challenges > 0 else 1.0
        return {"challenges": round(self.challenges * scale, 3), "unannounced": round(self.unannounced * scale, 3)}

    def unannounced_share(self, p: EntryRiskParams) -> float:
        prior = p.prior_challenges
        return (self.unannounced + p.prior_unannounced_share * prior) / (self.challenges + prior)

    def refill_per_s(self, p: EntryRiskParams) -> float:
        return p.late_share / max(self.unannounced_share(p), _MIN_SHARE)

    def available_s(self, now: float, p: EntryRiskParams) -> float:
        """Window seconds an entry may take at `now` (unlimited when disabled)."""
        if not p.enabled:
            return math.inf
        if not math.isfinite(self.at):
            return p.burst_s
        return min(p.burst_s, self.tokens_s + self.refill_per_s(p) * max(0.0, now - self.at))

    def allows(self, window_s: float, now: float, p: EntryRiskParams) -> bool:
        """Whether an entry with `window_s` may start at `now`. A window longer than the bucket
        holds is paid from a full one and leaves a debt, so that it is not ruled out for good."""
        return window_s <= 0 or self.available_s(now, p) >= min(window_s, p.burst_s) - 1e-9

    def available_at(self, window_s: float, now: float, p: EntryRiskParams) -> float | None:
        """When an entry with `window_s` will be allowed (None: now)."""
        need = min(window_s, p.burst_s)
        have = self.available_s(now, p)
        if window_s <= 0 or have >= need - 1e-9:
            return None
        return now + (need - have) / self.refill_per_s(p)


def parse_entry_risk(raw: object) -> EntryRisk | None:
    """Persisted counts (`EntryRisk.to_dict`) read back with a full bucket, or None where they do
    not read back: not an object, a count that is no finite non-negative number, more
    unannounced challenges than challenges."""
    if not isinstance(raw, dict):
        return None
    challenges, unannounced = raw.get("challenges"), raw.get("unannounced")
    if not (is_finite_number(challenges) and is_finite_number(unannounced)) or not 0 <= unannounced <= challenges:
        return None
    return EntryRisk(challenges=float(challenges), unannounced=float(unannounced))


def count_challenge(risk: EntryRisk, now: float, unannounced: bool, p: EntryRiskParams) -> EntryRisk:
    """A waking demand began. The bucket is settled first: its refill so far ran at the old share."""
    if not p.enabled:
        return risk
    settled = risk.available_s(now, p)
    challenges, late = risk.challenges + 1, risk.unannounced + (1 if unannounced else 0)
    fade = min(1.0, REMEMBERED / challenges)
    return EntryRisk(challenges * fade, late * fade, settled, now)


def spend(risk: EntryRisk, now: float, window_s: float, p: EntryRiskParams) -> EntryRisk:
    if not p.enabled or window_s <= 0:
        return risk
    return replace(risk, tokens_s=risk.available_s(now, p) - window_s, at=now)


def entry_window_s(model: AcceleratorModel, state: AccelState, budget_s: float) -> float:
    """The first seconds of an entry into `state` in which a challenge arriving would wait past
    `budget_s` (the rest of the entry, then the exit); 0 for a state entered at once."""
    if state is AccelState.ACTIVE:
        return 0.0
    enter = model.enter[state].latency_s
    return max(0.0, min(enter, enter + model.exit_latency_s(state) - budget_s))
