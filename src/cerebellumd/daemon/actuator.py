"""Actuation: drives the accelerator toward the policy's target through its driver. Each
command is time-limited and retried with exponential backoff; the state is read back, never
assumed. A newer target supersedes the command under way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..accel import COMMANDABLE_STATES, RESTING_STATES, AcceleratorModel, AccelState
from ..config import AcceleratorConfig
from ..drivers.base import AcceleratorDriver, EagerAccelerator
from .clock import Clock
from .host import Hooks, Undo
from .metrics import Metrics

log = logging.getLogger(__name__)


class Actuator:
    def __init__(
        self,
        driver: AcceleratorDriver,
        model: AcceleratorModel,
        config: AcceleratorConfig,
        clock: Clock,
        metrics: Metrics,
        *,
        on_change: Callable[[AccelState], None] | None = None,
        poll_s: float = 0.005,
    ) -> None:
        self.driver = driver
        self.model = model
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.state = AccelState.UNKNOWN
        self._goal: AccelState | None = None
        self._from = AccelState.UNKNOWN
        self._task: asyncio.Task[None] | None = None
        self._on_change = on_change
        self._poll_s = poll_s
        self._wake_started: float | None = None
        self.last_wake_latency_s: float | None = None
        # Hooks for other parts (lifecycle, NM, vehicle power): a named filter may override a
        # requested target (a watchdog's safe state, NM bus sleep, a power-down); listeners hear
        # each measured transition (target, seconds from command to read-back) and each failure
        # (target, kind).
        self._filters: Hooks[tuple[str, Callable[[], AccelState | None]]] = Hooks()
        self.clamped_by: str | None = None  # the filter whose override stands (None: the request)
        self._transition_listeners: Hooks[Callable[[AccelState, float], None]] = Hooks()
        self._failure_listeners: Hooks[Callable[[AccelState, str], None]] = Hooks()
        self._wanted: AccelState | None = None  # the last target asked for, before the filters

    @property
    def goal(self) -> AccelState | None:
        """The target being driven (after the filters); None when no command is wanted."""
        return self._goal

    def add_target_filter(self, name: str, override: Callable[[], AccelState | None]) -> Undo:
        """`override` returns the state it holds the accelerator in, or None while it does not
        engage. Of the engaged filters the last added stands, and `clamped_by` names it (the
        evaluator's `path:*` reasons; the assembly adds them in the evaluator's precedence)."""
        return self._filters.add((name, override))

    def on_transition(self, listener: Callable[[AccelState, float], None]) -> Undo:
        return self._transition_listeners.add(listener)

    def on_failure(self, listener: Callable[[AccelState, str], None]) -> Undo:
        return self._failure_listeners.add(listener)

    def reconfigure(self, config: AcceleratorConfig) -> None:
        """Command timeout, retries and backoff from a reloaded config (the next command on)."""
        self.config = config

    def reapply(self, fallback: AccelState) -> None:
        """Run the wanted target through the filters again (a filter's condition changed, e.g.
        NM bus sleep began or ended) and command the result even if it equals the goal.
        `fallback` stands in while nothing commandable was ever asked or read back."""
        wanted = self._wanted if self._wanted is not None else self.state
        if wanted not in COMMANDABLE_STATES:
            wanted = self._goal if self._goal in COMMANDABLE_STATES else fallback
        self._goal = None
        self.request(wanted)

    async def async_start(self) -> None:
        await asyncio.wait_for(self.driver.async_open(), self.config.command_timeout_ms / 1000)
        self._observe(await self.driver.async_read_state())

    async def async_stop(self, safe_state: AccelState | None) -> bool:
        """Command `safe_state` (filters bypassed: nothing may keep it from the accelerator) and
        close the driver. Returns whether the safe state was commanded without error."""
        reached = safe_state is None
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                self._task = None
            if safe_state is not None:
                try:
                    async with asyncio.timeout(self.config.command_timeout_ms / 1000):
                        await self.driver.async_set_state(safe_state)
                    reached = True
                    self._observe(await asyncio.wait_for(self.driver.async_read_state(),
                                                         self.config.command_timeout_ms / 1000))
                except Exception as exc:  # best effort on the way out, but say so
                    log.error("could not leave the accelerator in %s: %s", safe_state.value, exc)
        finally:
            await self.driver.async_close()
        return reached

    def request(self, target: AccelState) -> None:
        self._wanted = target
        clamped_by = None
        for name, override in self._filters:
            forced = override()
            if forced is not None:
                target, clamped_by = forced, name
        self.clamped_by = clamped_by
        if target is self._goal:
            return
        self._from = self.state if self.state not in (AccelState.WAKING, AccelState.SUSPENDING) else self._from
        self._goal = target
        if target is AccelState.ACTIVE and self._wake_started is None:
            self._wake_started = self.clock.now()
        if target is not AccelState.ACTIVE:
            self._wake_started = None
        previous = self._task
        if previous is not None:
            previous.cancel()
        eager: _Eager | None = None
        if (target is AccelState.ACTIVE and (previous is None or previous.done())
                and isinstance(self.driver, EagerAccelerator)):
            # A wake is the latency-critical command: issue it now, from the decision itself,
            # instead of after the rest of this loop iteration (drain, listeners) and a task
            # hop. Only when no command is under way, so no superseded call can race it.
            eager = _Eager(asyncio.get_running_loop().time())
            try:
                self.driver.request_now(target)
            except Exception as exc:  # the drive task counts and retries it like any failure
                eager.error = exc
        self._task = asyncio.create_task(self._drive(target, eager), name=f"actuate-{target.value}")

    async def async_recover(self, action: Callable[[], Awaitable[None]], timeout_s: float) -> None:
        """Run a recovery action (rebind, rescan, rail cycle) with the drive loop stopped, so
        no command races it; then drive toward the goal again. Errors are the caller's."""
        goal = self._goal
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with asyncio.timeout(timeout_s):
                await action()
        finally:
            self._goal = None
            if goal is not None:
                self.request(goal)

    def expected_wake_s(self) -> float:
        """The power model's time to `active` from where the accelerator stands (plant s)."""
        if self._from not in (*self.model.exit, AccelState.ACTIVE):
            # Waking from `unknown` (a failed wake read back as unknown): assume the slowest exit.
            # exit_latency_s(unknown) raised KeyError here, outside the retry loop: the task died
            # with the goal still set and the accelerator was never commanded again.
            return max(t.latency_s for t in self.model.exit.values())
        return self.model.exit_latency_s(self._from)

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def estimated_power_w(self) -> float:
        """Model estimate of the accelerator's draw from the read-back state."""
        s = self.state
        if s is AccelState.WAKING and self._from in RESTING_STATES:
            return self.model.exit[self._from].mean_power_w
        if s is AccelState.SUSPENDING and self._goal in RESTING_STATES:
            return self.model.enter[self._goal].mean_power_w
        if s in self.model.power_w:
            return self.model.power_w[s]
        return self.model.power_w[AccelState.IDLE]  # unknown: assume awake-ish, not asleep

    def _observe(self, state: AccelState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is AccelState.ACTIVE and self._wake_started is not None:
            self.last_wake_latency_s = self.clock.now() - self._wake_started
            self.metrics.wake_latency.observe(self.last_wake_latency_s)
            self._wake_started = None
        self.metrics.set_state(state)
        if self._on_change is not None:
            self._on_change(state)

    async def _drive(self, target: AccelState, eager: _Eager | None = None) -> None:
        cfg = self.config
        timeout_s = cfg.command_timeout_ms / 1000
        backoff_s = cfg.retry_backoff_ms / 1000
        expected = self.expected_wake_s() if target is AccelState.ACTIVE else (
            self.model.enter[target].latency_s if target in RESTING_STATES else 0.0)
        loop = asyncio.get_running_loop()
        for attempt in range(cfg.retries + 1):
            started = loop.time()
            try:
                if eager is not None:  # first attempt already issued by request()
                    started, error, eager = eager.started, eager.error, None
                    if error is not None:
                        raise error
                else:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for adds a task hop to every wake.
                    async with asyncio.timeout(timeout_s):
                        await self.driver.async_set_state(target)
                if await self._await_readback(target, self.clock.wall_seconds(expected) * 2 + timeout_s):
                    for heard in self._transition_listeners:
                        heard(target, loop.time() - started)
                    return
                kind = "readback"
                log.warning("accelerator did not reach %s (reads %s)", target.value, self.state.value)
            except TimeoutError:
                kind = "timeout"
                log.warning("accelerator command %s timed out after %.1f s", target.value, timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # driver errors of any kind are counted and retried
                kind = "error"
                log.warning("accelerator command %s failed: %s", target.value, exc)
            self.metrics.actuation_failures.labels(kind).inc()
            for heard_failure in self._failure_listeners:
                heard_failure(target, kind)
            try:
                self._observe(await asyncio.wait_for(self.driver.async_read_state(), timeout_s))
            except Exception:  # read-back itself failed: the state is not known
                self._observe(AccelState.UNKNOWN)
            if attempt < cfg.retries:
                await asyncio.sleep(backoff_s * (2**attempt))
        log.error("accelerator: giving up on %s after %d attempts", target.value, cfg.retries + 1)
        self.metrics.actuation_failures.labels("gave_up").inc()
        for heard_failure in self._failure_listeners:
            heard_failure(target, "gave_up")
        self._goal = None  # let the next decision command again

    async def _await_readback(self, target: AccelState, within_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            state = await self.driver.async_read_state()
            self._observe(state)
            if state is target:
                return True
            if state is AccelState.UNKNOWN or loop.time() >= deadline:
                return False
            await asyncio.sleep(self._poll_s)


class _Eager:
    """A first command issued synchronously by `Actuator.request` (EagerAccelerator)."""

    __slots__ = ("error", "started")

    def __init__(self, started: float) -> None:
        self.started = started  # loop.time() when it was issued: transition timing starts here
        self.error: Exception | None = None
