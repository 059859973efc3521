"""Where a policy's accelerator energy went: `cerebellumd evaluate --breakdown`.

The simulated accelerator logs every joule it charges with its state and time span
(`SimAccelerator.charges`); the evaluator logs each change of the reason behind the policy's
target (`PolicyRun.reasons`: the decision's reason, or the decision path's filter). This splits
the first by the second, pro rata where a reason changes inside a span, so each (reason, state)
gets its seconds and joules, and the joules sum to the run's accelerator energy. Beside the
oracle's (one reason, "oracle"), it shows what each reason costs above the lower bound: the
question a policy tuner asks first.

Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from ..accel import AccelState

#: The reason of what a run did before its first decision (the initial state).
BEFORE_FIRST_DECISION = "start"


@dataclass(frozen=True)
class Share:
    reason: str
    state: str
    seconds: float
    energy_j: float

    def as_dict(self) -> dict[str, str | float]:
        return {"reason": self.reason, "state": self.state, "seconds": round(self.seconds, 3),
                "energy_j": round(self.energy_j, 3)}


def breakdown(charges: Sequence[tuple[float, float, AccelState, float]],
              reasons: Sequence[tuple[float, str]], default: str = BEFORE_FIRST_DECISION) -> list[Share]:
    """(reason, state) shares of `charges` under `reasons` (time-sorted (time, reason) changes;
    empty: every charge is `default`'s), most energy first."""
    times = [t for t, _ in reasons]
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    joules: dict[tuple[str, str], float] = defaultdict(float)

    def reason_at(i: int) -> str:
        return reasons[i][1] if i >= 0 else default

    for start, end, state, energy in charges:
        i = bisect_right(times, start) - 1
        span = end - start
        if span <= 0:  # an instant transition: all of it under the reason at its time
            joules[(reason_at(i), state.value)] += energy
            continue
        t = start
        while t < end:
            until = min(end, times[i + 1]) if i + 1 < len(times) else end
            key = (reason_at(i), state.value)
            seconds[key] += until - t
            joules[key] += energy * ((until - t) / span)
            t, i = until, i + 1
    shares = [Share(reason, state, seconds[(reason, state)], joules[(reason, state)])
              for reason, state in set(seconds) | set(joules)]
    return sorted(shares, key=lambda s: (-s.energy_j, -s.seconds, s.reason, s.state))


def by_reason(shares: Sequence[Share]) -> dict[str, float]:
    """Joules per reason, whatever the state."""
    out: dict[str, float] = defaultdict(float)
    for share in shares:
        out[share.reason] += share.energy_j
    return dict(out)
