"""Ground truth of a scenario: challenge events derived from the vehicle's situation, and the
honest, noisy precursors the vehicle's CAN signals will show before them.

The policy never sees this module's output directly, only the signals the virtual vehicle
derives from it. Everything is a pure function of (cycle, seed, model): the same inputs always
give the same scenario. The rules are documented in docs/scenarios.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from .cycles import DriveCycle
from .events_config import NAMED_MODELS, EventModel, named_scenario

__all__ = [  # EventModel, NAMED_MODELS and named_scenario live in events_config (re-exported)
    "NAMED_MODELS", "ChallengeEvent", "EventKind", "EventModel", "Precursor", "Scenario", "build_scenario",
    "named_scenario",
]

GEAR_PARK, GEAR_REVERSE, GEAR_NEUTRAL, GEAR_DRIVE = 0, 1, 2, 3
_STOP_KMH = 0.5  # below this the vehicle counts as standing


class EventKind(StrEnum):
    HIGHWAY = "highway"
    URBAN = "urban"
    PARKING = "parking"
    SURPRISE = "surprise"


@dataclass(frozen=True, slots=True)
class Precursor:
    kind: EventKind
    start_s: float
    end_s: float
    event: int | None  # index into Scenario.events; None for a false precursor


@dataclass(frozen=True, slots=True)
class ChallengeEvent:
    kind: EventKind
    start_s: float
    end_s: float
    deadline_ms: int
    precursor: tuple[float, float] | None = None

    @property
    def due_s(self) -> float:
        """When the accelerator must be active."""
        return self.start_s + self.deadline_ms / 1000


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    cycle: DriveCycle
    seed: int
    model: EventModel
    events: tuple[ChallengeEvent, ...]
    precursors: tuple[Precursor, ...]
    gears: tuple[tuple[float, int], ...]  # (from time, gear) segments, sorted
    maneuvers: tuple[tuple[float, float], ...]  # reversing intervals (parking)
    battery_v: tuple[float, ...]  # 1 Hz slow trace
    accel_temp_c: tuple[float, ...]  # 1 Hz slow trace

    @property
    def duration_s(self) -> float:
        return self.cycle.duration_s

    def gear_at(self, t: float) -> int:
        gear = self.gears[0][1]
        for since, g in self.gears:
            if since > t:
                break
            gear = g
        return gear


def build_scenario(cycle: DriveCycle, seed: int, model: EventModel | None = None, name: str = "default") -> Scenario:
    model = model if model is not None else NAMED_MODELS.get(name, EventModel())
    # One independent stream per concern, so a change to one rule does not reshuffle the rest.
    rng = {k: random.Random(f"{seed}:{cycle.name}:{k}") for k in ("evt", "pre", "false", "trace")}
    speeds, times = cycle.speeds, cycle.times
    events: list[ChallengeEvent] = []
    events += _highway(times, speeds, model)
    events += _urban(times, speeds, model, rng["evt"])
    parking, maneuvers = _parking(times, speeds, model, rng["evt"])
    events += parking
    events += _surprises(times, speeds, model, rng["evt"])
    events.sort(key=lambda e: (e.start_s, e.kind.value))
    events = _outside_key_off(events, model, times[0])
    events = [_with_precursor(e, model, rng["pre"], times[0]) for e in events]
    precursors = [
        Precursor(e.kind, e.precursor[0], e.precursor[1], i) for i, e in enumerate(events) if e.precursor is not None
    ]
    precursors += _false_precursors(times, model, rng["false"])
    precursors.sort(key=lambda p: (p.start_s, p.kind.value))
    return Scenario(
        name=name,
        cycle=cycle,
        seed=seed,
        model=model,
        events=tuple(events),
        precursors=tuple(precursors),
        gears=_gears(times, maneuvers),
        maneuvers=tuple(maneuvers),
        battery_v=_walk(len(times), model.battery_nominal_v, 0.02, (13.4, 14.2), rng["trace"]),
        accel_temp_c=_walk(len(times), sum(model.accel_temp_c) / 2, 0.2, model.accel_temp_c, rng["trace"]),
    )


# -- rules -----------------------------------------------------------------------------------


def _outside_key_off(events: list[ChallengeEvent], m: EventModel, t0: float) -> list[ChallengeEvent]:
    """With the ignition off nothing is asked of the accelerator: events starting in a key-off
    period are dropped, events running into one end at the key-off."""
    periods = [(t0 + a, t0 + b) for a, b, _ in m.key_off_intervals()]
    if not periods:
        return events
    out = []
    for e in events:
        if any(a <= e.start_s < b for a, b in periods):
            continue
        end = min([e.end_s, *(a for a, _ in periods if e.start_s < a < e.end_s)])
        out.append(ChallengeEvent(e.kind, e.start_s, end, e.deadline_ms, e.precursor))
    return out


def _accel_mps2(times: tuple[float, ...], speeds: tuple[float, ...]) -> list[float]:
    """Mean acceleration over a centred 3-sample window (1 Hz traces are step-noisy)."""
    n = len(times)
    out = []
    for i in range(n):
        a, b = max(0, i - 1), min(n - 1, i + 1)
        out.append((speeds[b] - speeds[a]) / 3.6 / (times[b] - times[a]))
    return out


def _highway(times: tuple[float, ...], speeds: tuple[float, ...], m: EventModel) -> list[ChallengeEvent]:
    accel = _accel_mps2(times, speeds)
    events: list[ChallengeEvent] = []
    steady_since: float | None = None
    start: float | None = None
    for t, v, a in zip(times, speeds, accel, strict=True):
        if start is not None:
            if v < m.highway_exit_speed_kmh or abs(a) > m.highway_exit_accel_mps2:
                if t - start >= m.highway_min_duration_s:
                    events.append(ChallengeEvent(EventKind.HIGHWAY, start, t, m.highway_deadline_ms))
                start, steady_since = None, None
            continue
        if v >= m.highway_min_speed_kmh and abs(a) <= m.highway_max_accel_mps2:
            steady_since = t if steady_since is None else steady_since
            if t - steady_since >= m.highway_steady_s:
                start = t
        else:
            steady_since = None
    if start is not None and times[-1] - start >= m.highway_min_duration_s:
        events.append(ChallengeEvent(EventKind.HIGHWAY, start, times[-1], m.highway_deadline_ms))
    return events


def _stops(times: tuple[float, ...], speeds: tuple[float, ...]) -> list[tuple[float, float]]:
    """Standing intervals (start, end); the last may run to the end of the cycle."""
    stops: list[tuple[float, float]] = []
    since: float | None = None
    for t, v in zip(times, speeds, strict=True):
        if v < _STOP_KMH and since is None:
            since = t
        elif v >= _STOP_KMH and since is not None:
            stops.append((since, t))
            since = None
    if since is not None:
        stops.append((since, times[-1]))
    return stops


def _urban(
    times: tuple[float, ...], speeds: tuple[float, ...], m: EventModel, rng: random.Random
) -> list[ChallengeEvent]:
    events = []
    stops = _stops(times, speeds)
    for i, (s0, s1) in enumerate(stops):
        if s1 >= times[-1] or s1 - s0 < m.urban_min_stop_s:
            continue
        seg_end = stops[i + 1][0] if i + 1 < len(stops) else times[-1]
        seg_max = max(v for t, v in zip(times, speeds, strict=True) if s1 <= t <= seg_end)
        if seg_max > m.urban_max_segment_kmh:
            continue
        # The pull-away: the last standing sample, the moment the vehicle starts to roll.
        pull = _last_before(times, s1)
        end = min(pull + rng.uniform(*m.urban_duration_s), times[-1])
        events.append(ChallengeEvent(EventKind.URBAN, pull, end, m.urban_deadline_ms))
    return events


def _last_before(times: tuple[float, ...], t: float) -> float:
    prev = times[0]
    for x in times:
        if x >= t:
            break
        prev = x
    return prev


def _parking(
    times: tuple[float, ...], speeds: tuple[float, ...], m: EventModel, rng: random.Random
) -> tuple[list[ChallengeEvent], list[tuple[float, float]]]:
    lo, hi = m.parking_duration_s
    long_stops = [(a, b) for a, b in _stops(times, speeds) if b - a >= m.parking_min_stop_s]
    events, maneuvers = [], []
    for i, (s0, s1) in enumerate(long_stops):
        last = i == len(long_stops) - 1
        chance = rng.random()
        if not last and chance >= m.parking_stop_probability:
            continue
        start = s0 + rng.uniform(1.0, 3.0)
        length = min(rng.uniform(lo, hi), s1 - start - 1.0)
        if length < 3.0:
            continue
        events.append(ChallengeEvent(EventKind.PARKING, start, start + length, m.parking_deadline_ms))
        maneuvers.append((start, start + length))
    return events, maneuvers


def _surprises(
    times: tuple[float, ...], speeds: tuple[float, ...], m: EventModel, rng: random.Random
) -> list[ChallengeEvent]:
    """A Poisson process on moving time: exponential gaps measured in seconds of driving."""
    if m.surprise_rate_per_h <= 0:
        return []
    events = []
    mean_gap = 3600.0 / m.surprise_rate_per_h
    budget = rng.expovariate(1.0 / mean_gap)
    for k in range(len(times) - 1):
        moving = speeds[k] >= _STOP_KMH or speeds[k + 1] >= _STOP_KMH
        if not moving:
            continue
        dt = times[k + 1] - times[k]
        if budget < dt:
            start = times[k] + budget
            end = min(start + rng.uniform(*m.surprise_duration_s), times[-1])
            if end > start:
                events.append(ChallengeEvent(EventKind.SURPRISE, start, end, m.surprise_deadline_ms))
            budget = rng.expovariate(1.0 / mean_gap)
            continue
        budget -= dt
    return events


def _with_precursor(e: ChallengeEvent, m: EventModel, rng: random.Random, t0: float) -> ChallengeEvent:
    # Draw both numbers for every event so the stream stays aligned whatever is kept.
    missing = rng.random() < m.precursor_missing_probability
    lead = rng.uniform(*m.precursor_lead_s)
    if e.kind is EventKind.SURPRISE or missing:
        return e
    return ChallengeEvent(e.kind, e.start_s, e.end_s, e.deadline_ms, (max(t0, e.start_s - lead), e.end_s))


def _false_precursors(times: tuple[float, ...], m: EventModel, rng: random.Random) -> list[Precursor]:
    out: list[Precursor] = []
    if m.false_precursor_rate_per_h <= 0:
        return out
    span = times[-1] - times[0]
    for kind in (EventKind.HIGHWAY, EventKind.URBAN, EventKind.PARKING):
        t = times[0] + rng.expovariate(m.false_precursor_rate_per_h / 3600.0)
        while t < times[-1]:
            end = min(t + rng.uniform(*m.false_precursor_duration_s), times[0] + span)
            out.append(Precursor(kind, t, end, None))
            t = end + rng.expovariate(m.false_precursor_rate_per_h / 3600.0)
    return out


def _gears(times: tuple[float, ...], maneuvers: list[tuple[float, float]]) -> tuple[tuple[float, int], ...]:
    """Drive, reverse during each parking maneuver, park after the last one if it ends the
    last long stop of the cycle."""
    gears: list[tuple[float, int]] = [(times[0], GEAR_DRIVE)]
    for i, (a, b) in enumerate(maneuvers):
        gears.append((a, GEAR_REVERSE))
        final = i == len(maneuvers) - 1
        gears.append((b, GEAR_PARK if final and _only_standing_after(times, b) else GEAR_DRIVE))
    return tuple(gears)


def _only_standing_after(times: tuple[float, ...], t: float) -> bool:
    return times[-1] - t < 30.0  # the maneuver ends the drive (engine off soon after)


def _walk(n: int, centre: float, step: float, bounds: tuple[float, float], rng: random.Random) -> tuple[float, ...]:
    """A bounded random walk: a slow trace (battery, temperature) with realistic wander."""
    lo, hi = bounds
    x, out = centre, []
    for _ in range(n):
        x = min(hi, max(lo, x + rng.gauss(0.0, step)))
        out.append(round(x, 4))
    return tuple(out)
