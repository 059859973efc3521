"""Fast-forward evaluation: the same pure policies as the daemon, on a simulated clock.

Shell, not policy: this module decides *when* to call `step` and what the policy sees; the
decisions come from `CerebellumFirst.step` and the baselines unchanged.

- Signals: every frame of the virtual vehicle at its DBC period and phase, quantised as the
  receiver decodes it, delivered to the policy at the first tick at or after its send time.
- Event-driven: `step` runs at tick k only when k could differ from k-1: a demand expression
  or guard comparison changes value over the delivered samples, a signal turns stale, a policy
  timer may fire (confirm, dwell, release, break-even, wake cap, timeout), or the accelerator
  finishes a transition. Between those, a 10 ms loop would call `step` with inputs whose
  every decision-relevant projection is unchanged and get the same decision; the test suite
  checks the two loops agree.
- The simulated accelerator costs every state and transition with the profile's model; a
  command during a transition takes effect when it completes (an SC7 entry cannot be aborted).
- Failed resumes (`resume_failure_probability`, default 0): resume number i of a run fails when
  a draw keyed by (scenario seed, i) falls below the probability. Keyed by the resume's index,
  never by a random stream consumed per `step`, so the event-driven and the plain loop draw
  alike, and every policy meets the same failures at its i-th resume (common random numbers).
  A failed resume costs what the profile's default escalation ladder spends before its retry
  succeeds: the wait until the ladder's wake deadline, then a second exit (latency + energy).
  The oracle never fails: it stays the no-failure lower bound.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from ..accel import AcceleratorModel, AccelState
from ..config import Config, policy_params
from ..policies.baselines import AlwaysOn, Timeout
from ..policies.calibration import Calibration
from ..policies.cerebellum import CerebellumFirst, PolicyState
from ..policies.entry_risk import EntryRisk
from ..policies.escalation import DEFAULT_LADDERS, LadderSpec
from ..policies.flapping import TimelinePoint, flap_figures
from ..policies.learned import Learned
from ..policies.oracle import need_intervals, plan
from ..policies.types import Decision, Inputs, PolicyParams, Sample
from ..profiles import load_profile
from .accelerator import SimAccelerator
from .events import EventKind, Scenario
from .events_config import ProvidedSignal
from .path import DecisionPath, PathRun
from .vehicle import VirtualVehicle

DEFAULT_TICK_MS = 10
_EPS = 1e-9
_HOUR_S = 3600.0


class EvaluationError(ValueError):
    pass


# -- failed resumes ----------------------------------------------------------------------------

#: The default escalation ladder of each shipped profile's backend (policies/escalation.py);
#: profiles not listed (a user's TOML) use the simulated accelerator's ladder.
PROFILE_LADDERS: Mapping[str, str] = {"orin_nano": "jetson", "hailo8": "hailo_pcie"}


def ladder_for_profile(model: AcceleratorModel) -> LadderSpec:
    return DEFAULT_LADDERS[PROFILE_LADDERS.get(model.name, "simulated")]


def resume_draw(seed: int, index: int) -> float:
    """Uniform [0, 1) for resume `index` of a run on scenario `seed`: a hash, so the draw
    depends on nothing but the two numbers (not on how often `step` ran, not on numpy)."""
    digest = hashlib.blake2b(f"resume-failure:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def resume_failures(seed: int, probability: float) -> Callable[[int], bool] | None:
    if not 0.0 <= probability <= 1.0:
        raise EvaluationError(f"resume failure probability {probability} is not in [0, 1]")
    if probability == 0.0:
        return None
    return lambda index: resume_draw(seed, index) < probability


# -- inputs as the policy sees them ----------------------------------------------------------


@dataclass(frozen=True)
class _Feed:
    """Every delivery of one signal: tick index, send time and decoded value."""

    ticks: np.ndarray
    times: np.ndarray
    values: np.ndarray


class SignalSource(Protocol):
    """What the evaluator reads from a vehicle: the virtual one (`VirtualVehicle`) or a recorded
    drive (`sim/recorded.py`). `trace(message)`: every frame's time (s, on the scenario's clock)
    and each signal's decoded values; possibly no frames (a message the recording never sent)."""

    @property
    def scenario(self) -> Scenario: ...
    def message_periods(self) -> dict[str, float]: ...
    def frame_times(self, name: str) -> np.ndarray: ...
    def trace(self, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


class _Timeline:
    """Delivered samples of every configured signal over a scenario, and the ticks at which a
    step could decide differently from the tick before (shared by all policies)."""

    def __init__(self, config: Config, params: PolicyParams, vehicle: SignalSource, tick_s: float,
                 path_signals: frozenset[str] = frozenset(), timeouts: Sequence[float] = ()) -> None:
        self.tick_s = tick_s
        self.n_ticks = math.floor(vehicle.scenario.duration_s / tick_s + _EPS)
        self.names = [s.name for s in params.signals]
        traces: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        self.feeds: dict[str, _Feed] = {}
        provided = vehicle.scenario.model.signals
        for name in provided:
            if name not in config.signals:
                raise EvaluationError(f"scenario signal {name!r} is not a configured signal")
            if config.signals[name].can is not None:
                raise EvaluationError(
                    f"scenario signal {name!r}: the virtual vehicle feeds it ({config.signals[name].can}); "
                    "the scenario may only provide SOME/IP- or MCU-fed signals")
        for name, sig in config.signals.items():
            if sig.can is None:
                if name not in provided:
                    source = f"someip {sig.someip!r}" if sig.someip else f"mcu {sig.mcu!r}"
                    raise EvaluationError(
                        f"signal {name!r} ({source}): the virtual vehicle sends only CAN; give its values in the "
                        f"scenario's [signals.{name}] (a constant or a series)")
                self.feeds[name] = self._provided(provided[name], vehicle.scenario.duration_s)
                continue
            message, signal = sig.can.split(".")
            if message not in vehicle.message_periods():
                raise EvaluationError(f"signal {name!r}: message {message!r} is not in the vehicle DBC")
            if message not in traces:
                traces[message] = vehicle.trace(message)
            times, values = traces[message]
            if signal not in values:
                raise EvaluationError(f"signal {name!r}: {sig.can!r} is not in the vehicle DBC")
            rel = times - vehicle.scenario.cycle.times[0]
            ticks = np.ceil(rel / tick_s - _EPS).astype(np.int64)
            self.feeds[name] = _Feed(ticks, rel, values[signal])
        self.change_ticks = self._change_ticks(params, path_signals)
        self.bus_spans: list[tuple[float, float]] = []
        if path_signals or vehicle.scenario.model.key_off:
            self.bus_spans = self._bus_spans(vehicle)
            edges = [ceil_tick(t, tick_s) + d for span in self.bus_spans for t in span for d in (0, 1)]
            silences = [self._silence_ticks(self.feeds[n], x) for n in sorted(path_signals) if n in self.feeds
                        for x in timeouts]
            merged = _sorted_unique([self.change_ticks, np.asarray(edges, dtype=np.int64), *silences])
            self.change_ticks = merged[(merged >= 0) & (merged <= self.n_ticks)]
        # Plain lists: bisect on them is ~10x faster per lookup than numpy's searchsorted.
        self._lists = {n: (f.ticks.tolist(), f.times.tolist(), f.values.tolist()) for n, f in self.feeds.items()}

    def _provided(self, spec: ProvidedSignal, duration_s: float) -> _Feed:
        period = spec.period_ms / 1000
        times = period / 2 + period * np.arange(max(0, math.floor((duration_s - period / 2) / period) + 1))
        if spec.constant is not None:
            values = np.full(len(times), float(spec.constant))
        else:
            assert spec.series is not None
            at = np.asarray([t for t, _ in spec.series], dtype=float)
            vals = np.asarray([v for _, v in spec.series], dtype=float)
            values = vals[np.clip(np.searchsorted(at, times, side="right") - 1, 0, None)]
        ticks = np.ceil(times / self.tick_s - _EPS).astype(np.int64)
        return _Feed(ticks, times, values)

    def _silence_ticks(self, feed: _Feed, after_s: float) -> np.ndarray:
        """Ticks around `after_s` past each delivery not followed by another within that time."""
        if not len(feed.times):
            return np.zeros(0, dtype=np.int64)
        nxt = np.append(feed.times[1:], np.inf)
        gap = feed.times[nxt - feed.times > after_s]
        onset = np.ceil((gap + after_s) / self.tick_s - _EPS).astype(np.int64)
        out: np.ndarray = np.concatenate([onset, onset + 1])
        return out

    def _bus_spans(self, vehicle: SignalSource) -> list[tuple[float, float]]:
        """(first, last) frame time of each stretch of continuous traffic on the vehicle bus (any
        message of the DBC: NM sees every frame), relative to the scenario start."""
        t0 = vehicle.scenario.cycle.times[0]
        spans: list[tuple[float, float]] = []
        for name, period in vehicle.message_periods().items():
            times = vehicle.frame_times(name) - t0
            if not len(times):
                continue
            cut = np.nonzero(np.diff(times) > 2.5 * period)[0]
            starts = np.concatenate([[0], cut + 1])
            ends = np.concatenate([cut, [len(times) - 1]])
            spans += zip(times[starts].tolist(), times[ends].tolist(), strict=True)
        spans.sort()
        merged: list[tuple[float, float]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 0.5:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def samples_at(self, k: int) -> dict[str, Sample]:
        out: dict[str, Sample] = {}
        for name, (ticks, times, values) in self._lists.items():
            i = bisect.bisect_right(ticks, k) - 1
            if i >= 0:
                out[name] = Sample(values[i], times[i])
        return out

    def _latest(self, name: str, ticks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Value and staleness of `name` as seen at each tick in `ticks` (NaN when unknown)."""
        spec = next(s for s in self._params.signals if s.name == name)
        now = ticks.astype(float) * self.tick_s
        feed = self.feeds.get(name)
        if feed is None or len(feed.ticks) == 0:
            return np.full(len(ticks), np.nan), now > spec.max_age_s
        i = np.searchsorted(feed.ticks, ticks, side="right") - 1
        have = i >= 0
        value = np.where(have, feed.values[np.clip(i, 0, None)], np.nan)
        age = np.where(have, now - feed.times[np.clip(i, 0, None)], now)
        stale = age > spec.max_age_s
        return np.where(stale, np.nan, value), stale

    def _change_ticks(self, params: PolicyParams, path_signals: frozenset[str] = frozenset()) -> np.ndarray:
        self._params = params
        points: list[np.ndarray] = [np.array([0], dtype=np.int64)]
        # 1. Staleness onsets: a signal goes stale between deliveries (or is never delivered).
        for spec in params.signals:
            feed = self.feeds.get(spec.name)
            first = ceil_tick(spec.max_age_s, self.tick_s)
            if feed is None or len(feed.ticks) == 0 or feed.ticks[0] > first - 1:
                points.append(np.array([first - 1, first, first + 1], dtype=np.int64))
            if feed is not None and len(feed.ticks):
                onset = np.ceil((feed.times + spec.max_age_s) / self.tick_s).astype(np.int64)
                nxt = np.append(feed.ticks[1:], self.n_ticks + 1)
                late = onset - 1 < nxt
                points += [onset[late] - 1, onset[late], onset[late] + 1]
        # 2. Demand expressions and guard comparisons over the delivered, non-stale values.
        checks: list[tuple[frozenset[str], Callable[[dict[str, Any]], Any]]] = [
            (d.expression.names, d.expression.evaluate) for d in params.demands
        ]
        g = params.guards
        if g.battery_signal:
            checks.append((frozenset([g.battery_signal]), _below(g.battery_signal, g.battery_min_v)))
        if g.temperature_signal:
            checks.append((frozenset([g.temperature_signal]), _above(g.temperature_signal, g.temperature_max_c)))
        for name, edges in params.learned.features:  # learned anticipation: a change of bin is a change
            checks.append((frozenset([name]), _bin_of(name, edges)))
        for name in sorted(path_signals):  # NM, the power fusion and the budget read these
            checks.append((frozenset([name]), _value_of(name)))
        for names, check in checks:
            points.append(self._check_changes(sorted(names), check))
        merged = _sorted_unique(points)
        return merged[(merged >= 0) & (merged <= self.n_ticks)]

    def _check_changes(self, names: list[str], check: Callable[[dict[str, Any]], Any]) -> np.ndarray:
        """Ticks at which `check` over `names` gives a different result than before."""
        feeds = [self.feeds[n].ticks for n in names if n in self.feeds]
        if not feeds:
            return np.zeros(0, dtype=np.int64)
        ticks = _sorted_unique(feeds)
        columns = [self._latest(n, ticks)[0] for n in names]
        # Rows equal to the previous row cannot change the result: skip them.
        matrix = np.column_stack(columns)
        same = np.zeros(len(ticks), dtype=bool)
        if len(ticks) > 1:
            prev, cur = matrix[:-1], matrix[1:]
            same[1:] = np.all((prev == cur) | (np.isnan(prev) & np.isnan(cur)), axis=1)
        out: list[int] = []
        last: object = _UNSET
        cache: dict[tuple[float, ...], object] = {}
        keep = ~same
        for k, row in zip(ticks[keep].tolist(), matrix[keep].tolist(), strict=True):
            key = tuple(row)
            result = cache.get(key, _UNSET)
            if result is _UNSET:
                env = {n: v for n, v in zip(names, row, strict=True) if v == v}  # NaN: unknown
                result = check(env)
                cache[key] = result
            if result != last:
                out.append(k)
                last = result
        return np.asarray(out, dtype=np.int64)


_UNSET = object()


def _sorted_unique(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """np.unique of int arrays, by a stable sort (numpy's hash-based unique is slow on the long,
    mostly sorted tick arrays of a day)."""
    joined = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) != 1 else \
        np.asarray(arrays[0], dtype=np.int64)
    if len(joined) == 0:
        return joined
    if len(arrays) != 1 or np.any(joined[1:] < joined[:-1]):
        joined = np.sort(joined, kind="stable")
    out: np.ndarray = joined[np.concatenate([[True], joined[1:] != joined[:-1]])]
    return out


def _value_of(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda env: env.get(name)


def _bin_of(name: str, edges: tuple[float, ...]) -> Callable[[dict[str, Any]], Any]:
    if not edges:
        return _value_of(name)
    return lambda env: None if name not in env else bisect.bisect_right(edges, env[name])


def _below(name: str, limit: float) -> Callable[[dict[str, Any]], Any]:
    return lambda env: None if name not in env else env[name] < limit


def _above(name: str, limit: float) -> Callable[[dict[str, Any]], Any]:
    return lambda env: None if name not in env else env[name] > limit


def ceil_tick(t: float, tick_s: float) -> int:
    return math.ceil(t / tick_s - _EPS)


# -- policies on the simulated clock ---------------------------------------------------------


class _Policy(Protocol):
    name: str

    def initial_state(self, now: float, target: AccelState = ...) -> PolicyState: ...
    def step(self, state: PolicyState, inputs: Inputs, now: float) -> tuple[PolicyState, Decision]: ...


def policy_timer(core: CerebellumFirst, state: PolicyState, now: float, extra: Sequence[float] = ()) -> float | None:
    """The policy's own next timer, plus `extra` times (the timeout baseline's)."""
    times = [t for t in (core.next_timer(state, now), *extra) if t is not None and t > now]
    return min(times) if times else None


def _needs_bus(params: PolicyParams, state: PolicyState, decision: Decision) -> bool:
    """The daemon's `demand_needs_bus`: a demand active on fresh signals (not woken by staleness)."""
    if not params.demands:
        return False
    stale = set(decision.stale_signals)
    return any(status.active and not (set(spec.expression.names) & stale)
               for spec, status in zip(params.demands, state.demands, strict=False))


@dataclass
class PolicyRun:
    name: str
    accelerator: SimAccelerator
    path: PathRun | None = None
    steps: int = 0
    final_state: PolicyState | None = None
    late_reports: list[tuple[float, float]] = field(default_factory=list)  # (time, lateness s)
    # (time, why): the decision's reason, or the path's filter, each time it changed (sim/breakdown.py)
    reasons: list[tuple[float, str]] = field(default_factory=list)


class _LateReporter:
    """The consumers of the challenges: each knows its real deadline and, when the accelerator
    it needed comes active after that deadline while the challenge still runs, reports how late
    (`Inputs.late_reports`); when a wake serves it on time, how much time it allowed from its
    onset (`Inputs.served_reports`: challenges that began while the accelerator was not active,
    so the policy's latest wake is the one that served them). Causal: a report is made when the
    accelerator comes active, never before."""

    def __init__(self, events: Sequence[tuple[float, float, float]]) -> None:
        self._events = sorted(events, key=lambda e: e[1])  # (start, due, end) by due
        self._by_start = sorted(events)
        self._next = 0
        self._next_start = 0
        self._seen_period = -1

    def reports(self, acc: SimAccelerator) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(lateness of each challenge served late, time allowed by each served on time)."""
        if acc.state is not AccelState.ACTIVE or len(acc.active) - 1 == self._seen_period:
            return (), ()
        self._seen_period = len(acc.active) - 1
        arrived = acc.active[-1][0]
        out: list[float] = []
        while self._next < len(self._events) and self._events[self._next][1] < arrived - 1e-6:
            start, due, end = self._events[self._next]
            self._next += 1
            if start <= arrived <= end and not acc.is_active_at(due):
                out.append(arrived - due)
        previous_end = acc.active[-2][1] if len(acc.active) > 1 else -math.inf
        served: list[float] = []
        while self._next_start < len(self._by_start) and self._by_start[self._next_start][0] <= arrived + 1e-6:
            start, due, end = self._by_start[self._next_start]
            self._next_start += 1
            if start > previous_end and arrived <= min(due, end) + 1e-6:
                served.append(due - start)
        return tuple(out), tuple(served)


def _run_policy(
    policy: _Policy,
    timer: Callable[[PolicyState, float], float | None],
    timeline: _Timeline,
    model: AcceleratorModel,
    initial: AccelState,
    event_driven: bool,
    resume_fails: Callable[[int], bool] | None = None,
    retry_after_s: float = 0.0,
    events: Sequence[tuple[float, float, float]] = (),
    path: DecisionPath | None = None,
) -> PolicyRun:
    """`events`: (start, due, end) of the challenges, whose late service is reported to the
    policy (`_LateReporter`); empty: no reports. `path`: the rest of the daemon's decision path
    (sim/path.py) around `step`; None: `step` alone."""
    tick_s = timeline.tick_s
    reporter = _LateReporter(events) if events else None
    state = policy.initial_state(0.0, initial)
    acc = SimAccelerator(model, state.target, resume_fails=resume_fails, retry_after_s=retry_after_s)
    commanded = state.target
    run = PolicyRun(policy.name, acc)
    shell = None
    if path is not None:
        shell = PathRun(path, timeline.bus_spans, {s.name: s.max_age_s for s in path.params.signals})
        run.path = shell
    change = timeline.change_ticks.tolist()
    heap: list[int] = []
    ci = 0
    k = 0
    decision: Decision | None = None
    while k <= timeline.n_ticks:
        now = k * tick_s
        acc.advance(now)
        if shell is None:
            reports, served = reporter.reports(acc) if reporter is not None else ((), ())
            if reports:
                run.late_reports += [(now, r) for r in reports]
            inputs = Inputs(samples=timeline.samples_at(k), actual=acc.state, late_reports=reports,
                            served_reports=served)
            state, decision = policy.step(state, inputs, now)
            run.steps += 1
            target = decision.target
            label: str | None = decision.reason
        else:
            samples = timeline.samples_at(k)
            if shell.samples_since > -math.inf:
                samples = {n: x for n, x in samples.items() if x.time >= shell.samples_since - _EPS}
            needs_bus = decision is not None and _needs_bus(shell.path.params, state, decision)
            target = commanded
            if shell.before(now, samples, acc, needs_bus):
                if shell.reset_policy:
                    shell.reset_policy = False
                    state = policy.initial_state(now, state.target)
                reports, served = reporter.reports(acc) if reporter is not None else ((), ())
                if reports:
                    run.late_reports += [(now, r) for r in reports]
                inputs = Inputs(samples=samples, holds=shell.holds(now), actual=acc.state, quiet_bus=shell.quiet,
                                parked=shell.parked, late_reports=reports, served_reports=served)
                state, decision = policy.step(state, inputs, now)
                run.steps += 1
                target = decision.target
            target, filtered_by = shell.filtered(target)
            label = filtered_by or ("paused" if shell.paused
                                    else decision.reason if decision is not None else None)
        if label is not None and (not run.reasons or run.reasons[-1][1] != label):
            run.reasons.append((now, label))
        if target is not commanded:
            acc.command(now, target)
            commanded = target
        if shell is not None:
            shell.after(now, acc, commanded, decision.reason if decision is not None and not shell.paused else "")
        if not event_driven:
            k += 1
            continue
        extra = shell.next_times(now, acc) if shell is not None else []
        for t in (timer(state, now), acc.next_change(), *extra):
            if t is not None:
                kt = ceil_tick(t, tick_s)
                heapq.heappush(heap, kt)
                heapq.heappush(heap, kt + 1)  # float rounding at the boundary
        while ci < len(change) and change[ci] <= k:
            ci += 1
        nxt = change[ci] if ci < len(change) else timeline.n_ticks + 1
        while heap and heap[0] <= k:
            heapq.heappop(heap)
        if heap and heap[0] < nxt:
            nxt = heap[0]
        k = nxt
    acc.finish(timeline.n_ticks * tick_s)
    run.final_state = state
    return run


def _run_oracle(scenario: Scenario, model: AcceleratorModel, initial: AccelState, end_s: float) -> PolicyRun:
    t0 = scenario.cycle.times[0]
    needs = need_intervals(((e.start_s - t0, e.end_s - t0, e.deadline_ms / 1000) for e in scenario.events), end_s)
    schedule = plan(needs, model, end_s, initial)
    acc = SimAccelerator(model, initial)
    for t, target in schedule.commands:
        acc.command(t, target)
    acc.finish(end_s)
    return PolicyRun("oracle", acc)


# -- metrics ---------------------------------------------------------------------------------


def _metrics(run: PolicyRun, scenario: Scenario, other_watts: float, end_s: float) -> dict[str, Any]:
    out = _contract_metrics(run, scenario, other_watts, end_s)
    if run.path is not None:
        out["path"] = run.path.figures()
    return out


def _contract_metrics(run: PolicyRun, scenario: Scenario, other_watts: float, end_s: float) -> dict[str, Any]:
    acc = run.accelerator
    t0 = scenario.cycle.times[0]
    served = 0
    by_kind: dict[str, tuple[int, int]] = {}
    latencies: list[float] = []
    for e in scenario.events:
        start, end = e.start_s - t0, e.end_s - t0
        ok = acc.is_active_at(min(start + e.deadline_ms / 1000, end_s))
        served += ok
        total, good = by_kind.get(e.kind.value, (0, 0))
        by_kind[e.kind.value] = (total + 1, good + ok)
        reached = [max(a, start) for a, b in acc.active if b >= start and a <= end]
        if reached:
            latencies.append(min(reached) - start)
    cycles = [(a, b) for (a, b), w in zip(acc.active, acc.woken, strict=True) if w and b > a]
    false_wakes = sum(
        1 for a, b in cycles if not any(e.start_s - t0 <= b and a <= e.end_s - t0 for e in scenario.events)
    )
    n = len(scenario.events)
    flaps = _flaps(acc, [(e.start_s - t0, e.end_s - t0) for e in scenario.events], end_s)
    return {
        "policy": run.name,
        "accelerator_energy_j": round(acc.energy_j, 3),
        "total_energy_j": round(acc.energy_j + other_watts * end_s, 3),
        "readiness": round(served / n, 6) if n else 1.0,
        "missed_events": n - served,
        "wake_cycles": len(cycles),
        "false_wakes": false_wakes,
        "mean_wake_latency_ms": round(1000 * float(np.mean(acc.wake_latencies)), 3) if acc.wake_latencies else 0.0,
        "mean_event_latency_ms": round(1000 * float(np.mean(latencies)), 3) if latencies else 0.0,
        "readiness_by_kind": {k: round(g / t, 6) for k, (t, g) in sorted(by_kind.items())},
        **flaps,
        "failed_resumes": acc.failed_resumes,
    }


def _flaps(acc: SimAccelerator, events: Sequence[tuple[float, float]], end_s: float) -> dict[str, Any]:
    """policies.flapping's figures over the accelerator's steady states (what it did, not what
    was commanded: a command absorbed by a running transition is no flap). Transitional
    segments belong to the change they make; an active period is served when an event
    overlaps it."""
    points: list[TimelinePoint] = []
    for a, b, state in sorted(acc.segments, key=lambda seg: seg[0]):
        if state in (AccelState.WAKING, AccelState.SUSPENDING):
            continue
        served = state is AccelState.ACTIVE and any(s <= b and a <= e for s, e in events)
        if points and points[-1].target is state:
            served = served or points[-1].served
            points[-1] = TimelinePoint(points[-1].time, state, served)
            continue
        points.append(TimelinePoint(a, state, served))
    figures = flap_figures(points, start=0.0, end=end_s)
    return {
        "state_changes": figures.state_changes,
        "state_changes_per_h": round(figures.changes_per_hour, 3),
        "peak_state_changes_per_h": figures.peak_changes_per_hour,
        "unserved_wakes": figures.unserved_wakes,
    }


@dataclass
class Evaluation:
    """The §8 JSON (`result`) plus what plots need (`runs`; `baseline_runs` the causal ones)."""

    result: dict[str, Any]
    runs: list[PolicyRun]
    baseline_runs: list[PolicyRun] = field(default_factory=list)


#: Idle timeouts of the swept `timeout` baselines (s), each to sleep and to idle.
TIMEOUT_SWEEP_S: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TIMEOUT_SWEEP_STATES: tuple[AccelState, ...] = (AccelState.SLEEP, AccelState.IDLE)


def dominated_by(mine: Mapping[str, Any], causal: Sequence[Mapping[str, Any]]) -> list[str]:
    """Causal baselines at least as ready as `mine` that use less accelerator energy."""
    return [
        r["policy"]
        for r in causal
        if r["readiness"] >= mine["readiness"] and r["accelerator_energy_j"] < mine["accelerator_energy_j"]
    ]


def run_evaluation(
    config: Config,
    scenario: Scenario,
    *,
    tick_ms: int = DEFAULT_TICK_MS,
    profile: str | None = None,
    event_driven: bool = True,
    vehicle: SignalSource | None = None,
    resume_failure_probability: float = 0.0,
    ladder: LadderSpec | None = None,
    causal_baselines: bool = True,
    calibration: Calibration | None = None,
    whole_path: bool | None = None,
    learned: Learned | None = None,
    entry_risk: EntryRisk | None = None,
) -> Evaluation:
    """`resume_failure_probability`: chance that a resume fails and needs the ladder's retry;
    `ladder`: whose wake deadline that retry waits for (default: the profile's backend).
    `causal_baselines`: also run `timeout` swept over `TIMEOUT_SWEEP_S` x `TIMEOUT_SWEEP_STATES`
    and `warm_idle` (the configured policy never deeper than idle), reported under
    `causal_baselines`, and list in `dominated_by` those (and `timeout`, `always_on`) at least
    as ready as the configured policy for less energy. `calibration`: what the configured policy
    learned before (a persisted `Calibration`, as the daemon restores it); default: nothing.
    `learned`: learned anticipation's table from earlier drives (`Learned.from_dict`); default: nothing.
    `entry_risk`: the challenges entry risk counted on earlier drives (`parse_entry_risk`); default: none.
    `whole_path`: run the daemon's whole decision path around `step` (sim/path.py: NM clamp,
    vehicle power state, budget, watchdog, holds); default: when the config enables [nm] or
    [vehicle_power] or the scenario schedules holds or key-offs. Each result then has `path`."""
    params = policy_params(config)
    model = load_profile(profile or config.accelerator.profile)
    fails = resume_failures(scenario.seed, resume_failure_probability)
    retry_after_s = (ladder or ladder_for_profile(model)).wake_timeout_s
    tick_s = tick_ms / 1000
    source: SignalSource = vehicle if vehicle is not None else VirtualVehicle(scenario)
    model_ev = scenario.model
    whole = (whole_path if whole_path is not None else
             bool(config.nm.enabled or config.vehicle_power.enabled or model_ev.holds or model_ev.key_off))
    path = DecisionPath.build(config, params, model, model_ev.holds) if whole else None
    timeline = _Timeline(config, params, source, tick_s, frozenset(path.signals_used) if path else frozenset(),
                         path.timeouts() if path else ())
    end_s = timeline.n_ticks * tick_s
    initial = AccelState(config.daemon.initial_state)

    core = CerebellumFirst(params, model)
    timeout = Timeout(
        params,
        model,
        idle_timeout_s=config.policy.timeout_idle_s,
        rest_state=AccelState(config.policy.timeout_state),
    )

    def timer_for(policy: Timeout) -> Callable[[PolicyState, float], float | None]:
        def timer(state: PolicyState, now: float) -> float | None:
            end = state.last_demand_end
            return policy_timer(core, state, now, [end + policy.idle_timeout_s] if end is not None else [])

        return timer

    timeout_timer = timer_for(timeout)

    def core_timer(state: PolicyState, now: float) -> float | None:
        return policy_timer(core, state, now)

    t0 = scenario.cycle.times[0]
    challenges = [(e.start_s - t0, e.due_s - t0, e.end_s - t0) for e in scenario.events]

    def run(policy: _Policy, timer: Callable[[PolicyState, float], float | None]) -> PolicyRun:
        return _run_policy(
            policy, timer, timeline, model, initial, event_driven, fails, retry_after_s, challenges, path
        )

    restored = calibration is not None or learned is not None or entry_risk is not None
    cerebellum = run(_Restored(core, calibration, learned, entry_risk) if restored else core, core_timer)
    cerebellum.name = config.policy.name
    runs = [
        cerebellum,
        run(AlwaysOn(params, model), core_timer),
        run(timeout, timeout_timer),
        # The oracle plans with the future and never fails a resume: the no-failure bound.
        _run_oracle(scenario, model, initial, end_s),
    ]
    other_watts = sum(d.watts or 0.0 for d in config.power.domains if d.source == "constant")
    contract = [_metrics(r, scenario, other_watts, end_s) for r in runs]
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "cycle": scenario.cycle.name,
        "seed": scenario.seed,
        "duration_s": round(end_s, 3),
        "tick_ms": tick_ms,
        "events": len(scenario.events),
        "results": contract,
    }
    baseline_runs: list[PolicyRun] = []
    if causal_baselines:
        for rest in TIMEOUT_SWEEP_STATES:
            for idle_s in TIMEOUT_SWEEP_S:
                swept = Timeout(params, model, idle_timeout_s=idle_s, rest_state=rest)
                one = run(swept, timer_for(swept))
                one.name = f"timeout_{idle_s:g}s_{rest.value}"
                baseline_runs.append(one)
        warm = CerebellumFirst(replace(params, deepest_state=AccelState.IDLE), model)
        one = run(warm, lambda state, now: policy_timer(warm, state, now))
        one.name = "warm_idle"
        baseline_runs.append(one)
        causal = [_metrics(r, scenario, other_watts, end_s) for r in baseline_runs]
        result["causal_baselines"] = causal
        result["dominated_by"] = dominated_by(contract[0], [*contract[1:3], *causal])
    result["calibration"] = _calibration_figures(cerebellum, scenario, core)
    if resume_failure_probability > 0:
        result["resume_failure_probability"] = resume_failure_probability
    return Evaluation(result, runs, baseline_runs)


class _Restored:
    """The configured policy starting from a restored calibration and learned table."""

    def __init__(self, core: CerebellumFirst, calibration: Calibration | None, learned: Learned | None = None,
                 entry_risk: EntryRisk | None = None) -> None:
        self.name = core.name
        self.params = core.params
        self._core, self._calibration, self._learned, self._entry_risk = core, calibration, learned, entry_risk
        self.step = core.step

    def initial_state(self, now: float, target: AccelState = AccelState.IDLE) -> PolicyState:
        return self._core.initial_state(now, target, self._calibration, self._learned, self._entry_risk)


def _calibration_figures(run: PolicyRun, scenario: Scenario, core: CerebellumFirst) -> dict[str, Any]:
    """What the configured policy learned: its final budget for unannounced challenges, late
    wakes, and readiness over the events due after adaptation (the first late wake it learned
    from; all events when it never had one)."""
    state = run.final_state
    assert state is not None
    cal = state.calibration
    t0 = scenario.cycle.times[0]
    since = cal.first_late_at if cal.first_late_at is not None else -math.inf
    after = [e for e in scenario.events if e.due_s - t0 > since]
    served = sum(run.accelerator.is_active_at(e.due_s - t0) for e in after)
    return {
        "budget_s": round(core.unannounced_budget_s(state), 6),
        "learned": cal.budget_s is not None,
        "late_wakes": cal.late_wakes,
        "late_reports": len(run.late_reports),
        "worst_lateness_s": round(cal.worst_lateness_s, 6),
        "trusted": cal.trusted,
        "probation_used_s": round(cal.probation_used_s, 3),
        "adapted_at_s": None if cal.first_late_at is None else round(cal.first_late_at, 3),
        "events_after_adaptation": len(after),
        "readiness_after_adaptation": round(served / len(after), 6) if after else 1.0,
    }


def evaluate(config: Config, scenario: Scenario, **kwargs: Any) -> dict[str, Any]:
    """Fast-forward every policy over the scenario; the §8 JSON object."""
    return run_evaluation(config, scenario, **kwargs).result


def results_by_policy(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["policy"]: r for r in result["results"]}


__all__ = [
    "Evaluation",
    "EventKind",
    "SimAccelerator",
    "evaluate",
    "ladder_for_profile",
    "resume_draw",
    "run_evaluation",
]
