"""A day in the evaluator: `cerebellumd evaluate --day FILE.toml` (docs/days.md).

A day file strings trips (any shipped cycle or a CSV path, each with its event world), key
cycles (ignition on without driving), parked gaps (everything else), garage-mode leases (awake
holds with a cap, during parked time) and ambient battery behaviour together over
`duration_h` hours from midnight. It becomes one scenario: the trips' scenarios shifted to
their start times, key-off periods between them (the vehicle bus falls silent after its tail),
the leases as holds, and the ambient battery voltage as the series of every MCU-fed
`battery_v` signal. The whole decision path runs (sim/path.py), event-driven: a 16 h parked
gap costs a handful of steps (timers of NM, the budget and the policy), not 10 ms ticks.

Policies: the configured one, `ignition_on` (the accelerator powered whenever the ignition is
on: today's cars) and `keyoff_timeout` (powered until `keyoff_timeout_s` after key-off). Both
baselines also serve the garage leases, and run without the daemon's clamps (NM, power-down,
watchdog): they are what a car without cerebellumd does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..accel import AcceleratorModel, AccelState
from ..config import Config, ConfigError, ConfigIssue, locate, policy_params, read_text, validate_toml
from ..policies.cerebellum import CerebellumFirst, PolicyState
from ..policies.types import Decision, HoldMode, Inputs, PolicyParams
from ..profiles import load_profile
from .cycles import DriveCycle, load_cycle
from .events import GEAR_DRIVE, GEAR_PARK, ChallengeEvent, Precursor, Scenario, build_scenario
from .events_config import EventModel, HoldAt, KeyOff, ProvidedSignal, resolve_events

_DAY_S = 86400.0


def _seconds(value: Any) -> float:
    """A time of day: TOML local time (07:30:00), "HH:MM[:SS]" or seconds from midnight."""
    if isinstance(value, dt.time):
        return value.hour * 3600 + value.minute * 60 + value.second + value.microsecond / 1e6
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", value.strip())
        if m:
            return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)
    raise ValueError(f"{value!r} is not a time of day (07:30, \"07:30\" or seconds from midnight)")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trip(_Part):
    at: float = Field(..., description="Key-on: a time of day (07:30 or \"07:30\") or seconds from midnight.")
    cycle: str = Field(..., description="Shipped drive cycle name (udds, hwfet, ...) or a CSV path.")
    events: str = Field("default", description="Event world: a shipped name or an event file path.")
    key_on_s: float = Field(5.0, ge=0, description="Standing with the ignition on before the cycle starts.")
    key_off_s: float = Field(10.0, ge=0, description="Standing with the ignition on after the cycle ends.")

    _at = field_validator("at", mode="before")(classmethod(lambda cls, v: _seconds(v)))


class KeyCycle(_Part):
    at: float = Field(..., description="Key-on (time of day or seconds from midnight).")
    on_s: float = Field(..., gt=0, description="The ignition stays on this long; the car does not move.")

    _at = field_validator("at", mode="before")(classmethod(lambda cls, v: _seconds(v)))


class Garage(_Part):
    """Garage-mode work while parked: an awake lease with a hard cap."""

    at: float = Field(..., description="Start (time of day or seconds from midnight); must be parked time.")
    max_duration_s: float = Field(..., gt=0, description="The lease's cap: it ends then whatever the client does.")
    owner: str = Field("app:garage", min_length=1, description="Lease owner (`app:NAME`).")
    reason: str = Field("garage mode", description="What the work is (model update, log upload, ...).")
    priority: int = Field(0, description="Lease priority.")

    _at = field_validator("at", mode="before")(classmethod(lambda cls, v: _seconds(v)))


class Ambient(_Part):
    charging_v: float = Field(13.8, gt=0, description="Battery voltage while the ignition is on (alternator).")
    rest_v: float = Field(12.6, gt=0, description="Resting battery voltage right after key-off.")
    drop_v_per_h: float = Field(
        0.01, ge=0, description="Resting voltage falls this much per parked hour (self-discharge and the "
                                "car's own quiescent draw), until key-on.")
    temp_c: float = Field(20.0, description="Accelerator temperature while parked (ambient).")


class DayFile(_Part):
    """A day scenario (`cerebellumd evaluate --day`; `cerebellumd schema --day`)."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="Reported name (default: file stem).")
    description: str = Field("", description="What this day is (free text).")
    seed: int = Field(1, description="Seed of the trips' event worlds (trip i uses seed * 1000 + i).")
    duration_h: float = Field(24.0, gt=0, le=48, description="Length of the day from midnight (h).")
    start_budget_wh: float | None = Field(
        None, ge=0, description="12 V budget at midnight (default: [battery] capacity_wh).")
    keyoff_timeout_s: float = Field(
        300.0, gt=0, description="The keyoff_timeout baseline stays powered this long after key-off "
                                 "(openpilot DELAY_SHUTDOWN_TIME_S = 300 s).")
    trips: tuple[Trip, ...] = Field(..., min_length=1, description="Drives, in any order.")
    key_cycles: tuple[KeyCycle, ...] = Field((), description="Ignition on without driving.")
    garage: tuple[Garage, ...] = Field((), description="Garage-mode leases during parked time.")
    ambient: Ambient = Field(default_factory=Ambient, description="Battery and temperature outside the trips.")
    signals: dict[str, ProvidedSignal] = Field(
        default_factory=dict, description="Values of SOME/IP- or MCU-fed signals (as in an event file).")


class _Segment:
    def __init__(self, start: float, cycle: DriveCycle, world: EventModel | None, label: str) -> None:
        self.start, self.cycle, self.world, self.label = start, cycle, world, label

    @property
    def end(self) -> float:
        return self.start + self.cycle.duration_s


def _with_standing(cycle: DriveCycle, before: float, after: float) -> DriveCycle:
    times = list(cycle.times)
    speeds = list(cycle.speeds)
    t0 = times[0]
    pre = [t0 - before] if before > 0 else []
    post = [times[-1] + after] if after > 0 else []
    return DriveCycle(cycle.name, tuple(x - t0 + before for x in (*pre, *times, *post)),
                      tuple([0.0] * len(pre) + speeds + [0.0] * len(post)))


def parse_day(text: str, file: str = "<day>", default_name: str = "day") -> tuple[str, DayFile]:
    day = validate_toml(text, file, DayFile)
    try:
        _check(day)
    except _DayError as exc:
        raise ConfigError([ConfigIssue(file, locate(text, exc.loc), ".".join(map(str, exc.loc)), str(exc))]) from None
    return day.name or default_name, day


class _DayError(ValueError):
    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _check(day: DayFile) -> None:
    """Trips and key cycles resolve and do not overlap; garage leases fall in parked time."""
    end = day.duration_h * 3600
    for i, trip in enumerate(day.trips):
        try:
            load_cycle(trip.cycle)
            resolve_events(trip.events)
        except (ValueError, ConfigError) as exc:
            raise _DayError(("trips", i, "cycle"), str(exc)) from None
    spans = _spans(day)
    for (a0, a1, _la), (b0, _, lb) in itertools.pairwise(spans):
        if b0 < a1:
            raise _DayError(lb, f"starts at {b0:.0f} s, before the drive at {a0:.0f} s ends ({a1:.0f} s)")
    for _, a1, loc in spans:
        if a1 > end:
            raise _DayError(loc, f"ends at {a1:.0f} s, after the day ({end:.0f} s)")
    for i, g in enumerate(day.garage):
        if any(a0 < g.at + g.max_duration_s and g.at < a1 for a0, a1, _ in spans):
            raise _DayError(("garage", i, "at"), "a garage lease must lie in parked time (it overlaps a drive)")


def _spans(day: DayFile) -> list[tuple[float, float, tuple[str | int, ...]]]:
    out: list[tuple[float, float, tuple[str | int, ...]]] = []
    for i, trip in enumerate(day.trips):
        out.append((trip.at, trip.at + trip.key_on_s + load_cycle(trip.cycle).duration_s + trip.key_off_s,
                    ("trips", i, "at")))
    out += [(k.at, k.at + k.on_s, ("key_cycles", i, "at")) for i, k in enumerate(day.key_cycles)]
    return sorted(out, key=lambda s: s[0])


def load_day(spec: str | Path) -> tuple[str, DayFile]:
    """A shipped day (`commuter`) or a day file's path."""
    text_spec = str(spec)
    if text_spec in shipped_days():
        entry = resources.files("cerebellumd").joinpath("examples", "days", f"{text_spec}.toml")
        return parse_day(entry.read_text("utf-8"), f"examples/days/{text_spec}.toml", text_spec)
    p = Path(spec)
    text = read_text(p)
    return parse_day(text, str(p), p.stem)


def shipped_days() -> list[str]:
    folder = resources.files("cerebellumd").joinpath("examples", "days")
    return sorted(e.name.removesuffix(".toml") for e in folder.iterdir() if e.name.endswith(".toml"))


def day_schema() -> dict[str, Any]:
    return DayFile.model_json_schema()


# -- the day as one scenario -----------------------------------------------------------------


def build_day(name: str, day: DayFile, config: Config) -> Scenario:
    end = day.duration_h * 3600
    segments: list[_Segment] = []
    for trip in day.trips:
        cycle = _with_standing(load_cycle(trip.cycle), trip.key_on_s, trip.key_off_s)
        segments.append(_Segment(trip.at, cycle, resolve_events(trip.events)[1], trip.cycle))
    for k in day.key_cycles:
        segments.append(_Segment(k.at, DriveCycle("key_cycle", (0.0, k.on_s), (0.0, 0.0)), None, "key_cycle"))
    segments.sort(key=lambda s: s.start)
    amb = day.ambient
    times: list[float] = [0.0]
    speeds: list[float] = [0.0]
    battery: list[float] = [amb.rest_v]
    temps: list[float] = [amb.temp_c]
    events: list[ChallengeEvent] = []
    precursors: list[Precursor] = []
    gears: list[tuple[float, int]] = [(0.0, GEAR_PARK)]
    maneuvers: list[tuple[float, float]] = []
    key_off: list[KeyOff] = []
    parked_from = 0.0
    for i, seg in enumerate(segments):
        if seg.start > parked_from:
            key_off.append(KeyOff(at_s=parked_from, duration_s=seg.start - parked_from))
        shift = seg.start - seg.cycle.times[0]
        if seg.world is not None:
            sc = build_scenario(seg.cycle, day.seed * 1000 + i, seg.world, name=f"{name}:{i}")
            base = len(events)
            events += [ChallengeEvent(e.kind, e.start_s + shift, e.end_s + shift, e.deadline_ms,
                                      None if e.precursor is None else (e.precursor[0] + shift,
                                                                        e.precursor[1] + shift))
                       for e in sc.events]
            precursors += [Precursor(p.kind, p.start_s + shift, p.end_s + shift,
                                     None if p.event is None else p.event + base) for p in sc.precursors]
            gears += [(t + shift, g) for t, g in sc.gears]
            maneuvers += [(a + shift, b + shift) for a, b in sc.maneuvers]
            seg_battery, seg_temps = list(sc.battery_v), list(sc.accel_temp_c)
        else:
            gears.append((seg.start, GEAR_PARK))
            seg_battery = [amb.charging_v] * len(seg.cycle.times)
            seg_temps = [amb.temp_c] * len(seg.cycle.times)
        parked_h = (seg.start - parked_from) / 3600
        first = seg.cycle.times[0] + shift
        if first - 1.0 > times[-1]:  # the resting voltage just before key-on
            times.append(first - 1.0)
            speeds.append(0.0)
            battery.append(max(0.0, amb.rest_v - amb.drop_v_per_h * parked_h))
            temps.append(amb.temp_c)
        for t, v, b, c in zip(seg.cycle.times, seg.cycle.speeds, seg_battery, seg_temps, strict=True):
            if t + shift > times[-1]:
                times.append(t + shift)
                speeds.append(v)
                battery.append(b)
                temps.append(c)
        parked_from = seg.end
        gears.append((parked_from, GEAR_PARK))
        if parked_from + 1.0 < end:
            times.append(parked_from + 1.0)
            speeds.append(0.0)
            battery.append(amb.rest_v)
            temps.append(amb.temp_c)
    if end > parked_from:
        key_off.append(KeyOff(at_s=parked_from, duration_s=end - parked_from))
    if end > times[-1]:
        times.append(end)
        speeds.append(0.0)
        battery.append(max(0.0, amb.rest_v - amb.drop_v_per_h * (end - parked_from) / 3600))
        temps.append(amb.temp_c)
    holds = tuple(HoldAt(at_s=g.at, duration_s=g.max_duration_s, mode=HoldMode.AWAKE, owner=g.owner,
                         priority=g.priority, reason=g.reason) for g in day.garage)
    signals = dict(day.signals)
    for sig_name, sig in config.signals.items():
        if sig.mcu == "battery_v" and sig_name not in signals:
            signals[sig_name] = ProvidedSignal(series=_battery_series(key_off, amb, end), period_ms=1000)
    model = EventModel(key_off=tuple(key_off), holds=holds, signals=signals)
    gears.sort(key=lambda g: g[0])
    return Scenario(
        name=name, cycle=DriveCycle(name, tuple(times), tuple(speeds)), seed=day.seed, model=model,
        events=tuple(sorted(events, key=lambda e: e.start_s)), precursors=tuple(precursors),
        gears=tuple(gears) if gears else ((0.0, GEAR_DRIVE),), maneuvers=tuple(maneuvers),
        battery_v=tuple(battery), accel_temp_c=tuple(temps),
    )


def _battery_series(key_off: Sequence[KeyOff], amb: Ambient, end: float) -> tuple[tuple[float, float], ...]:
    """The battery voltage an MCU reads: charging while on, resting and falling while parked
    (a step every 10 minutes)."""
    out: list[tuple[float, float]] = []
    t = 0.0
    for k in key_off:
        if k.at_s > t:
            out.append((t, amb.charging_v))
        step = 600.0
        x = k.at_s
        while x < k.at_s + k.duration_s:
            out.append((x, round(amb.rest_v - amb.drop_v_per_h * (x - k.at_s) / 3600, 4)))
            x += step
        t = k.at_s + k.duration_s
    if t < end:
        out.append((t, amb.charging_v))
    dedup: list[tuple[float, float]] = []
    for p in out:
        if dedup and p[0] <= dedup[-1][0]:
            dedup[-1] = p
        else:
            dedup.append(p)
    return tuple(dedup)


# -- baselines -------------------------------------------------------------------------------------


class IgnitionOn:
    """Today's cars: the accelerator is powered whenever the ignition is on (and for leases)."""

    name = "ignition_on"

    def __init__(self, params: PolicyParams, model: AcceleratorModel, timeout_s: float = 0.0) -> None:
        self._inner = CerebellumFirst(params, model)
        self.params = params
        self.timeout_s = timeout_s
        self.parked_since: float | None = None

    def initial_state(self, now: float, target: AccelState = AccelState.ACTIVE) -> PolicyState:
        return self._inner.initial_state(now, AccelState.ACTIVE)

    def step(self, state: PolicyState, inputs: Inputs, now: float) -> tuple[PolicyState, Decision]:
        new_state, decision = self._inner.step(state, replace(inputs, parked=False, quiet_bus=True), now)
        if inputs.parked and self.parked_since is None:
            self.parked_since = now
        elif not inputs.parked:
            self.parked_since = None
        held = any(h.mode is HoldMode.AWAKE and h.expires_at > now for h in inputs.holds)
        on = not inputs.parked or held or (self.parked_since is not None and now - self.parked_since < self.timeout_s)
        target = AccelState.ACTIVE if on else AccelState.OFF
        changed = target is not state.target
        new_state = replace(new_state, target=target, target_since=now if changed else state.target_since)
        return new_state, replace(decision, target=target, reason=self.name, changed=changed,
                                  wake=changed and on)

    def timer(self, now: float) -> float | None:
        if self.parked_since is None or self.timeout_s <= 0:
            return None
        t = self.parked_since + self.timeout_s
        return t if t > now else None


class KeyoffTimeout(IgnitionOn):
    name = "keyoff_timeout"


# -- evaluation ------------------------------------------------------------------------------------


def evaluate_day(config: Config, name: str, day: DayFile, *, profile: str | None = None,
                 tick_ms: int = 10) -> dict[str, Any]:
    """Every policy over the day; the JSON object (with `_runs` for the plot, stripped by the CLI)."""
    from .evaluate import PolicyRun, _metrics, _run_policy, _Timeline, policy_timer
    from .path import DecisionPath
    from .vehicle import VirtualVehicle

    if not config.vehicle_power.enabled:
        raise ValueError("a day needs [vehicle_power] enabled: the parked state comes from the fused ignition "
                         "(e.g. the shipped examples/parked.toml)")
    scenario = build_day(name, day, config)
    params = policy_params(config)
    model = load_profile(profile or config.accelerator.profile)
    path = replace(DecisionPath.build(config, params, model, scenario.model.holds),
                   start_budget_wh=day.start_budget_wh)
    timeline = _Timeline(config, params, VirtualVehicle(scenario), tick_ms / 1000, frozenset(path.signals_used),
                         path.timeouts())
    end_s = timeline.n_ticks * timeline.tick_s
    initial = AccelState.OFF
    t0 = scenario.cycle.times[0]
    challenges = [(e.start_s - t0, e.due_s - t0, e.end_s - t0) for e in scenario.events]
    core = CerebellumFirst(params, model)

    def run_one(policy: Any, timer: Any, p: DecisionPath) -> PolicyRun:
        return _run_policy(policy, timer, timeline, model, initial, True, None, 0.0, challenges, p)

    runs: list[PolicyRun] = []
    mine = run_one(core, lambda s, now: policy_timer(core, s, now), path)
    mine.name = config.policy.name
    runs.append(mine)
    free = replace(path, clamps=False)
    for cls, timeout in ((IgnitionOn, 0.0), (KeyoffTimeout, day.keyoff_timeout_s)):
        base = cls(params, model, timeout)

        def timer(s: PolicyState, now: float, base: IgnitionOn = base) -> float | None:
            times = [t for t in (policy_timer(core, s, now), base.timer(now)) if t is not None]
            return min(times) if times else None

        runs.append(run_one(base, timer, free))
    domains = [(d.name, d.watts or 0.0) for d in config.power.domains if d.source == "constant"]
    results = [_day_metrics(r, scenario, domains, path.other_watts, end_s, _metrics) for r in runs]
    return {
        "day": name, "description": day.description, "seed": day.seed, "duration_s": round(end_s, 3),
        "trips": len(day.trips), "key_cycles": len(day.key_cycles), "garage_leases": len(day.garage),
        "events": len(scenario.events), "parked_s": round(sum(k.duration_s for k in scenario.model.key_off), 1),
        "results": results, "_runs": runs, "_scenario": scenario,
    }


def _day_metrics(run: Any, scenario: Scenario, domains: Sequence[tuple[str, float]], other_watts: float,
                 end_s: float, metrics: Any) -> dict[str, Any]:
    base = metrics(run, scenario, other_watts, end_s)
    shell = run.path
    assert shell is not None
    on_s = end_s - shell.gateway_off_s
    parked_on_s = shell.parked_s - shell.gateway_off_s
    energy = {"accelerator": run.accelerator.energy_j / 3600, **{n: w * on_s / 3600 for n, w in domains}}
    parked = {"accelerator": shell.parked_accel_j / 3600, **{n: w * parked_on_s / 3600 for n, w in domains}}
    ready = shell.keyon_ready_s
    return {
        "policy": run.name,
        "energy_wh": {k: round(v, 3) for k, v in energy.items()},
        "energy_wh_total": round(sum(energy.values()), 3),
        "parked_drain_wh": {k: round(v, 3) for k, v in parked.items()},
        "parked_drain_wh_total": round(sum(parked.values()), 3),
        "budget_min_wh": shell.budget_min_wh if shell.budget_min_wh is None else round(shell.budget_min_wh, 3),
        "power_downs": dict(shell.power_downs),
        "gateway_powered_down_s": round(shell.gateway_off_s, 1),
        "keyon_ready_s": {"n": len(ready), "mean": round(sum(ready) / len(ready), 3) if ready else None,
                          "max": round(max(ready), 3) if ready else None},
        "keep_awake": dict(shell.keep_awake),
        "keep_awake_events": [list(e) for e in shell.keep_awake_log],
        "readiness": base["readiness"],
        "missed_events": base["missed_events"],
        "wake_cycles": base["wake_cycles"],
        "escalations": shell.escalations, "alarms": shell.alarms,
        "bus_sleeps": shell.nm_transitions.get("bus_sleep", 0),
    }


def budget_curves(result: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    return {r.name: list(r.path.budget_curve) for r in result["_runs"] if r.path is not None}


__all__ = [
    "DayFile",
    "budget_curves",
    "build_day",
    "day_schema",
    "evaluate_day",
    "load_day",
    "parse_day",
    "shipped_days",
]
