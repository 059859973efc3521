"""The cerebellum-first policy: a pure `step(state, inputs, now) -> (state, decision)`.

The gateway handles routine itself; the accelerator is woken only for validated demands,
warmed by anticipatory ones, kept awake `release_s` after the last demand, then sent to the
deepest resting state whose break-even time fits the predicted idle time and whose exit
latency fits the latency budget of the challenges that may come unannounced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from ..accel import RESTING_STATES, AcceleratorModel, AccelState
from .calibration import Calibration, CalibrationParams, next_relax, note_late, relax, tighten
from .entry_risk import EntryRisk, count_challenge, entry_window_s, spend
from .expr import Value
from .learned import Learned, context_of, explains, label, next_change, observe, teach
from .learned import warm as learned_warm
from .types import (
    Decision,
    DemandClass,
    DemandSpec,
    DemandStatus,
    Hold,
    HoldMode,
    Inputs,
    OnStale,
    PolicyParams,
    Sample,
)

_HOUR_S = 3600.0
#: Times are float seconds; comparisons of durations allow this much rounding.
_EPS = 1e-9
#: The reason while the probation holds the rest target at idle (calibration.py).
_PROBATION = "cap:probation"
_STALE_RANK = {OnStale.IGNORE: 0, OnStale.HOLD: 1, OnStale.WAKE: 2}


@dataclass(frozen=True, slots=True)
class PolicyState:
    target: AccelState
    target_since: float
    started_at: float
    demands: tuple[DemandStatus, ...]
    wake_active: bool = False  # some waking demand (or awake hold) held at the last step
    last_demand_end: float | None = None
    predicted_idle_s: float = 30.0
    wake_times: tuple[float, ...] = ()
    reason: str = "start"
    # After an anticipation ends the accelerator stays warm (for its latency budget) until
    # `warm_until`: the challenge it announced may still come (a car stopped in drive shifts
    # to reverse before it parks), and a warm -> deep -> wake round trip costs more.
    warm_budget_s: float | None = None
    warm_until: float = float("-inf")
    # Self-calibrating readiness (policies/calibration.py): what the late wakes taught, and the
    # wake under way (onset of its demand, its deadline, whether it came unannounced, i.e. not
    # while anticipating), then the latest wake's measured latency for late reports.
    calibration: Calibration = field(default_factory=Calibration)
    wake_onset: float | None = None
    wake_deadline_s: float = 0.0
    wake_unannounced: bool = False
    last_wake_latency_s: float | None = None
    last_wake_unannounced: bool = False
    last_wake_late: bool = False
    # Learned anticipation (policies/learned.py): onsets and exposure per context.
    learned: Learned = field(default_factory=Learned)
    # Entry risk (policies/entry_risk.py): challenges seen, and the window seconds entries may take.
    entry_risk: EntryRisk = field(default_factory=EntryRisk)
    # Probation (calibration.py): since when the rest target is held at idle by it (None: not held).
    probation_since: float | None = None


@dataclass(frozen=True, slots=True)
class _Evaluated:
    statuses: tuple[DemandStatus, ...]
    active: tuple[DemandSpec, ...]
    validations: tuple[tuple[str, str], ...]
    stale: tuple[str, ...]
    stale_woken: dict[str, str]  # demand -> stale signal that forced it true


class CerebellumFirst:
    """The default policy. Immutable; all mutable facts live in `PolicyState`."""

    name = "cerebellum_first"

    def __init__(self, params: PolicyParams, model: AcceleratorModel) -> None:
        self.params = params
        self.model = model
        self._specs = {s.name: s for s in params.signals}

    def initial_state(
        self,
        now: float,
        target: AccelState = AccelState.IDLE,
        calibration: Calibration | None = None,
        learned: Learned | None = None,
        entry_risk: EntryRisk | None = None,
    ) -> PolicyState:
        """`calibration`: a persisted one (`Calibration.from_dict`) to start from; `learned`:
        learned anticipation's table from earlier runs (`Learned.from_dict`); `entry_risk`: the
        challenges counted in earlier runs (`parse_entry_risk`)."""
        return PolicyState(
            target=target,
            target_since=now,
            started_at=now,
            demands=tuple(DemandStatus() for _ in self.params.demands),
            predicted_idle_s=self.params.initial_idle_prediction_s,
            calibration=calibration if calibration is not None else Calibration(),
            learned=learned if learned is not None else Learned(),
            entry_risk=entry_risk if entry_risk is not None else EntryRisk(),
        )

    def unannounced_budget_s(self, state: PolicyState) -> float:
        """The latency budget in force for unannounced challenges (the learned one when
        calibration has tightened it, else the configured `latency_budget_s`): export it."""
        return state.calibration.effective(self.params.latency_budget_s)[0]

    # -- evaluation ---------------------------------------------------------------------

    def stale_signals(self, samples: Mapping[str, Sample], now: float, started_at: float) -> tuple[str, ...]:
        stale = []
        for spec in self.params.signals:
            sample = samples.get(spec.name)
            if sample is None:
                # Never received: give the bus one max_age after start before calling it stale.
                if now - started_at > spec.max_age_s:
                    stale.append(spec.name)
            elif now - sample.time > spec.max_age_s:
                stale.append(spec.name)
        return tuple(stale)

    def _evaluate(self, state: PolicyState, inputs: Inputs, now: float) -> _Evaluated:
        stale = self.stale_signals(inputs.samples, now, state.started_at)
        stale_set = set(stale)
        env: dict[str, Value] = {}
        for name, sample in inputs.samples.items():
            if name not in stale_set:
                env[name] = sample.value
        statuses: list[DemandStatus] = []
        active: list[DemandSpec] = []
        validations: list[tuple[str, str]] = []
        stale_woken: dict[str, str] = {}
        for spec, status in zip(self.params.demands, state.demands, strict=True):
            raw = spec.expression(env)
            truth: bool
            if raw is None and (inputs.quiet_bus or inputs.parked):
                truth = False  # the bus sleeps: quiet is not a fault (see Inputs.quiet_bus)
            elif raw is None:
                policy, culprit = self._on_stale(spec, stale_set)
                if policy is OnStale.WAKE:
                    truth = True
                    stale_woken[spec.name] = culprit
                elif policy is OnStale.HOLD:
                    truth = status.active
                else:
                    truth = False
            else:
                truth = bool(raw)
            new_status, validation = self._validate(spec, status, truth, now)
            statuses.append(new_status)
            if validation:
                validations.append((spec.name, validation))
            if new_status.active:
                active.append(spec)
        return _Evaluated(tuple(statuses), tuple(active), tuple(validations), stale, stale_woken)

    def _on_stale(self, spec: DemandSpec, stale: set[str]) -> tuple[OnStale, str]:
        involved = sorted(n for n in spec.expression.names if n in stale or n not in self._specs)
        best, culprit = OnStale.IGNORE, ""
        for name in involved:
            sig = self._specs.get(name)
            policy = sig.on_stale if sig is not None else OnStale.IGNORE
            if _STALE_RANK[policy] > _STALE_RANK[best]:
                best, culprit = policy, name
        return best, culprit

    @staticmethod
    def _validate(
        spec: DemandSpec, status: DemandStatus, truth: bool, now: float
    ) -> tuple[DemandStatus, str | None]:
        if not truth:
            if status.pending_since is not None and not status.active:
                return DemandStatus(last_true=status.last_true), "expired"
            return DemandStatus(last_true=status.last_true), None
        if status.active:
            return replace(status, last_true=now), None
        if spec.demand_class is DemandClass.CRITICAL or spec.confirm_s <= 0:
            validation = "validated" if spec.demand_class is DemandClass.NORMAL else None
            return DemandStatus(active=True, last_true=now), validation
        pending = status.pending_since if status.pending_since is not None else now
        if now - pending >= spec.confirm_s - _EPS:
            return DemandStatus(active=True, pending_since=pending, last_true=now), "validated"
        return DemandStatus(pending_since=pending, last_true=now), None

    # -- decision -----------------------------------------------------------------------

    def step(self, state: PolicyState, inputs: Inputs, now: float) -> tuple[PolicyState, Decision]:
        p = self.params
        ev = self._evaluate(state, inputs, now)
        cal, wake, learned = self._calibrate(state, inputs, now)
        cal = _count_probation(cal, state.probation_since, now, p.calibration)
        risk = self._count_challenges(state, ev, now)
        # Highest priority decides; at equal priority awake beats sleep (fail-safe, the lease
        # rule), whatever order the hold sources (operator store, leases) listed them in.
        holds = sorted(
            (h for h in inputs.holds if h.expires_at > now),
            key=lambda h: (h.priority, h.mode is HoldMode.AWAKE),
            reverse=True,
        )
        top_hold: Hold | None = holds[0] if holds else None
        sleep_hold = top_hold is not None and top_hold.mode is HoldMode.SLEEP

        denied: str | None = None
        critical = [d for d in ev.active if d.demand_class is DemandClass.CRITICAL]
        normal = [d for d in ev.active if d.demand_class is DemandClass.NORMAL]
        anticipatory = [d for d in ev.active if d.demand_class is DemandClass.ANTICIPATORY]
        guard = self._guard(inputs.samples, now, state.started_at, ev.stale)
        if (guard or sleep_hold) and (normal or anticipatory):
            denied = guard or f"hold:{top_hold.owner if top_hold else ''}"
            normal, anticipatory = [], []
        if inputs.parked and (normal or anticipatory):
            denied = denied or "parked"
            normal, anticipatory = [], []

        learned, hint = self._learn(state, learned, inputs, ev, now)
        if hint is not None and (guard or sleep_hold or inputs.parked):
            hint = None
        wakers = critical + normal
        awake_hold = top_hold is not None and top_hold.mode is HoldMode.AWAKE
        want: AccelState
        reason: str
        bypass_dwell = False
        if critical:
            want, reason, bypass_dwell = AccelState.ACTIVE, self._demand_reason(critical[0], ev), True
        elif normal:
            want, reason = AccelState.ACTIVE, self._demand_reason(normal[0], ev)
        elif awake_hold and top_hold is not None:
            want, reason = AccelState.ACTIVE, f"hold:{top_hold.owner}"
        elif inputs.parked:
            want, reason = p.deepest_state, "parked"
        else:
            want, reason = self._rest_target(state, anticipatory, now, sleep_hold, cal, risk, hint)
        # While anticipating, the warm hold has no end; it starts running out at the first
        # step without anticipation (so the result does not depend on how often we step).
        warm_budget, warm_until = state.warm_budget_s, state.warm_until
        if anticipatory or hint is not None:
            tightest = min([d.deadline_s for d in anticipatory] + ([hint[1]] if hint is not None else []))
            held = warm_budget is not None and now < warm_until - _EPS
            if not held or warm_budget is None or tightest <= warm_budget:
                warm_budget, warm_until = tightest, math.inf
        elif warm_until == math.inf:
            warm_until = now + p.anticipation_release_s

        is_wake = want is AccelState.ACTIVE and state.target is not AccelState.ACTIVE
        wake_times = tuple(t for t in state.wake_times if now - t < _HOUR_S)
        if is_wake and not critical and len(wake_times) >= p.max_wake_cycles_per_hour:
            denied = "cap:wake_cycles"
            want, reason = (p.deepest_state, "parked") if inputs.parked else self._rest_target(
                state, anticipatory, now, sleep_hold, cal, risk, hint)
            is_wake = False

        # Hysteresis: hold the current target for min_dwell unless a critical demand says go.
        if (
            want is not state.target
            and not bypass_dwell
            and now - state.target_since < p.min_dwell_s - _EPS
        ):
            want, reason, is_wake = state.target, "dwell", False

        waking_now = bool(wakers) or awake_hold
        last_end = state.last_demand_end
        predicted = state.predicted_idle_s
        if state.wake_active and not waking_now:
            last_end = now
        if is_wake:
            wake_times = (*wake_times, now)
            if wakers:
                onset = min(s.pending_since if s.pending_since is not None else now for s in self._statuses(ev, wakers))
                wake = replace(
                    wake,
                    wake_onset=onset,
                    wake_deadline_s=min(d.deadline_s for d in wakers),
                    # A critical demand has no precursor by definition: a surprise during an
                    # anticipation is as unannounced as one at rest.
                    wake_unannounced=not state.reason.startswith("anticipate")
                    or any(d.demand_class is DemandClass.CRITICAL for d in wakers),
                    last_wake_late=False,
                )
            if state.last_demand_end is not None:
                gap = now - state.last_demand_end
                w = p.idle_prediction_weight
                predicted = (1 - w) * predicted + w * gap

        changed = want is not state.target
        if changed and not inputs.parked and _deeper(want, state.target):
            risk = spend(risk, now, entry_window_s(self.model, want, p.latency_budget_s), p.entry_risk)
        new_state = PolicyState(
            target=want,
            target_since=now if changed else state.target_since,
            started_at=state.started_at,
            demands=ev.statuses,
            wake_active=waking_now,
            last_demand_end=last_end,
            predicted_idle_s=predicted,
            wake_times=wake_times,
            reason=reason,
            warm_budget_s=warm_budget,
            warm_until=warm_until,
            calibration=cal,
            wake_onset=wake.wake_onset,
            wake_deadline_s=wake.wake_deadline_s,
            wake_unannounced=wake.wake_unannounced,
            last_wake_latency_s=wake.last_wake_latency_s,
            last_wake_unannounced=wake.last_wake_unannounced,
            last_wake_late=wake.last_wake_late,
            learned=learned,
            entry_risk=risk,
            probation_since=now if reason == _PROBATION else None,
        )
        decision = Decision(
            target=want,
            reason=reason,
            changed=changed,
            active_demands=tuple(d.name for d in ev.active),
            stale_signals=ev.stale,
            validations=ev.validations,
            wake=is_wake,
            denied=denied,
        )
        return new_state, decision

    def next_timer(self, state: PolicyState, now: float) -> float | None:
        """Earliest time after `now` at which `step` may decide differently with unchanged
        inputs (confirm, dwell, release, warm hold, break-even promotion as the idle time
        grows, the wake cap's hour window). Conservative: it may name times where nothing
        changes. The evaluator steps only at these times and at input changes."""
        p = self.params
        times = [state.target_since + p.min_dwell_s, state.target_since + p.release_s, state.warm_until]
        for spec, status in zip(p.demands, state.demands, strict=True):
            if status.pending_since is not None and not status.active:
                times.append(status.pending_since + spec.confirm_s)
        if state.last_demand_end is not None:
            times.append(state.last_demand_end + p.release_s)
            times += [state.last_demand_end + self.model.break_even_s(s) for s in RESTING_STATES]
        if state.wake_times:
            times.append(state.wake_times[0] + _HOUR_S)
        relax_at = next_relax(state.calibration, p.calibration)
        if relax_at is not None:
            times.append(relax_at)
        if state.probation_since is not None:
            times.append(state.probation_since + p.calibration.probation_s - state.calibration.probation_used_s)
        for rest in RESTING_STATES:  # an entry waiting for its window seconds
            window = entry_window_s(self.model, rest, p.latency_budget_s)
            refilled = state.entry_risk.available_at(window, now, p.entry_risk) if window > 0 else None
            if refilled is not None:
                times.append(refilled)
        if p.learned.enabled:
            cools_at = next_change(p.learned, state.learned, now)
            if cools_at is not None:
                times.append(cools_at)
        future = [t for t in times if t > now and math.isfinite(t)]
        return min(future) if future else None

    def _calibrate(
        self, state: PolicyState, inputs: Inputs, now: float
    ) -> tuple[Calibration, PolicyState, Learned]:
        """Relax after a clean stretch; measure the wake under way when the accelerator reports
        `active` (late against its demand's deadline?); learn from late reports. Returns the
        calibration, `state` with the wake fields updated (only those are read back), and the
        learned contexts: a lesson about a challenge whose context the policy has learned to keep
        warm tightens that context's deadline instead of the unannounced budget."""
        cp = self.params.calibration
        cal = relax(state.calibration, now, self.params.latency_budget_s, cp)
        learned = state.learned

        configured = self.params.latency_budget_s

        def lesson(allowed: float, lateness: float, count: bool = True) -> Calibration:
            nonlocal learned
            lp = self.params.learned
            if lp.enabled:
                learned = teach(learned, allowed - cp.margin_s)
                if explains(lp, learned):
                    return cal
            if self.params.entry_risk.enabled and allowed >= configured - cp.margin_s - _EPS:
                # The challenge allowed the configured budget: it came late because it arrived
                # while an entry was under way. Entry risk keeps such arrivals rare; ruling the
                # state out would only cost energy (calibration.py, "deadline lesson").
                return note_late(cal, lateness, cp, count=count)
            return tighten(cal, now, allowed, lateness, cp, count=count, configured_s=configured)

        wake = state
        if state.wake_onset is not None and inputs.actual is AccelState.ACTIVE:
            latency = now - state.wake_onset
            late = latency - state.wake_deadline_s
            counted = False
            if state.wake_unannounced and late > _EPS:
                cal = lesson(state.wake_deadline_s, late)
                counted = True
            if state.wake_unannounced and not cal.trusted and state.wake_deadline_s >= configured - cp.margin_s:
                # An unannounced challenge that tests the configured budget was met: its consumer's
                # report (this step or later) says whether the world allows that budget.
                cal = replace(cal, trusted=True)
            wake = replace(
                state,
                wake_onset=None,
                last_wake_latency_s=latency,
                last_wake_unannounced=state.wake_unannounced,
                last_wake_late=counted,
            )
        if inputs.late_reports and wake.last_wake_latency_s is not None and wake.last_wake_unannounced:
            for lateness in inputs.late_reports:
                allowed = wake.last_wake_latency_s - lateness
                cal = lesson(allowed, lateness, count=not wake.last_wake_late)
                wake = replace(wake, last_wake_late=True)
        if inputs.served_reports and wake.last_wake_latency_s is not None and wake.last_wake_unannounced:
            # Served on time, but the challenge allowed less than the deadline this wake counted
            # on: the config's deadline is wrong for it, and the next one may find us deeper.
            for allowed in inputs.served_reports:
                if allowed < wake.wake_deadline_s - _EPS:
                    cal = lesson(allowed, 0.0, count=False)
        return cal, wake, learned

    def _learn(
        self, state: PolicyState, learned: Learned, inputs: Inputs, ev: _Evaluated, now: float
    ) -> tuple[Learned, tuple[str, float] | None]:
        """Count the onset of a waking demand and the exposure of the current context; the
        learned hint (reason, deadline) when the context is warm."""
        lp = self.params.learned
        if not lp.enabled:
            return learned, None
        waking = before_waking = False
        onset: float | None = None
        for spec, was, now_true in self._waking_transitions(state, ev):
            if now_true:
                waking = True
                if not was:
                    deadline = max(0.0, spec.deadline_s - spec.confirm_s)
                    onset = deadline if onset is None else min(onset, deadline)
            before_waking = before_waking or was
        if before_waking:
            onset = None  # a waking demand was already true: not an onset
        learned = observe(learned, context_of(lp, inputs.samples, ev.stale), waking, onset, now)
        hot = learned_warm(lp, learned, now)
        if hot is None:
            return learned, None
        return learned, (f"learned:{label(lp, hot[0])}", hot[1])

    def _statuses(self, ev: _Evaluated, specs: list[DemandSpec]) -> list[DemandStatus]:
        names = {d.name for d in specs}
        return [st for d, st in zip(self.params.demands, ev.statuses, strict=True) if d.name in names]

    @staticmethod
    def _demand_reason(spec: DemandSpec, ev: _Evaluated) -> str:
        culprit = ev.stale_woken.get(spec.name)
        return f"stale:{culprit}" if culprit else f"demand:{spec.name}"

    def _guard(
        self, samples: Mapping[str, Sample], now: float, started_at: float, stale: tuple[str, ...]
    ) -> str | None:
        g = self.params.guards
        if g.battery_signal and g.battery_signal not in stale:
            battery = samples.get(g.battery_signal)
            if battery is not None and battery.value < g.battery_min_v:
                return "guard:battery"
        if g.temperature_signal and g.temperature_signal not in stale:
            temp = samples.get(g.temperature_signal)
            if temp is not None and temp.value > g.temperature_max_c:
                return "guard:thermal"
        return None

    def _rest_target(
        self,
        state: PolicyState,
        anticipatory: list[DemandSpec],
        now: float,
        sleep_hold: bool,
        cal: Calibration,
        risk: EntryRisk,
        hint: tuple[str, float] | None = None,
    ) -> tuple[AccelState, str]:
        p = self.params
        if state.target is AccelState.ACTIVE and not sleep_hold:
            ended = state.last_demand_end if not state.wake_active else now
            if ended is not None and now - ended < p.release_s - _EPS:
                return AccelState.ACTIVE, "release"
            if ended is None and now - state.target_since < p.release_s - _EPS:
                return AccelState.ACTIVE, "release"
        # Predicted idle grows with the idle time already seen (a long quiet spell promotes
        # to deeper states, as the menu governor corrects its guess).
        idle_so_far = now - state.last_demand_end if state.last_demand_end is not None else 0.0
        predicted = max(state.predicted_idle_s, idle_so_far)
        held = state.warm_budget_s if state.warm_budget_s is not None and now < state.warm_until - _EPS else None
        budget, whole_entry = cal.effective(p.latency_budget_s)
        # An unannounced challenge may come during an anticipation as well: its depth also fits
        # the budget for those (with the mid-entry worst case once calibration has tightened it).
        unannounced, capped = self._deepest_unannounced(predicted, budget, whole_entry, state.target, risk, now)
        probation = cal.on_probation(p.calibration) and _deeper(unannounced, AccelState.IDLE)
        if probation:
            unannounced = AccelState.IDLE
        if anticipatory or hint is not None:
            named = [(d.deadline_s, f"anticipate:{d.name}") for d in anticipatory]
            if hint is not None:
                named.append((hint[1], hint[0]))
            deadline, why = min(named)
            if held is not None and held < deadline:
                return _shallower(self.model.deepest_state(predicted, held), unannounced), "anticipate:release"
            chosen = _shallower(self.model.deepest_state(predicted, deadline), unannounced)
            return chosen, why
        if held is not None:
            return _shallower(self.model.deepest_state(predicted, held), unannounced), "anticipate:release"
        if probation:
            return unannounced, _PROBATION
        if capped:
            return unannounced, "cap:entry_risk"  # a deeper entry waits for its window seconds
        return unannounced, f"rest:{unannounced.value}"

    def _deepest_unannounced(
        self, predicted_idle_s: float, budget_s: float, whole_entry: bool,
        current: AccelState = AccelState.ACTIVE, risk: EntryRisk | None = None, now: float = 0.0,
    ) -> tuple[AccelState, bool]:
        """The deepest state for unannounced challenges, and whether entry risk held back a
        deeper one. With `whole_entry` (calibration has tightened the budget) a challenge may
        arrive just as the entry starts: it waits for the whole entry and then the exit, and that
        worst case must fit the budget. Otherwise the exit must fit, and a new entry whose first
        seconds would make such a challenge late must be allowed by `risk` at `now`
        (entry_risk.py; None: not limited)."""
        allowed = RESTING_STATES[RESTING_STATES.index(self.params.deepest_state) :]
        capped = False
        for state in allowed:
            if self.model.break_even_s(state) > predicted_idle_s:
                continue
            if whole_entry:
                if self.model.enter[state].latency_s + self.model.exit_latency_s(state) <= budget_s + _EPS:
                    return state, capped
            elif self.model.exit_latency_s(state) <= budget_s:
                if risk is None or not _deeper(state, current) or risk.allows(
                        entry_window_s(self.model, state, budget_s), now, self.params.entry_risk):
                    return state, capped
                capped = True  # a deeper entry waits for its window seconds
        return AccelState.IDLE, capped

    def _count_challenges(self, state: PolicyState, ev: _Evaluated, now: float) -> EntryRisk:
        """Count the onsets of waking demands for entry risk: unannounced is a critical one, or
        one that began while no anticipation (or its warm hold) was in force."""
        rp = self.params.entry_risk
        risk = state.entry_risk
        if not rp.enabled:
            return risk
        anticipating = state.reason.startswith(("anticipate", "learned")) or now < state.warm_until - _EPS
        for spec, was, now_true in self._waking_transitions(state, ev):
            if now_true and not was:
                unannounced = spec.demand_class is DemandClass.CRITICAL or not anticipating
                risk = count_challenge(risk, now, unannounced, rp)
        return risk

    def _waking_transitions(self, state: PolicyState, ev: _Evaluated) -> Iterator[tuple[DemandSpec, bool, bool]]:
        """Per waking (non-anticipatory) demand: (spec, true at the last step, true now), where
        true means active or pending validation: what onsets are counted from."""
        for spec, before, after in zip(self.params.demands, state.demands, ev.statuses, strict=True):
            if spec.demand_class is not DemandClass.ANTICIPATORY:
                yield (spec, before.active or before.pending_since is not None,
                       after.active or after.pending_since is not None)


def _count_probation(cal: Calibration, since: float | None, now: float, p: CalibrationParams) -> Calibration:
    """The rest held at idle by the probation since the last step, counted; trusted once its time is spent."""
    if since is None or cal.trusted:
        return cal
    used = cal.probation_used_s + max(0.0, now - since)
    return replace(cal, probation_used_s=used, trusted=used >= p.probation_s - _EPS)


def _deeper(a: AccelState, b: AccelState) -> bool:
    """Whether resting state `a` is deeper than `b` (any resting state is deeper than a state that is not)."""
    if a not in RESTING_STATES:
        return False
    return b not in RESTING_STATES or RESTING_STATES.index(a) < RESTING_STATES.index(b)


def _shallower(a: AccelState, b: AccelState) -> AccelState:
    """The shallower of two resting states (the one that wakes faster)."""
    return a if RESTING_STATES.index(a) >= RESTING_STATES.index(b) else b
