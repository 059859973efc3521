"""One monotonic clock for the whole daemon, optionally running faster than the wall clock
(the demo's `--speedup`): policy time = t0 + (monotonic - t0) * scale."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Clock:
    scale: float = 1.0
    origin: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return self.from_monotonic(time.monotonic())

    def from_monotonic(self, mono: float) -> float:
        """Policy time of a `time.monotonic()` reading."""
        return self.origin + (mono - self.origin) * self.scale

    def wall_seconds(self, policy_seconds: float) -> float:
        """How long `policy_seconds` of policy time take on the wall clock."""
        return policy_seconds / self.scale
