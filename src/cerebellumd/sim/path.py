"""The daemon's decision path around `step`, on the evaluator's clock (sim/evaluate.py).

The daemon does not only call `CerebellumFirst.step`: NM (daemon/nm_service.py) clamps the
accelerator to its deepest state and sets `quiet_bus` in prepare-bus-sleep and bus sleep, and
pauses the daemon in bus sleep (resuming with the samples dropped and the policy reset); the
vehicle power part (daemon/vehicle_power.py) fuses the ignition into `Inputs.parked`, keeps the
12 V budget and holds the accelerator `off` once the gateway may power down; the wake watchdog
(daemon/lifecycle.py) climbs the escalation ladder when a wake is late and, when it gives up,
keeps the accelerator in the backend's safe state; holds and leases outrank demands. This
module steps the same pure parts (policies/nm.py, policies/vehicle_power.py,
policies/escalation.py) with the same inputs at the evaluator's ticks, and tells the loop when
each of their timers fires so the event-driven loop steps exactly then.

Differences from the daemon, on purpose and small: bus activity is taken per tick (a frame
period of the virtual vehicle is at most 100 ms, NM timers are seconds); the budget is
stepped at the evaluator's steps with the mean draw since the last one (exact in energy); the
watchdog's alarm clears when a new awake hold starts (the daemon also clears on an operator
command, which a scenario cannot give).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..accel import AcceleratorModel, AccelState
from ..config import Config
from ..policies.escalation import Ladder, LadderState, Phase, Rung
from ..policies.nm import NETWORK_MODES, CanNm, NmInputs, NmMode, NmState
from ..policies.types import Hold, HoldMode, PolicyParams, Sample
from ..policies.vehicle_power import (
    BatteryBudget,
    BudgetInputs,
    BudgetState,
    FusionInputs,
    FusionState,
    PowerFusion,
    PowerState,
    vehicle_nm_activity,
)
from .accelerator import SimAccelerator
from .events_config import HoldAt

QUIET_MODES = frozenset({NmMode.PREPARE_BUS_SLEEP, NmMode.BUS_SLEEP})
_DRIVING = frozenset({PowerState.ON, PowerState.CRANKING})
_PARKED = frozenset({PowerState.OFF, PowerState.ACCESSORY})
KEEP_AWAKE_REASONS = ("hold", "lease", "critical_demand", "nm_request")


def as_hold(h: HoldAt, index: int) -> Hold:
    return Hold(id=f"scenario-{index}", owner=h.owner, reason=h.reason, mode=h.mode,
                expires_at=h.at_s + h.duration_s, priority=h.priority)


@dataclass(frozen=True)
class DecisionPath:
    """Which parts of the daemon's path run, built from the config and the scenario."""

    config: Config
    params: PolicyParams
    model: AcceleratorModel
    holds: tuple[HoldAt, ...] = ()
    nm: CanNm | None = None
    fusion: PowerFusion | None = None
    budget: BatteryBudget | None = None
    ladder: Ladder | None = None
    other_watts: float = 0.0
    start_budget_wh: float | None = None  # the 12 V budget at t=0 (default: [battery] capacity_wh)
    #: False: the policy alone decides (the day's baselines, "today's cars"): no NM clamp or
    #: pause, no power-down clamp, no watchdog alarm; NM, fusion and the budget still run.
    clamps: bool = True

    @classmethod
    def build(cls, config: Config, params: PolicyParams, model: AcceleratorModel,
              holds: Sequence[HoldAt] = ()) -> DecisionPath:
        nm = CanNm(config.nm.params()) if config.nm.enabled else None
        vp = config.vehicle_power
        fusion = PowerFusion(vp.params()) if vp.enabled else None
        budget = BatteryBudget(config.battery.params()) if vp.enabled and config.battery.enabled else None
        esc = config.accelerator.escalation
        ladder = Ladder(esc.spec()) if esc.enabled else None
        other = sum(d.watts or 0.0 for d in config.power.domains if d.source == "constant")
        return cls(config, params, model, tuple(holds), nm, fusion, budget, ladder, other)

    @property
    def signals_used(self) -> set[str]:
        """Signals whose value changes may change the path's decisions."""
        c = self.config
        names: set[str | None] = set()
        if self.nm is not None:
            names |= {c.nm.ignition_signal, c.nm.battery_signal}
        if self.fusion is not None:
            vp = c.vehicle_power
            names |= {vp.line_signal, vp.can_ignition_signal, vp.power_mode_signal}
        if self.budget is not None:
            names |= {c.battery.voltage_signal, c.battery.current_signal}
        return {n for n in names if n is not None}

    def timeouts(self) -> tuple[float, ...]:
        """Silences after which a source stops counting (the fusion's CAN and line timeouts)."""
        if self.fusion is None:
            return ()
        return (self.fusion.params.can_timeout_s, self.fusion.params.line_timeout_s)

    def hold_times(self) -> list[float]:
        return sorted({t for h in self.holds for t in (h.at_s, h.at_s + h.duration_s)})


@dataclass
class PathRun:
    """One policy run's path state and what it observed (reported per policy)."""

    path: DecisionPath
    bus_spans: Sequence[tuple[float, float]]  # (first, last) frame times of continuous traffic
    max_age: dict[str, float]
    nm_state: NmState | None = None
    fusion_state: FusionState | None = None
    budget_state: BudgetState | None = None
    ladder_state: LadderState = field(default_factory=LadderState)
    paused: bool = False
    samples_since: float = -math.inf
    reset_policy: bool = False
    alarm: str | None = None
    alarm_at: float | None = None
    power_down: str | None = None
    keyon_at: float | None = None
    keyon_ready_s: list[float] = field(default_factory=list)
    keep_awake: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEEP_AWAKE_REASONS, 0))
    keep_awake_log: list[tuple[float, str, str]] = field(default_factory=list)
    _awake_reasons: dict[str, str] = field(default_factory=dict)
    nm_transitions: dict[str, int] = field(default_factory=dict)
    escalations: dict[str, int] = field(default_factory=dict)
    alarms: int = 0
    power_downs: dict[str, int] = field(default_factory=dict)
    budget_curve: list[tuple[float, float]] = field(default_factory=list)
    budget_min_wh: float | None = None
    local_request: bool = False
    _nm_awake_since: float | None = None
    _last_t: float | None = None
    _last_energy: float = 0.0
    _want: AccelState | None = None
    parked_s: float = 0.0
    parked_accel_j: float = 0.0
    gateway_off_s: float = 0.0

    def __post_init__(self) -> None:
        p = self.path
        if p.nm is not None:
            self.nm_state = p.nm.initial_state(0.0)
        if p.fusion is not None:
            self.fusion_state = p.fusion.initial_state()
        if p.budget is not None:
            start = p.start_budget_wh if p.start_budget_wh is not None else p.config.battery.capacity_wh
            self.budget_state = p.budget.initial_state(start)

    # -- views ----------------------------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        return self.nm_state is not None and self.nm_state.mode in QUIET_MODES

    @property
    def power_state(self) -> PowerState | None:
        return self.fusion_state.state if self.fusion_state is not None else None

    @property
    def parked(self) -> bool:
        return self.power_state is PowerState.OFF

    def holds(self, now: float) -> tuple[Hold, ...]:
        return tuple(as_hold(h, i) for i, h in enumerate(self.path.holds)
                     if h.at_s <= now + 1e-9 and h.at_s + h.duration_s > now)

    def _value(self, samples: dict[str, Sample], name: str | None, now: float) -> float | None:
        if name is None or name not in samples:
            return None
        s = samples[name]
        return None if now - s.time > self.max_age.get(name, math.inf) + 1e-9 else s.value

    def _activity(self, after: float, now: float) -> float | None:
        """Time of the last bus traffic in (after, now], None if none."""
        last = None
        for first, end in self.bus_spans:
            if first > now + 1e-9:
                break
            if end > after + 1e-9:
                last = min(end, now)
        return last

    # -- the steps ------------------------------------------------------------------------------

    def before(self, now: float, samples: dict[str, Sample], acc: SimAccelerator,
               demand_needs_bus: bool) -> bool:
        """Step fusion, NM and the budget at `now`; returns whether the policy steps (not while
        the daemon is paused in bus sleep). Sets `reset_policy` when the daemon resumes."""
        p, cfg = self.path, self.path.config
        self._budget(now, samples, acc)  # the interval since the last step, in the state it was in
        holds = self.holds(now)
        awake_hold = any(h.mode is HoldMode.AWAKE for h in holds)
        if self.fusion_state is not None and p.fusion is not None:
            vp = cfg.vehicle_power
            nm_known = p.nm is not None and vp.use_nm
            fin = FusionInputs(line=samples.get(vp.line_signal or ""),
                               can_ignition=samples.get(vp.can_ignition_signal or ""),
                               power_mode=samples.get(vp.power_mode_signal or ""),
                               nm_awake_since=self._nm_awake_since, nm_known=nm_known)
            before_state = self.fusion_state.state
            self.fusion_state, fstep = p.fusion.step(self.fusion_state, fin, now)
            if fstep.changed:
                if fstep.state is not PowerState.OFF and before_state is PowerState.OFF:
                    self.keyon_at = fstep.evidence_at
                elif fstep.state is PowerState.OFF:
                    self.keyon_at = None
                if fstep.state is not PowerState.OFF and self.power_down is not None:
                    self.power_down = None
        if self.nm_state is not None and p.nm is not None:
            if self.fusion_state is not None:
                ignition = None if self.fusion_state.state is PowerState.UNDEFINED else \
                    self.fusion_state.state in _DRIVING
            else:
                value = self._value(samples, cfg.nm.ignition_signal, now)
                ignition = None if value is None else value != 0
            self.local_request = awake_hold or (demand_needs_bus and not self.paused)
            last_nm = self.nm_state.since if self._last_t is None else self._last_t
            frame_at = self._activity(last_nm, now)
            nin = NmInputs(can_activity=frame_at is not None, ignition=ignition,
                           battery_v=self._value(samples, cfg.nm.battery_signal, now),
                           local_request=self.local_request)
            if frame_at is not None and frame_at < now - 1e-9:
                # the traffic stopped before now: NM saw its last frame then
                self._nm_step(nin, frame_at)
                nin = NmInputs(ignition=ignition, battery_v=nin.battery_v, local_request=self.local_request)
            self._nm_step(nin, now)
            assert self.path.nm is not None
            awake = vehicle_nm_activity(self.nm_state.mode in NETWORK_MODES, self.nm_state.last_activity, now,
                                        self.path.nm.params.timeout_s)
            if awake and self._nm_awake_since is None:
                self._nm_awake_since = now
            elif not awake:
                self._nm_awake_since = None
            if p.clamps:
                asleep = self.nm_state.mode is NmMode.BUS_SLEEP
                if asleep and not self.paused:
                    self.paused = True
                elif not asleep and self.paused:
                    self.paused = False
                    self.reset_policy = True
                    self.samples_since = now
        self._last_t = now
        return not self.paused

    def _nm_step(self, nin: NmInputs, t: float) -> None:
        assert self.nm_state is not None and self.path.nm is not None
        self.nm_state, decision = self.path.nm.step(self.nm_state, nin, t)
        if decision.changed:
            key = decision.mode.value
            self.nm_transitions[key] = self.nm_transitions.get(key, 0) + 1

    def _budget(self, now: float, samples: dict[str, Sample], acc: SimAccelerator) -> None:
        energy = acc.energy_at(now)
        dt = 0.0 if self._last_t is None else now - self._last_t
        accel_w = (energy - self._last_energy) / dt if dt > 0 else 0.0
        gateway_w = 0.0 if self.power_down is not None else self.path.other_watts
        if self.parked and dt > 0:
            self.parked_s += dt
            self.parked_accel_j += energy - self._last_energy
            if self.power_down is not None:
                self.gateway_off_s += dt
        elif self.power_down is not None and dt > 0:
            self.gateway_off_s += dt
        self._last_energy = energy
        if self.budget_state is None or self.path.budget is None:
            return
        cfg = self.path.config.battery
        state = self.power_state
        voltage = self._value(samples, cfg.voltage_signal, now)
        current = self._value(samples, cfg.current_signal, now)
        inp = BudgetInputs(driving=state in _DRIVING, parked=state in _PARKED, draw_w=accel_w + gateway_w,
                           battery_w=voltage * current if voltage is not None and current is not None else None,
                           voltage_v=voltage)
        before = self.budget_state
        self.budget_state = self.path.budget.step(before, inp, now)
        wh = self.budget_state.budget_wh
        if not self.budget_curve or abs(self.budget_curve[-1][1] - wh) > 1e-6 or now - self.budget_curve[-1][0] > 60:
            self.budget_curve.append((now, wh))
        self.budget_min_wh = wh if self.budget_min_wh is None else min(self.budget_min_wh, wh)
        if self.budget_state.power_down and not before.power_down:
            reason = self.budget_state.reason
            self.power_downs[reason] = self.power_downs.get(reason, 0) + 1
            if self.path.clamps:
                self.power_down = reason

    def filtered(self, target: AccelState) -> tuple[AccelState, str | None]:
        """The actuator's target filters (NM clamp, power-down, the watchdog's alarm): the target
        and the filter that set it (None: the policy's target stands)."""
        why = None
        if not self.path.clamps:
            return target, why
        if self.quiet:
            target, why = self.path.params.deepest_state, "path:quiet_bus"
        if self.power_down is not None:
            target, why = AccelState.OFF, "path:power_down"
        if self.alarm is not None and self.path.ladder is not None:
            target, why = self.path.ladder.spec.safe_state, "path:watchdog_alarm"
        return target, why

    def _expected_wake_s(self, acc: SimAccelerator, now: float) -> float:
        """The model's time to `active` from where the wake starts, as the daemon's actuator
        tells its watchdog (a wake already under way: what remains of it, at most the slowest exit)."""
        model = self.path.model
        if acc.transition is not None and acc.transition.kind is AccelState.WAKING:
            return min(max(0.0, acc.transition.end - now), max(x.latency_s for x in model.exit.values()))
        return model.exit_latency_s(acc.state) if acc.state in model.exit else 0.0

    def after(self, now: float, acc: SimAccelerator, goal: AccelState, reason: str) -> None:
        """The watchdog on the commanded goal, readiness since key-on, keep-awake while parked."""
        ladder = self.path.ladder
        if ladder is not None and self.path.clamps:
            if self.alarm is not None and any(
                    h.mode is HoldMode.AWAKE and self.alarm_at is not None and h.at_s > self.alarm_at
                    for h in self.path.holds if h.at_s <= now):
                self.alarm = None  # an operator asked again (a new awake hold)
            before, self._want = self._want, goal
            if goal is AccelState.ACTIVE and before is not AccelState.ACTIVE:
                self.ladder_state = ladder.begin(self.ladder_state, now, self._expected_wake_s(acc, now))
            elif goal is not AccelState.ACTIVE and before is AccelState.ACTIVE:
                self.ladder_state = ladder.cancel(self.ladder_state)
            self.ladder_state, action = ladder.step(self.ladder_state, acc.state, now)
            if action is not None:
                key = action.rung.value
                self.escalations[key] = self.escalations.get(key, 0) + 1
                if action.rung is Rung.GIVE_UP:
                    self.alarms += 1
                    self.alarm, self.alarm_at = action.reason, now
        if self.keyon_at is not None and self._ready(acc.state):
            self.keyon_ready_s.append(max(0.0, now - self.keyon_at))
            self.keyon_at = None
        self._keep_awake(now, reason)

    def _ready(self, state: AccelState) -> bool:
        if state is AccelState.ACTIVE:
            return True
        if state not in self.path.model.exit:
            return False
        return self.path.model.exit_latency_s(state) <= self.path.params.latency_budget_s + 1e-9

    def _keep_awake(self, now: float, reason: str) -> None:
        reasons: dict[str, str] = {}
        if self.power_state is PowerState.OFF:
            for hold in self.holds(now):
                if hold.mode is HoldMode.AWAKE:
                    kind = "lease" if hold.owner.startswith("app:") else "hold"
                    reasons.setdefault(kind, f"{hold.owner}: {hold.reason}")
            if reason.startswith(("demand:", "stale:")):
                reasons["critical_demand"] = reason
            if self.local_request:
                reasons["nm_request"] = "the gateway requests the network"
        for kind, why in reasons.items():
            if kind not in self._awake_reasons:
                self.keep_awake[kind] += 1
                self.keep_awake_log.append((round(now, 3), kind, why))
        self._awake_reasons = reasons

    def next_times(self, now: float, acc: SimAccelerator) -> list[float]:
        """When a timer of the path fires after `now`."""
        p = self.path
        out: list[float] = [t for t in p.hold_times() if t > now]
        if self.nm_state is not None and p.nm is not None:
            d = p.nm.next_deadline(self.nm_state)
            if d is not None:
                out.append(d)
        f = self.fusion_state
        if f is not None and p.fusion is not None:
            fp = p.fusion.params
            if f.candidate is not None:
                need = fp.off_debounce_s if f.candidate is PowerState.OFF else fp.on_debounce_s
                out.append(f.candidate_since + need)
            # (a CAN source's or the line's timeout: the timeline's silence ticks, `timeouts`)
        b = self.budget_state
        if b is not None and p.budget is not None:
            bp = p.budget.params
            if b.parked_since is not None:
                out += [b.parked_since + bp.min_parked_s, b.parked_since + bp.max_parked_s]
                draw = p.other_watts + (p.model.power_w.get(acc.state, 0.0) if acc.transition is None else 0.0)
                if draw > 0 and b.budget_wh > 0 and b.last_t is not None:
                    out.append(b.last_t + b.budget_wh * 3600 / draw)
                if b.low_since is not None:
                    out.append(b.low_since + bp.voltage_delay_s)
        if self.ladder_state.phase is Phase.WATCHING and self.ladder_state.deadline is not None:
            out.append(self.ladder_state.deadline)
        return [t for t in out if t > now and math.isfinite(t)]

    def figures(self) -> dict[str, Any]:
        """What the path did, for the evaluation JSON."""
        out: dict[str, Any] = {
            "escalations": dict(sorted(self.escalations.items())),
            "alarms": self.alarms,
            "keep_awake": dict(self.keep_awake),
        }
        if self.nm_state is not None:
            out["nm_transitions"] = dict(sorted(self.nm_transitions.items()))
            out["bus_sleeps"] = self.nm_transitions.get(NmMode.BUS_SLEEP.value, 0)
        if self.fusion_state is not None:
            out["keyon_ready_s"] = [round(x, 3) for x in self.keyon_ready_s]
        if self.budget_state is not None:
            out["budget_min_wh"] = None if self.budget_min_wh is None else round(self.budget_min_wh, 4)
            out["budget_end_wh"] = round(self.budget_state.budget_wh, 4)
            out["power_downs"] = dict(sorted(self.power_downs.items()))
        return out


__all__ = ["KEEP_AWAKE_REASONS", "QUIET_MODES", "DecisionPath", "PathRun", "as_hold"]
