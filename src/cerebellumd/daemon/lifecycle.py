"""Accelerator lifecycle: the wake watchdog (escalation ladder) driven on the daemon's tick, each
transition measured per backend, each failure counted, and the flap figures of the decisions.

The ladder itself is pure (`policies.escalation`); this module only watches the actuator and
performs the rungs through the driver:

- a wake starts when the actuator's goal turns `active` (a goal that stays `active` is the same
  wake; a goal that leaves `active` cancels the watch, which is not a failure);
- each tick the read-back state goes into `Ladder.step`; an action is performed in a task with
  the actuator's drive loop paused (`Actuator.async_recover`), so no command races a rebind;
- `retry` sends the wake again; `rebind`/`pci_rescan`/`rail_cycle` go to drivers that implement
  `RecoverableAccelerator`; drivers without it still get a rail cycle as off-then-on (what a
  plain rail is), and an unsupported rung is counted and left to its deadline;
- `give_up` raises the alarm and keeps the accelerator in the backend's safe state (an actuator
  target filter) until an operator asks for a wake again (a new awake hold) or `clear_alarm`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from typing import Any, Protocol

from ..accel import AccelState
from ..config.escalation import EscalationConfig
from ..drivers.base import AcceleratorDriver, RecoverableAccelerator
from ..policies.escalation import Action, Ladder, LadderState, Phase, Rung
from ..policies.flapping import TimelinePoint, flap_figures
from ..policies.types import HoldMode
from .actuator import Actuator
from .clock import Clock
from .host import Events, HoldsHost, Snapshot, Undo
from .metrics import Metrics
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

_FLAP_WINDOW_S = 3600.0
_MAX_TIMELINE = 10_000  # bounded: a flapping daemon must not grow memory
STEPS: tuple[str, ...] = (*(r.value for r in Rung),)
RESULTS = ("succeeded", "recovered", "cancelled", "unsupported", "action_failed")


class LifecycleHost(Events, HoldsHost, Protocol):
    """What the watchdog needs of the daemon: its events and the holds in force."""


class Lifecycle:
    """A part: registers its hooks at start (undone at stop), runs rung actions as tasks."""

    def __init__(self, cfg: EscalationConfig, *, actuator: Actuator, driver: AcceleratorDriver,
                 host: LifecycleHost, clock: Clock, metrics: Metrics) -> None:
        self._actuator = actuator
        self._driver = driver
        self._host = host
        self._clock = clock
        self._undo: list[Undo] = []
        self.enabled = cfg.enabled
        self.ladder = Ladder(cfg.spec())
        self.backend = cfg.backend
        self.watch = LadderState()
        self.alarm: str | None = None
        self.last_action: Action | None = None
        self._want: AccelState | None = None
        self._task: asyncio.Task[None] | None = None
        self._holds_at_alarm: frozenset[str] = frozenset()
        self._last_latency: float | None = None
        self._timeline: collections.deque[TimelinePoint] = collections.deque(maxlen=_MAX_TIMELINE)
        self._flap_changes = 0
        self._unserved = 0
        self._cycle_served: bool | None = None  # None: not awake
        self.m_steps = metrics.counter("cerebellumd_escalations", "Wake watchdog rungs taken, by step.", ["step"])
        self.m_results = metrics.counter("cerebellumd_escalation_results",
                                         "Wake watchdog outcomes (succeeded, recovered, cancelled, ...).", ["result"])
        self.m_alarm = metrics.gauge("cerebellumd_accelerator_alarm",
                                     "1 after the watchdog gave up (accelerator held in its safe state).")
        self.m_wake = metrics.histogram("cerebellumd_backend_wake_latency_seconds",
                                        "Wake command to read-back active, per backend.", ["backend"])
        self.m_transition = metrics.histogram("cerebellumd_transition_seconds",
                                              "One driver command to its read-back, per backend and target.",
                                              ["backend", "target"])
        self.m_failures = metrics.counter("cerebellumd_backend_failures",
                                          "Failed driver commands per backend and kind.", ["backend", "kind"])
        self.m_flaps = metrics.counter("cerebellumd_flaps", "Changes of the accelerator's target state.")
        self.m_unserved = metrics.counter("cerebellumd_unserved_wakes",
                                          "Wake cycles that ended with no demand or awake hold served.")
        self.m_flap_rate = metrics.gauge("cerebellumd_flap_rate_per_hour",
                                         "Target changes per hour over the last hour.")
        for step in STEPS:
            self.m_steps.labels(step)
        for result in RESULTS:
            self.m_results.labels(result)
        self.m_wake.labels(self.backend)

    # -- part ---------------------------------------------------------------------------------

    async def async_start(self) -> None:
        act, host = self._actuator, self._host
        self._undo += [
            act.add_target_filter("path:watchdog_alarm", self._filter),
            act.on_transition(self._on_transition),
            act.on_failure(self._on_failure),
            host.on_tick(self._on_tick),
            host.on_telemetry(self._on_telemetry),
            host.on_decision(self._on_decision),
        ]

    async def async_stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        while self._undo:
            self._undo.pop()()

    def state_extra(self) -> dict[str, Any]:
        """For MQTT `state`: the watchdog's phase, last rung, counts and the alarm."""
        return {"watchdog": {
            "backend": self.backend,
            "phase": self.watch.phase.value,
            "last_step": self.last_action.rung.value if self.last_action else None,
            "last_reason": self.last_action.reason if self.last_action else None,
            "alarm": self.alarm,
            "counts": dict(self.watch.counts),
        }}

    def clear_alarm(self) -> None:
        if self.alarm is not None:
            log.warning("accelerator alarm cleared; wakes allowed again")
        self.alarm = None
        self.m_alarm.set(0)

    # -- hooks ------------------------------------------------------------------------------

    def _filter(self) -> AccelState | None:
        return self.ladder.spec.safe_state if self.alarm is not None else None

    def _on_tick(self, now: float) -> None:
        if self.alarm is not None:
            self._maybe_clear(now)
        if not self.enabled:
            return
        act = self._actuator
        # The actuator drops its goal after its own retries; the policy still wants it.
        goal = act.goal if act.goal is not None else self._want
        before, self._want = self._want, goal
        if goal is AccelState.ACTIVE and before is not AccelState.ACTIVE:
            self.watch = self.ladder.begin(self.watch, now, act.expected_wake_s())
        elif goal is not AccelState.ACTIVE and before is AccelState.ACTIVE:
            if self.watch.phase is Phase.WATCHING:
                self.m_results.labels("cancelled").inc()
            self.watch = self.ladder.cancel(self.watch)
        if self._task is not None and not self._task.done():
            return  # a rung is under way: its deadline covers the action itself
        phase = self.watch.phase
        self.watch, action = self.ladder.step(self.watch, act.state, now)
        if phase is Phase.WATCHING and self.watch.phase is Phase.SUCCEEDED:
            self.m_results.labels("succeeded" if self.last_action is None else "recovered").inc()
            self.last_action = None
        if action is not None:
            self._take(action, now)

    def _take(self, action: Action, now: float) -> None:
        self.last_action = action
        self.m_steps.labels(action.rung.value).inc()
        if action.rung is Rung.GIVE_UP:
            self.alarm = action.reason
            self.m_alarm.set(1)
            self._holds_at_alarm = frozenset(h.id for h in self._host.operator_holds(now))
            log.error("accelerator watchdog gave up (%s); holding it %s until an operator asks again",
                      action.reason, self.ladder.spec.safe_state.value)
            self._actuator.request(self.ladder.spec.safe_state)  # the filter maps it anyway
            return
        log.warning("accelerator watchdog: %s (step %d: %s)", action.reason, action.attempt, action.rung.value)
        self._task = asyncio.create_task(self._perform(action.rung), name=f"watchdog-{action.rung.value}")

    async def _perform(self, rung: Rung) -> None:
        act = self._actuator
        driver = self._driver
        timeout = self._clock.wall_seconds(self._rung_timeout(rung))
        command_s = act.config.command_timeout_ms / 1000
        try:
            if rung is Rung.RETRY:
                await act.async_recover(lambda: driver.async_set_state(AccelState.ACTIVE), command_s)
            elif isinstance(driver, RecoverableAccelerator) and rung.value in driver.recovery_actions():
                await act.async_recover(lambda: driver.async_recover(rung.value), timeout)
            elif rung is Rung.RAIL_CYCLE:
                async def off_then_on() -> None:  # a plain rail: off is the cycle
                    await driver.async_set_state(AccelState.OFF)
                    await driver.async_set_state(AccelState.ACTIVE)

                await act.async_recover(off_then_on, timeout)
            else:
                self.m_results.labels("unsupported").inc()
                log.warning("driver %s cannot %s; waiting for the next step", type(driver).__name__, rung.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the ladder goes on at the deadline; the failure is counted
            self.m_results.labels("action_failed").inc()
            log.error("watchdog step %s failed: %s", rung.value, exc)

    def _rung_timeout(self, rung: Rung) -> float:
        return next((r.timeout_s for r in self.ladder.spec.rungs if r.rung is rung), self.ladder.spec.wake_timeout_s)

    def _maybe_clear(self, now: float) -> None:
        fresh = [h for h in self._host.operator_holds(now)
                 if h.id not in self._holds_at_alarm and h.mode is HoldMode.AWAKE]
        if fresh:
            log.warning("operator %s asks for the accelerator: clearing the alarm", fresh[0].owner)
            self.clear_alarm()

    def _on_transition(self, target: AccelState, seconds: float) -> None:
        self.m_transition.labels(self.backend, target.value).observe(seconds)
        latency = self._actuator.last_wake_latency_s
        if target is AccelState.ACTIVE and latency is not None and latency != self._last_latency:
            self._last_latency = latency
            self.m_wake.labels(self.backend).observe(latency)

    def _on_failure(self, target: AccelState, kind: str) -> None:
        self.m_failures.labels(self.backend, kind).inc()

    # -- flapping -----------------------------------------------------------------------------

    def _on_decision(self, snap: Snapshot) -> None:
        served = bool(snap.active_demands) or any(h.mode is HoldMode.AWAKE for h in snap.holds)
        target = snap.target
        last = self._timeline[-1] if self._timeline else None
        if last is not None and target is not last.target:
            self._flap_changes += 1
            self.m_flaps.inc()
        self._timeline.append(TimelinePoint(snap.time, target, served))
        if target is AccelState.ACTIVE:
            self._cycle_served = served if self._cycle_served is None else (self._cycle_served or served)
        elif self._cycle_served is not None:
            if not self._cycle_served:
                self._unserved += 1
                self.m_unserved.inc()
            self._cycle_served = None

    def _on_telemetry(self, now: float) -> None:
        while self._timeline and now - self._timeline[0].time > _FLAP_WINDOW_S:
            self._timeline.popleft()
        self.m_flap_rate.set(self.flap_rate_per_hour(now))

    def flap_rate_per_hour(self, now: float) -> float:
        """Target changes per hour over the last hour (or since start when younger)."""
        points = list(self._timeline)
        if len(points) < 2:
            return 0.0
        start = max(points[0].time, now - _FLAP_WINDOW_S)
        figures = flap_figures(points, start=start, end=max(now, points[-1].time))
        span = figures.duration_s
        return figures.state_changes * 3600.0 / max(span, 60.0) if math.isfinite(span) else 0.0
