"""The simulated accelerator of the evaluator and of `replay`: obeys commands with the profile
model's latencies and energies and records what it did. Stdlib only (no numpy), so `replay`
works on a runtime-only install."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..accel import AcceleratorModel, AccelState, Transition

# -- simulated accelerator -------------------------------------------------------------------


@dataclass
class _Transition:
    kind: AccelState  # WAKING or SUSPENDING
    start: float
    end: float
    to: AccelState
    energy_j: float


@dataclass
class SimAccelerator:
    """Obeys commands with the model's latencies and energies; records what it did."""

    model: AcceleratorModel
    state: AccelState
    since: float = 0.0
    desired: AccelState = field(init=False)
    transition: _Transition | None = None
    energy_j: float = 0.0
    segments: list[tuple[float, float, AccelState]] = field(default_factory=list)
    active: list[list[float]] = field(default_factory=list)  # [start, end] of active periods
    woken: list[bool] = field(default_factory=list)  # per active period: began with a wake
    wake_latencies: list[float] = field(default_factory=list)
    # Failed resumes: `resume_fails(i)` says whether resume number i (0-based) fails; a failed
    # one waits `retry_after_s` (the ladder's wake deadline) before a second exit succeeds.
    resume_fails: Callable[[int], bool] | None = None
    retry_after_s: float = 0.0
    resumes: int = 0
    failed_resumes: int = 0
    _wake_requested: float | None = None
    commands: list[tuple[float, AccelState]] = field(default_factory=list)  # (time, new target)
    # Every joule charged, where and in what state: (start, end, state, joules); end == start for
    # an instant transition. Sums to `energy_j` (sim/breakdown.py splits it by the policy's reasons).
    charges: list[tuple[float, float, AccelState, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.desired = self.state
        if self.state is AccelState.ACTIVE:
            self.active.append([self.since, math.inf])
            self.woken.append(False)

    def command(self, t: float, target: AccelState) -> None:
        self.advance(t)
        if target is AccelState.ACTIVE and self.desired is not AccelState.ACTIVE:
            self._wake_requested = t
        if target is not self.desired:
            self.commands.append((t, target))
        self.desired = target
        if self.transition is None:
            self._start(t)

    def next_change(self) -> float | None:
        return self.transition.end if self.transition is not None else None

    def advance(self, t: float) -> None:
        while self.transition is not None and self.transition.end <= t:
            tr = self.transition
            self.transition = None
            self._charge(tr.start, tr.end, tr.kind, tr.energy_j)
            self.segments.append((tr.start, tr.end, tr.kind))
            self._arrive(tr.to, tr.end)
            self._start(tr.end)

    def finish(self, t_end: float) -> None:
        self.advance(t_end)
        if self.transition is not None:  # cut short by the end of the run
            tr = self.transition
            span = tr.end - tr.start
            self._charge(tr.start, t_end, tr.kind,
                         tr.energy_j * (t_end - tr.start) / span if span > 0 else tr.energy_j)
            self.segments.append((tr.start, t_end, tr.kind))
        else:
            self._charge(self.since, t_end, self.state, self.model.power_w[self.state] * (t_end - self.since))
            self.segments.append((self.since, t_end, self.state))
        if self.active and self.active[-1][1] == math.inf:
            self.active[-1][1] = t_end

    def _arrive(self, state: AccelState, t: float) -> None:
        self.state, self.since = state, t
        if state is AccelState.ACTIVE:
            self.active.append([t, math.inf])
            self.woken.append(True)
            if self._wake_requested is not None and self.desired is AccelState.ACTIVE:
                self.wake_latencies.append(t - self._wake_requested)
                self._wake_requested = None

    def _start(self, t: float) -> None:
        """Begin the transition from the current steady state toward `desired`."""
        while self.desired is not self.state:
            current = self.state
            self._charge(self.since, t, current, self.model.power_w[current] * (t - self.since))
            if t > self.since:
                self.segments.append((self.since, t, current))
            leg = self.model.next_leg(current, self.desired)
            assert leg is not None
            kind, to, cost = leg
            if current is AccelState.ACTIVE:
                self.active[-1][1] = t
            else:
                index, self.resumes = self.resumes, self.resumes + 1
                if self.resume_fails is not None and self.resume_fails(index):
                    self.failed_resumes += 1
                    cost = self._failed_resume(current, cost)
            if cost.latency_s > 0:
                self.state, self.since = kind, t
                self.transition = _Transition(kind, t, t + cost.latency_s, to, cost.energy_j)
                return
            self._charge(t, t, kind, cost.energy_j)
            self._arrive(to, t)

    def _charge(self, start: float, end: float, state: AccelState, joules: float) -> None:
        self.energy_j += joules
        if joules or end > start:
            self.charges.append((start, end, state, joules))

    def _failed_resume(self, current: AccelState, exit_: Transition) -> Transition:
        """One waking transition that covers the failed attempt and the successful retry.

        The first exit draws its energy but never reaches `active`; the watchdog notices at
        its wake deadline (not before the exit would have finished), the accelerator rests at
        `current`'s power meanwhile, and the retry is a second full exit."""
        wait = max(self.retry_after_s, exit_.latency_s)
        energy = exit_.energy_j + self.model.power_w[current] * (wait - exit_.latency_s) + exit_.energy_j
        return Transition(wait + exit_.latency_s, energy)

    def energy_at(self, t: float) -> float:
        """Energy spent up to `t` (after `advance(t)`): a running transition counts pro rata."""
        self.advance(t)
        tr = self.transition
        if tr is not None:
            span = tr.end - tr.start
            return self.energy_j + (tr.energy_j * (t - tr.start) / span if span > 0 else 0.0)
        return self.energy_j + self.model.power_w[self.state] * max(0.0, t - self.since)

    def is_active_at(self, t: float) -> bool:
        return any(a <= t + 1e-6 and t <= b for a, b in self.active)
