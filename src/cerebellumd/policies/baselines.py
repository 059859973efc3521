"""Baseline policies the evaluator compares against, on the same `step` interface.

- `AlwaysOn`: never sleeps (the energy ceiling).
- `Timeout`: wakes on any demand, anticipatory ones included, and autosuspends to one fixed
  state after a fixed idle time, as Linux runtime PM does with `autosuspend_delay_ms`.
The oracle needs the future and lives in `oracle.py`.
"""

from __future__ import annotations

from dataclasses import replace

from ..accel import AcceleratorModel, AccelState
from .cerebellum import CerebellumFirst, PolicyState
from .types import Decision, Inputs, PolicyParams


class AlwaysOn:
    name = "always_on"

    def __init__(self, params: PolicyParams, model: AcceleratorModel) -> None:
        self._inner = CerebellumFirst(params, model)

    def initial_state(self, now: float, target: AccelState = AccelState.ACTIVE) -> PolicyState:
        return self._inner.initial_state(now, AccelState.ACTIVE)

    def step(self, state: PolicyState, inputs: Inputs, now: float) -> tuple[PolicyState, Decision]:
        new_state, decision = self._inner.step(state, inputs, now)
        new_state = replace(new_state, target=AccelState.ACTIVE, target_since=state.target_since)
        return new_state, replace(
            decision, target=AccelState.ACTIVE, reason="always_on", changed=False, wake=False
        )


class Timeout:
    name = "timeout"

    def __init__(
        self,
        params: PolicyParams,
        model: AcceleratorModel,
        idle_timeout_s: float = 30.0,
        rest_state: AccelState = AccelState.SLEEP,
    ) -> None:
        self._inner = CerebellumFirst(params, model)
        self.idle_timeout_s = idle_timeout_s
        self.rest_state = rest_state

    def initial_state(self, now: float, target: AccelState = AccelState.IDLE) -> PolicyState:
        return self._inner.initial_state(now, target)

    def step(self, state: PolicyState, inputs: Inputs, now: float) -> tuple[PolicyState, Decision]:
        new_state, decision = self._inner.step(state, inputs, now)
        any_demand = bool(decision.active_demands)
        last_end = new_state.last_demand_end
        if any_demand:
            target, reason = AccelState.ACTIVE, f"demand:{decision.active_demands[0]}"
        elif state.target is AccelState.ACTIVE and (
            last_end is None or now - last_end < self.idle_timeout_s
        ):
            target, reason = AccelState.ACTIVE, "autosuspend_delay"
        elif state.target is AccelState.ACTIVE:
            target, reason = self.rest_state, "autosuspend"
        else:
            target, reason = state.target, "suspended"
        changed = target is not state.target
        wake = changed and target is AccelState.ACTIVE
        new_state = replace(
            new_state,
            target=target,
            target_since=now if changed else state.target_since,
            wake_active=any_demand,
            last_demand_end=(now if state.wake_active and not any_demand else state.last_demand_end),
            wake_times=(*new_state.wake_times, now) if wake else state.wake_times,
            reason=reason,
        )
        return new_state, replace(decision, target=target, reason=reason, changed=changed, wake=wake)
