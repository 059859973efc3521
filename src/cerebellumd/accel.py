"""Accelerator power model: states, power per state, transition costs, break-even times.

Pure data and arithmetic. The daemon, the simulated accelerator, the evaluator and the oracle
all cost energy through this one model, which is what makes the oracle a true lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class AccelState(StrEnum):
    OFF = "off"
    SLEEP = "sleep"
    IDLE = "idle"
    ACTIVE = "active"
    WAKING = "waking"
    SUSPENDING = "suspending"
    UNKNOWN = "unknown"


#: The states a policy may command, deepest first.
RESTING_STATES: tuple[AccelState, ...] = (AccelState.OFF, AccelState.SLEEP, AccelState.IDLE)
COMMANDABLE_STATES: tuple[AccelState, ...] = (*RESTING_STATES, AccelState.ACTIVE)
#: Every state the exporter shows (one gauge child each).
ALL_STATES: tuple[AccelState, ...] = tuple(AccelState)


@dataclass(frozen=True, slots=True)
class Transition:
    """Cost of one transition: how long it takes and the energy it draws in total."""

    latency_s: float
    energy_j: float

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.latency_s if self.latency_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class AcceleratorModel:
    """Power (W) per steady state; for each resting state the cost of entering it from
    `active` (`enter`) and of going from it back to `active` (`exit`)."""

    name: str
    power_w: Mapping[AccelState, float]
    enter: Mapping[AccelState, Transition]
    exit: Mapping[AccelState, Transition]
    description: str = ""
    _break_even: dict[AccelState, float] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for state in COMMANDABLE_STATES:
            if state not in self.power_w:
                raise ValueError(f"model {self.name!r}: no power for state {state.value!r}")
        for state in RESTING_STATES:
            if state not in self.enter or state not in self.exit:
                raise ValueError(f"model {self.name!r}: no transition costs for {state.value!r}")
        for state in RESTING_STATES:
            self._break_even[state] = self._compute_break_even(state)

    def exit_latency_s(self, state: AccelState) -> float:
        """Time from `state` until `active`; 0 when already active."""
        if state is AccelState.ACTIVE:
            return 0.0
        return self.exit[state].latency_s

    def next_leg(self, current: AccelState, desired: AccelState) -> tuple[AccelState, AccelState, Transition] | None:
        """The next transition from the steady state `current` toward `desired`: (WAKING or
        SUSPENDING, the state it arrives in, its cost); None when already there.

        The model only costs the edges to and from `active`, so resting -> resting goes through
        `active` (sleep -> off wakes first; off -> sleep boots first), and a transition under way
        is never cut short: a command given meanwhile starts its own leg when this one ends (the
        worst case of a challenge arriving mid-entry is the remaining entry plus the exit). From
        `unknown` (a failed resume) a resting target is entered directly, and a wake is costed as
        a cold start. The evaluator's accelerator and the daemon's simulated driver both move by
        these legs."""
        if current is desired:
            return None
        if current is AccelState.ACTIVE or (current is AccelState.UNKNOWN and desired is not AccelState.ACTIVE):
            return AccelState.SUSPENDING, desired, self.enter[desired]
        return AccelState.WAKING, AccelState.ACTIVE, self.exit[AccelState.OFF if current is AccelState.UNKNOWN
                                                              else current]

    def round_trip_s(self, state: AccelState) -> float:
        if state is AccelState.ACTIVE:
            return 0.0
        return self.enter[state].latency_s + self.exit[state].latency_s

    def gap_energy_j(self, state: AccelState, gap_s: float) -> float:
        """Energy to leave `active`, rest in `state` and be `active` again `gap_s` later.

        `inf` when the round trip does not fit in the gap."""
        if state is AccelState.ACTIVE:
            return self.power_w[AccelState.ACTIVE] * gap_s
        trip = self.round_trip_s(state)
        if gap_s < trip:
            return math.inf
        return (
            self.enter[state].energy_j
            + self.exit[state].energy_j
            + self.power_w[state] * (gap_s - trip)
        )

    def tail_energy_j(self, state: AccelState, span_s: float) -> float:
        """Energy to leave `active` and rest in `state` for the remaining `span_s` (no return)."""
        if state is AccelState.ACTIVE:
            return self.power_w[AccelState.ACTIVE] * span_s
        enter = self.enter[state]
        if span_s < enter.latency_s:
            # Part of the entry is still under way when the span ends.
            return enter.mean_power_w * span_s
        return enter.energy_j + self.power_w[state] * (span_s - enter.latency_s)

    def break_even_s(self, state: AccelState) -> float:
        """Shortest gap for which resting in `state` costs no more than the next shallower
        choice (as the cpuidle governors' target residency)."""
        if state is AccelState.ACTIVE:
            return 0.0
        return self._break_even[state]

    def _compute_break_even(self, state: AccelState) -> float:
        shallower = _shallower(state)
        lo = max(self.round_trip_s(state), self.round_trip_s(shallower))
        p_s, p_sh = self.power_w[state], self.power_w[shallower]
        fixed_s = self.gap_energy_j(state, lo) if math.isfinite(self.gap_energy_j(state, lo)) else None
        fixed_sh = self.gap_energy_j(shallower, lo)
        if fixed_s is None or not math.isfinite(fixed_sh):
            return math.inf
        if fixed_s <= fixed_sh:
            return lo
        if p_s >= p_sh:
            return math.inf
        # Both costs grow linearly beyond `lo`; solve for the crossing point.
        return lo + (fixed_s - fixed_sh) / (p_sh - p_s)

    def deepest_state(
        self, predicted_idle_s: float, latency_budget_s: float, floor: AccelState | None = None
    ) -> AccelState:
        """Deepest resting state that pays off over `predicted_idle_s` and whose exit latency
        fits `latency_budget_s`; `floor` bounds how deep the choice may go."""
        allowed = RESTING_STATES
        if floor is not None:
            allowed = RESTING_STATES[RESTING_STATES.index(floor) :]
        for state in allowed:
            if (
                self.exit_latency_s(state) <= latency_budget_s
                and self.break_even_s(state) <= predicted_idle_s
            ):
                return state
        return AccelState.IDLE


def _shallower(state: AccelState) -> AccelState:
    order = (AccelState.OFF, AccelState.SLEEP, AccelState.IDLE, AccelState.ACTIVE)
    return order[order.index(state) + 1]
