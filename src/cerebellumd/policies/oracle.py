"""The oracle: the least accelerator energy that still meets every deadline, given the future.

It knows the *need intervals* (the accelerator must be `active` from each event's start +
deadline to its end) and costs everything with the same `AcceleratorModel` as the policies and
the simulated accelerator, so its energy is a true lower bound for 100 % readiness.

Between two need intervals the accelerator leaves `active` at the end of the first and must be
`active` again at the start of the next: the gaps are independent, so the dynamic programme
over gaps reduces to the cheapest feasible resting choice per gap (staying active included),
plus a head (from the initial state to the first need) and a tail (after the last need).
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..accel import RESTING_STATES, AcceleratorModel, AccelState

#: Resting choices in a gap, active first so that ties keep the accelerator awake (fewer cycles).
_CHOICES: tuple[AccelState, ...] = (AccelState.ACTIVE, AccelState.IDLE, AccelState.SLEEP, AccelState.OFF)


@dataclass(frozen=True, slots=True)
class OraclePlan:
    """The optimal schedule: total accelerator energy, wake cycles, whether every need could
    be met from the initial state, and the commands as (time, target) pairs."""

    energy_j: float
    wake_cycles: int
    feasible: bool
    commands: tuple[tuple[float, AccelState], ...]


def need_intervals(events: Iterable[tuple[float, float, float]], duration_s: float) -> list[tuple[float, float]]:
    """(start_s, end_s, deadline_s) events -> merged, sorted (due, end) intervals in which the
    accelerator must be active, clipped to [0, duration_s]."""
    raw = []
    for start, end, deadline in events:
        due = min(start + deadline, duration_s)
        raw.append((due, min(max(end, due), duration_s)))
    raw.sort()
    merged: list[tuple[float, float]] = []
    for a, b in raw:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _best_gap(model: AcceleratorModel, gap_s: float) -> tuple[float, AccelState]:
    best = min(_CHOICES, key=lambda s: (model.gap_energy_j(s, gap_s), _CHOICES.index(s)))
    return model.gap_energy_j(best, gap_s), best


def _best_tail(model: AcceleratorModel, span_s: float) -> tuple[float, AccelState]:
    best = min(_CHOICES, key=lambda s: (model.tail_energy_j(s, span_s), _CHOICES.index(s)))
    return model.tail_energy_j(best, span_s), best


def plan(
    needs: Sequence[tuple[float, float]],
    model: AcceleratorModel,
    duration_s: float,
    initial: AccelState = AccelState.IDLE,
) -> OraclePlan:
    """Optimal schedule for sorted, disjoint `needs` over [0, duration_s]."""
    if initial not in (*RESTING_STATES, AccelState.ACTIVE):
        raise ValueError(f"initial state must be steady, got {initial.value!r}")
    p_active = model.power_w[AccelState.ACTIVE]
    commands: list[tuple[float, AccelState]] = []
    energy, wakes, feasible = 0.0, 0, True
    if not needs:
        return _no_needs(model, duration_s, initial)

    # Head: reach `active` at the first due time from the initial state.
    first = needs[0][0]
    if initial is AccelState.ACTIVE:
        e, rest = _best_gap(model, first)
        energy += e
        if rest is not AccelState.ACTIVE:
            commands += [(0.0, rest), (first - model.exit_latency_s(rest), AccelState.ACTIVE)]
            wakes += 1
    else:
        lat = model.exit_latency_s(initial)
        stay = model.power_w[initial] * (first - lat) + model.exit[initial].energy_j if first >= lat else math.inf
        via_e, via_rest = _best_gap(model, first - lat) if first >= lat else (math.inf, AccelState.ACTIVE)
        via = model.exit[initial].energy_j + via_e
        if not math.isfinite(min(stay, via)):
            # The first deadline comes before the accelerator can possibly wake: wake at once.
            feasible = False
            energy += model.exit[initial].energy_j
            commands.append((0.0, AccelState.ACTIVE))
        elif stay <= via:
            energy += stay
            commands.append((first - lat, AccelState.ACTIVE))
        elif via_rest is AccelState.ACTIVE:
            energy += via
            commands.append((0.0, AccelState.ACTIVE))
        else:
            # Change resting state at once (through `active`, as the model's transitions go),
            # then wake from the new state in time.
            energy += via
            commands += [(0.0, via_rest), (first - model.exit_latency_s(via_rest), AccelState.ACTIVE)]
        wakes += 1

    # Needs and the gaps between them.
    for i, (a, b) in enumerate(needs):
        energy += p_active * (b - a)
        if i + 1 < len(needs):
            nxt = needs[i + 1][0]
            e, rest = _best_gap(model, nxt - b)
            energy += e
            if rest is not AccelState.ACTIVE:
                commands += [(b, rest), (nxt - model.exit_latency_s(rest), AccelState.ACTIVE)]
                wakes += 1

    # Tail: cheapest way to spend the rest.
    last = needs[-1][1]
    e, rest = _best_tail(model, duration_s - last)
    energy += e
    if rest is not AccelState.ACTIVE:
        commands.append((last, rest))
    return OraclePlan(energy, wakes, feasible, tuple(commands))


def _no_needs(model: AcceleratorModel, duration_s: float, initial: AccelState) -> OraclePlan:
    if initial is AccelState.ACTIVE:
        e, rest = _best_tail(model, duration_s)
        cmds = () if rest is AccelState.ACTIVE else ((0.0, rest),)
        return OraclePlan(e, 0, True, cmds)
    stay = model.power_w[initial] * duration_s
    lat = model.exit_latency_s(initial)
    best_e: float = stay
    best_cmds: tuple[tuple[float, AccelState], ...] = ()
    if duration_s >= lat:
        for rest in RESTING_STATES:
            if rest is initial:
                continue
            e = model.exit[initial].energy_j + model.tail_energy_j(rest, duration_s - lat)
            if e < best_e:
                best_e, best_cmds = e, ((0.0, rest),)
    # A pass through `active` on the way to a deeper state is no wake cycle for a policy.
    return OraclePlan(best_e, 0, True, best_cmds)
