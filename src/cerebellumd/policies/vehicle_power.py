"""The parked car, pure: one vehicle power state fused from the ignition sources, and the 12 V
energy budget that decides when the gateway may power down (docs/parked.md).

Standard library only, no I/O and no clock: the daemon (`daemon/vehicle_power.py`) hands in
samples and policy time; tests and benches step these with made-up time.

Power state (named as COVESA VSS `Vehicle.LowVoltageSystemState`: OFF, ACC, ON, START):

- an ignition *line* (GPIO or the MCU heartbeat's KL15 flag) with separate on and off
  thresholds (hysteresis: a reading between them keeps the last level);
- CAN sources: a power-mode signal (its raw values mapped to states in config) or a KL15 bit.
  Once one of them has been seen fresh the fusion *latches* to CAN: the line then only brings
  a key-on (a rising edge after the last CAN sample), never keeps the car "on", because a real
  ignition line lags key-off by about 30 s (openpilot `ignition_state.py`). A CAN source silent
  for `can_timeout_s` (openpilot's 2 s ignition-message timeout) no longer says "on";
- NM bus activity: a wake validated *after* the last CAN sample counts as `accessory` (the bus
  is awake, ignition unknown); with no line and no CAN source, NM awake = accessory, NM asleep
  = off.

The fused state changes only when the new value held for `on_debounce_s` (towards accessory,
on, cranking) or `off_debounce_s` (towards off). Line edges and CAN value changes are counted
(`edges`), a candidate that did not survive its debounce is counted (`debounced`), a CAN source
going stale is counted (`stale`). The accelerator itself is never cycled by this module: the
state is a policy input and the policy's `min_dwell` bounds how fast the accelerator follows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from .types import Sample

_EPS = 1e-9


class PowerState(StrEnum):
    UNDEFINED = "undefined"
    OFF = "off"
    ACCESSORY = "accessory"
    ON = "on"
    CRANKING = "cranking"


#: Our names -> COVESA VSS `Vehicle.LowVoltageSystemState` allowed values.
VSS_LOW_VOLTAGE_SYSTEM_STATE: Mapping[PowerState, str] = {
    PowerState.UNDEFINED: "UNDEFINED", PowerState.OFF: "OFF", PowerState.ACCESSORY: "ACC",
    PowerState.ON: "ON", PowerState.CRANKING: "START",
}
#: Accepted names in a power-mode value map: ours and the VSS ones (LOCK is off for us).
STATE_NAMES: Mapping[str, PowerState] = {
    **{s.value: s for s in PowerState if s is not PowerState.UNDEFINED},
    "OFF": PowerState.OFF, "LOCK": PowerState.OFF, "ACC": PowerState.ACCESSORY, "ON": PowerState.ON,
    "START": PowerState.CRANKING,
}


@dataclass(frozen=True, slots=True)
class FusionParams:
    line_on_threshold: float = 0.5
    line_off_threshold: float = 0.5
    line_timeout_s: float = 1.5
    can_timeout_s: float = 2.0
    on_debounce_s: float = 0.05
    off_debounce_s: float = 1.0
    #: Raw power-mode value -> state. A value not in the map is a bad value (counted, ignored).
    power_modes: Mapping[int, PowerState] = field(default_factory=dict)
    flap_window_s: float = 10.0
    flap_edges: int = 6


@dataclass(frozen=True, slots=True)
class FusionInputs:
    """`line`, `can_ignition` and `power_mode` are the latest samples (or None, never seen);
    `nm_awake_since` the start of the current NM network mode (None: bus asleep), and
    `nm_known` whether NM is followed at all."""

    line: Sample | None = None
    can_ignition: Sample | None = None
    power_mode: Sample | None = None
    nm_awake_since: float | None = None
    nm_known: bool = False


@dataclass(frozen=True, slots=True)
class FusionState:
    state: PowerState = PowerState.UNDEFINED
    since: float = -math.inf
    source: str = "none"
    candidate: PowerState | None = None
    candidate_since: float = -math.inf  # evidence time of the pending candidate (sample time)
    raw_line: bool | None = None  # the line after its thresholds
    line_rose_at: float | None = None
    can_latched: bool = False
    can_last_at: float | None = None  # time of the last fresh CAN sample
    can_last_state: PowerState | None = None
    can_stale: bool = False
    last_can_value: float | None = None
    edge_times: tuple[float, ...] = ()
    flapping: bool = False


@dataclass(frozen=True, slots=True)
class FusionStep:
    state: PowerState
    changed: bool
    previous: PowerState
    source: str
    #: When the evidence of the new state was first seen (a key-on's start, for readiness).
    evidence_at: float
    edges: Mapping[str, int] = field(default_factory=dict)  # source -> raw edges this step
    debounced: bool = False  # a pending candidate was dropped before its debounce elapsed
    went_stale: bool = False  # the latched CAN source just timed out
    bad_power_mode: float | None = None  # a power-mode value not in the map
    flapping_started: bool = False


class PowerFusion:
    def __init__(self, params: FusionParams) -> None:
        if params.line_on_threshold < params.line_off_threshold:
            raise ValueError("line_on_threshold must not be below line_off_threshold")
        self.params = params

    def initial_state(self) -> FusionState:
        return FusionState()

    def step(self, st: FusionState, inp: FusionInputs, now: float) -> tuple[FusionState, FusionStep]:
        p = self.params
        edges: dict[str, int] = {}
        edge_times = [t for t in st.edge_times if now - t < p.flap_window_s]

        # -- the line: thresholds with hysteresis, freshness
        line = inp.line if inp.line is not None and now - inp.line.time <= p.line_timeout_s + _EPS else None
        raw_line: bool | None
        if line is None:
            raw_line = None
        elif line.value >= p.line_on_threshold and line.value > p.line_off_threshold:
            raw_line = True
        elif line.value <= p.line_off_threshold and line.value < p.line_on_threshold:
            raw_line = False
        else:
            raw_line = st.raw_line  # between the thresholds: keep the last level
        rose_at = st.line_rose_at
        if raw_line is not None and st.raw_line is not None and raw_line != st.raw_line:
            edges["line"] = 1
            edge_times.append(now)
        if raw_line and not st.raw_line:
            rose_at = line.time if line is not None else now

        # -- CAN: the power mode first, else the KL15 bit; fresh within can_timeout_s
        bad: float | None = None
        can_state: PowerState | None = None
        can_at: float | None = None
        can_value: float | None = None
        pm = inp.power_mode
        if pm is not None and now - pm.time <= p.can_timeout_s + _EPS:
            mapped = p.power_modes.get(int(pm.value)) if float(pm.value).is_integer() else None
            if mapped is None:
                bad = pm.value
            else:
                can_state, can_at, can_value = mapped, pm.time, pm.value
        ign = inp.can_ignition
        if can_state is None and ign is not None and now - ign.time <= p.can_timeout_s + _EPS:
            can_state = PowerState.ON if ign.value != 0 else PowerState.OFF
            can_at, can_value = ign.time, float(ign.value != 0)
        latched, last_at, last_state = st.can_latched, st.can_last_at, st.can_last_state
        if can_state is not None:
            latched, last_at, last_state = True, can_at, can_state
            if st.last_can_value is not None and can_value != st.last_can_value:
                edges["can"] = 1
                edge_times.append(now)
        # A bad value (or a sample we could not use) holds the last good CAN state until it too
        # is older than the timeout.
        holding = (latched and can_state is None and last_at is not None
                   and now - last_at <= p.can_timeout_s + _EPS)
        stale = latched and can_state is None and not holding
        went_stale = stale and not st.can_stale

        # -- the candidate and its evidence time
        cand: PowerState | None
        source: str
        evidence = now
        nm_since = inp.nm_awake_since
        if latched:
            after_can = last_at if last_at is not None else -math.inf
            if can_state is not None:
                cand, source, evidence = can_state, "can", can_at if can_at is not None else now
            elif raw_line and rose_at is not None and rose_at > after_can:
                cand, source, evidence = PowerState.ON, "line", rose_at  # key-on before CAN speaks
            elif holding and last_state is not None:
                cand, source = last_state, "can"
            elif nm_since is not None and nm_since > after_can:
                cand, source, evidence = PowerState.ACCESSORY, "nm", nm_since
            else:
                cand, source = PowerState.OFF, "can_timeout"
        elif raw_line is not None:
            cand, source = (PowerState.ON if raw_line else PowerState.OFF), "line"
            evidence = line.time if line is not None else now
        elif inp.nm_known:
            cand, source = (PowerState.ACCESSORY if nm_since is not None else PowerState.OFF), "nm"
            evidence = nm_since if nm_since is not None else now
        else:
            cand, source = None, st.source

        # -- debounce: on and off times differ
        state, since, changed = st.state, st.since, False
        pending, pending_since = st.candidate, st.candidate_since
        debounced = False
        if cand is None or cand is st.state:
            debounced = pending is not None and pending is not st.state
            pending, pending_since = None, -math.inf
        else:
            if pending is not cand:
                debounced = pending is not None and pending is not st.state
                pending, pending_since = cand, min(evidence, now)
            need = p.off_debounce_s if cand is PowerState.OFF else p.on_debounce_s
            if now - pending_since >= need - _EPS:
                state, since, changed = cand, pending_since, True
                pending, pending_since = None, -math.inf

        flapping = len(edge_times) >= p.flap_edges
        new = FusionState(
            state=state, since=since, source=source if changed or cand is not None else st.source,
            candidate=pending, candidate_since=pending_since, raw_line=raw_line, line_rose_at=rose_at,
            can_latched=latched, can_last_at=last_at, can_last_state=last_state,
            can_stale=stale,
            last_can_value=can_value if can_value is not None else st.last_can_value,
            edge_times=tuple(edge_times), flapping=flapping,
        )
        step = FusionStep(
            state=state, changed=changed, previous=st.state, source=new.source,
            evidence_at=since if changed else st.since, edges=edges, debounced=debounced,
            went_stale=went_stale, bad_power_mode=bad, flapping_started=flapping and not st.flapping,
        )
        return new, step


# -- the 12 V energy budget ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetParams:
    """Defaults: openpilot `system/hardware/power_monitoring.py` (see docs/parked.md)."""

    capacity_wh: float = 30.0  # CAR_BATTERY_CAPACITY_uWh = 30e6
    restore_floor_wh: float = 3.0  # openpilot resets a low or missing budget to capacity / 10
    charge_rate_w: float = 45.0  # CAR_CHARGING_RATE_W
    voltage_cutoff_v: float = 11.8  # VBATT_PAUSE_CHARGING, on the low-passed voltage
    voltage_tau_s: float = 45.0  # CAR_VOLTAGE_LOW_PASS_K = 0.011: "LPF gain for 45s tau"
    voltage_delay_s: float = 30.0  # VOLTAGE_SHUTDOWN_DELAY_S
    min_parked_s: float = 300.0  # DELAY_SHUTDOWN_TIME_S
    max_parked_s: float = 30 * 3600.0  # MAX_TIME_OFFROAD_S


@dataclass(frozen=True, slots=True)
class BudgetState:
    budget_wh: float
    last_t: float | None = None
    voltage_lpf: float | None = None
    low_since: float | None = None
    parked_since: float | None = None
    power_down: bool = False
    reason: str = "start"
    debited_wh: float = 0.0  # this parked period
    credited_wh: float = 0.0  # this drive


@dataclass(frozen=True, slots=True)
class BudgetInputs:
    """`driving`: the power state is on or cranking (credit); `parked`: off or accessory (debit);
    neither (state undefined): nothing is integrated. `draw_w`: every domain's draw, the gateway
    included. `battery_w`: measured battery power (V x I, + = charging) where a signal exists."""

    driving: bool
    parked: bool
    draw_w: float
    battery_w: float | None = None
    voltage_v: float | None = None


class BatteryBudget:
    def __init__(self, params: BudgetParams) -> None:
        self.params = params

    def initial_state(self, restored_wh: float | None) -> BudgetState:
        """A restored budget below the floor (or none) restarts at the floor, as openpilot does."""
        p = self.params
        start = p.restore_floor_wh if restored_wh is None else max(p.restore_floor_wh, restored_wh)
        return BudgetState(budget_wh=min(start, p.capacity_wh))

    def step(self, st: BudgetState, inp: BudgetInputs, now: float) -> BudgetState:
        p = self.params
        dt = 0.0 if st.last_t is None else max(0.0, now - st.last_t)
        budget, debited, credited = st.budget_wh, st.debited_wh, st.credited_wh
        if inp.driving:
            rate = inp.battery_w if inp.battery_w is not None else p.charge_rate_w
            budget += rate * dt / 3600
            credited += max(rate, 0.0) * dt / 3600
            debited = 0.0
        elif inp.parked:
            used = max(inp.draw_w, 0.0) * dt / 3600
            budget -= used
            debited += used
            credited = 0.0
        budget = min(max(budget, 0.0), p.capacity_wh)
        # The low-pass filter: exact for any step length (k = 1 - exp(-dt/tau)).
        lpf = st.voltage_lpf
        if inp.voltage_v is not None:
            if lpf is None:
                lpf = inp.voltage_v
            else:
                k = 1.0 - math.exp(-dt / p.voltage_tau_s) if p.voltage_tau_s > 0 else 1.0
                lpf += k * (inp.voltage_v - lpf)
        low_since = st.low_since
        if lpf is not None and lpf < p.voltage_cutoff_v and inp.parked:
            low_since = now if low_since is None else low_since
        else:
            low_since = None
        parked_since = (now if st.parked_since is None else st.parked_since) if inp.parked else None
        power_down, reason = self._decide(budget, low_since, parked_since, inp, now)
        return replace(st, budget_wh=budget, last_t=now, voltage_lpf=lpf, low_since=low_since,
                       parked_since=parked_since, power_down=power_down, reason=reason,
                       debited_wh=debited, credited_wh=credited)

    def _decide(self, budget: float, low_since: float | None, parked_since: float | None,
                inp: BudgetInputs, now: float) -> tuple[bool, str]:
        p = self.params
        if inp.driving:
            return False, "driving"
        if parked_since is None:
            return False, "undefined"
        if low_since is not None and now - low_since >= p.voltage_delay_s - _EPS:
            return True, "voltage"  # does not wait for min_parked_s (openpilot neither)
        parked = now - parked_since
        if budget <= 0:
            return (True, "budget") if parked >= p.min_parked_s - _EPS else (False, "min_parked")
        if parked >= p.max_parked_s - _EPS:
            return True, "max_parked"
        return False, "parked"

    def next_deadline(self, st: BudgetState, inp: BudgetInputs) -> float | None:
        """When the budget runs out at the current draw, parked (for the state and the evaluator)."""
        if not inp.parked or inp.draw_w <= 0 or st.last_t is None:
            return None
        return st.last_t + st.budget_wh * 3600 / inp.draw_w


__all__ = [
    "STATE_NAMES", "VSS_LOW_VOLTAGE_SYSTEM_STATE", "BatteryBudget", "BudgetInputs", "BudgetParams", "BudgetState",
    "FusionInputs", "FusionParams", "FusionState", "FusionStep", "PowerFusion", "PowerState",
]


def vehicle_nm_activity(mode_is_network: bool, last_frame_at: float | None, now: float, timeout_s: float) -> bool:
    """Whether NM says the *vehicle* is awake: the network is up and some other node was heard
    within the NM timeout. The gateway's own network request (a garage-mode lease on a silent,
    parked bus) keeps NM up too, but is no evidence of a key-on."""
    return mode_is_network and last_frame_at is not None and now - last_frame_at < timeout_s
