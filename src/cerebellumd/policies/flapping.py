"""Flap figures over a decision timeline: how often the target changes, and how many wake
cycles served nothing (woke the accelerator and no demand or hold ever used it).

Both are what a policy tuner watches besides energy and readiness: a policy that saves a few
joules by flapping wears relays and rails, and unserved wakes are pure cost. Pure: a timeline
in, figures out; the evaluator feeds its decisions, the daemon a bounded recent window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ..accel import AccelState

_HOUR_S = 3600.0
AWAKE_STATES: frozenset[AccelState] = frozenset({AccelState.ACTIVE})


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """The target from `time` on, and whether anything needed the accelerator at that step
    (an active demand or an awake hold/lease)."""

    time: float
    target: AccelState
    served: bool = False


@dataclass(frozen=True, slots=True)
class WakeCycle:
    start: float
    end: float  # the timeline's end when still awake
    served: bool

    @property
    def duration_s(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class FlapFigures:
    duration_s: float
    state_changes: int
    changes_per_hour: float
    peak_changes_per_hour: int  # most changes inside any one-hour window
    wake_cycles: int
    unserved_wakes: int
    unserved_fraction: float
    short_cycles: int  # wake cycles shorter than `short_cycle_s`

    @property
    def wakes_per_hour(self) -> float:
        return self.wake_cycles * _HOUR_S / self.duration_s if self.duration_s > 0 else 0.0


def wake_cycles(
    points: Sequence[TimelinePoint],
    end: float | None = None,
    awake: frozenset[AccelState] = AWAKE_STATES,
) -> list[WakeCycle]:
    """Intervals the target stayed in `awake`, each with whether any step inside served."""
    cycles: list[WakeCycle] = []
    start: float | None = None
    served = False
    for p in points:
        if p.target in awake:
            if start is None:
                start, served = p.time, False
            served = served or p.served
        elif start is not None:
            cycles.append(WakeCycle(start, p.time, served))
            start = None
    if start is not None:
        last = end if end is not None else points[-1].time
        cycles.append(WakeCycle(start, max(start, last), served))
    return cycles


def flap_figures(
    points: Iterable[TimelinePoint],
    *,
    start: float | None = None,
    end: float | None = None,
    short_cycle_s: float = 0.0,
    awake: frozenset[AccelState] = AWAKE_STATES,
) -> FlapFigures:
    """Figures over `points` (in time order). `start`/`end` bound the observed span (default:
    the first and last point); a change is a point whose target differs from the previous."""
    pts = list(points)
    if not pts:
        return FlapFigures(0.0, 0, 0.0, 0, 0, 0, 0.0, 0)
    t0 = pts[0].time if start is None else start
    t1 = pts[-1].time if end is None else end
    duration = max(0.0, t1 - t0)
    changes = [b.time for a, b in pairwise(pts) if b.target is not a.target]
    cycles = wake_cycles(pts, t1, awake)
    unserved = sum(1 for c in cycles if not c.served)
    return FlapFigures(
        duration_s=duration,
        state_changes=len(changes),
        changes_per_hour=len(changes) * _HOUR_S / duration if duration > 0 else 0.0,
        peak_changes_per_hour=_peak_in_window(changes, _HOUR_S),
        wake_cycles=len(cycles),
        unserved_wakes=unserved,
        unserved_fraction=unserved / len(cycles) if cycles else 0.0,
        short_cycles=sum(1 for c in cycles if c.duration_s < short_cycle_s),
    )


def _peak_in_window(times: Sequence[float], window_s: float) -> int:
    """Most events in any half-open window [t, t + window_s) (two pointers over sorted times)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
