"""The daemon: the imperative shell around the pure policy. Ingest fills samples, a
fixed-period ticker steps the policy, the actuator drives the accelerator, energy is
integrated per domain, and everything is exported."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..accel import AcceleratorModel, AccelState
from ..config import Config, load_config, policy_params
from ..drivers import registry
from ..drivers.base import AcceleratorDriver
from ..policies.cerebellum import CerebellumFirst, PolicyState
from ..policies.types import DemandClass, Hold, Inputs, Sample
from ..profiles import load_profile
from .actuator import Actuator
from .clock import Clock
from .control import CommandProcessor, HoldStore
from .ingest import CanIngest, FrameTap, load_dbc
from .lease_service import attach_leases
from .lifecycle import attach_lifecycle
from .metrics import Metrics
from .mqtt import attach_mqtt
from .nm_service import attach_nm
from .overhead import attach_overhead
from .power import attach_rail_power
from .sources import attach_sources
from .ticker import Ticker, TickInfo

log = logging.getLogger(__name__)
_MIN_WALL_TICK_S = 0.001


class Service(Protocol):
    """Something the daemon starts after its buses and stops before them (MQTT, leases,
    SOME/IP, the MCU link, persistence, ...)."""

    async def async_start(self) -> None: ...

    async def async_stop(self) -> None: ...


#: A source of holds or leases: called with policy time at every decision.
HoldSource = Callable[[float], Sequence[Hold]]
#: A measured power reading for a domain: latest watts, or None while unknown.
PowerSource = Callable[[], float | None]


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the daemon's state for the live view, MQTT and `status`."""

    time: float
    state: AccelState
    target: AccelState
    reason: str
    active_demands: tuple[str, ...]
    stale_signals: tuple[str, ...]
    watts: Mapping[str, float]
    joules: Mapping[str, float]
    signals: Mapping[str, float]
    holds: tuple[Hold, ...]
    wakes: int
    sleeps: int
    frames: int
    can_errors: int
    last_wake_latency_s: float | None = None
    measured: frozenset[str] = field(default_factory=frozenset)


def build_driver(config: Config, model: AcceleratorModel, clock: Clock) -> AcceleratorDriver:
    factory = registry.load("accelerator", config.accelerator.driver)
    from_options = getattr(factory, "from_options", None)
    kwargs: dict[str, Any] = {"model": model, "time_scale": clock.scale,
                              "initial": AccelState(config.daemon.initial_state)}
    driver = from_options(config.accelerator.options, **kwargs) if from_options else factory(config.accelerator.options)
    if not isinstance(driver, AcceleratorDriver):
        raise TypeError(f"driver {config.accelerator.driver!r} does not implement AcceleratorDriver")
    return driver


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        driver: AcceleratorDriver | None = None,
        config_path: str | None = None,
        model: AcceleratorModel | None = None,
    ) -> None:
        """Inside a running loop, build it with `async_create` (the profile is a file read)."""
        self.clock = clock or Clock()
        self.config_path = config_path
        self.model = model or load_profile(config.accelerator.profile)
        self._configure(config)
        measured = {d.name for d in config.power.domains if d.source in ("hwmon", "mcu")}
        self.metrics = Metrics(
            domains=[d.name for d in config.power.domains],
            measured_domains=measured,
            demands=[d.name for d in config.demands],
            signals=list(config.signals),
            buses=[b.name for b in config.can],
            loops=("decision", "telemetry"),
            mqtt=config.mqtt.enabled,
        )
        self.driver = driver or build_driver(config, self.model, self.clock)
        self.actuator = Actuator(self.driver, self.model, config.accelerator, self.clock, self.metrics)
        self.holds = HoldStore()
        self.commands = CommandProcessor(
            self.holds, operators=frozenset(config.mqtt.operators),
            rate_per_minute=config.mqtt.command_rate_per_minute)
        self.samples: dict[str, Sample] = {}
        self.ingests: list[CanIngest] = []
        self.joules: dict[str, float] = {d.name: 0.0 for d in config.power.domains}
        self.watts: dict[str, float] = {d.name: 0.0 for d in config.power.domains}
        self.wakes = 0
        self.sleeps = 0
        self.decisions = 0
        self.port: int | None = None
        self._state: PolicyState | None = None
        self._last_integration: float | None = None
        self._tickers: list[Ticker] = []
        self._decision_listeners: list[Callable[[Snapshot], None]] = []
        self._last_reason = "start"
        self._last_target = AccelState(config.daemon.initial_state)
        self._demand_flags: dict[str, bool] = {}
        self._stale_flags: dict[str, bool] = {}
        self._notifier: Any = None
        self._watchdog_every = 0
        # Extension points, filled by `attach_services` (one module per concern).
        self.services: list[Service] = []
        self.hold_sources: list[HoldSource] = [self.holds.active]
        self.power_sources: dict[str, PowerSource] = {}
        self.tick_hooks: list[Callable[[float], None]] = []
        self.telemetry_hooks: list[Callable[[float], None]] = []
        self.stop_hooks: list[Callable[[float], None]] = []
        self.self_integrated: set[str] = set()  # domains whose service integrates their energy
        self.frame_taps: dict[str, FrameTap] = {}  # per bus name: sees every frame (NM PDUs)
        self.wake_hooks: list[Callable[[float], None]] = []  # told of any input while paused
        # Set by NM while the bus sleeps or is going to: stale signals are quiet, not failed.
        self.quiet_bus = False
        self.paused = False
        self._attach_services()

    def _attach_services(self) -> None:
        """Each optional concern attaches itself here from its own module (one line each),
        registering services and hooks; nothing here runs before `async_start`."""
        from .persist import attach_persistence  # state file + start-up file checks
        attach_persistence(self)
        attach_mqtt(self)  # [mqtt] status/state/set/response (only when enabled)
        attach_sources(self)  # [[someip]], [mcu] and measured power domains (only when configured)
        attach_rail_power(self)  # [power.rails] rail map: per-domain watts, trapezoid energy
        attach_lifecycle(self)  # wake watchdog ladder, per-backend transition metrics, flaps
        attach_leases(self)  # [leases] Unix socket; leases become holds (only when enabled)
        attach_overhead(self)  # the daemon's own CPU seconds, RSS and scrape duration
        attach_nm(self)  # [nm] CAN network management: bus sleep pauses the daemon (only when enabled)

    @classmethod
    async def async_create(cls, config: Config, **kwargs: Any) -> Daemon:
        if kwargs.get("model") is None:
            kwargs["model"] = await asyncio.to_thread(load_profile, config.accelerator.profile)
        return cls(config, **kwargs)

    def _configure(self, config: Config) -> None:
        self.config = config
        self.params = policy_params(config)
        self.policy = CerebellumFirst(self.params, self.model)
        self._critical_inputs = frozenset(
            n for d in self.params.demands if d.demand_class is DemandClass.CRITICAL for n in d.expression.names)

    # -- lifecycle -------------------------------------------------------------------------

    async def async_start(self) -> None:
        cfg = self.config
        now = self.clock.now()
        self._state = self.policy.initial_state(now, AccelState(cfg.daemon.initial_state))
        self._last_integration = now
        await self.actuator.async_start()
        if cfg.prometheus.enabled:
            self.port = await self.metrics.async_serve(cfg.prometheus.address, cfg.prometheus.port)
            log.info("metrics on http://%s:%d/metrics", cfg.prometheus.address, self.port)
        for bus in cfg.can:
            db = await asyncio.to_thread(load_dbc, bus.dbc, bus.dbc_strict)
            wanted = {
                tuple(s.can.split(".", 1)): name
                for name, s in cfg.signals.items()
                if s.can and (s.bus or cfg.can[0].name) == bus.name
            }
            ingest = CanIngest(bus, db, wanted, self._on_samples, self.metrics,  # type: ignore[arg-type]
                               now=self.clock.now, from_monotonic=self.clock.from_monotonic,
                               tap=self.frame_taps.get(bus.name))
            await ingest.async_start()
            self.ingests.append(ingest)
        for service in self.services:
            await service.async_start()
        wall_tick = self._start_tickers()
        self._notify_ready(wall_tick)

    def _start_tickers(self) -> float:
        cfg = self.config
        wall_tick = max(self.clock.wall_seconds(cfg.daemon.tick_ms / 1000), _MIN_WALL_TICK_S)
        wall_telemetry = max(self.clock.wall_seconds(cfg.daemon.telemetry_interval_ms / 1000), 0.05)
        self._tickers = [
            Ticker(wall_tick, self._on_tick, name="decision"),
            Ticker(wall_telemetry, self._on_telemetry, name="telemetry"),
        ]
        for ticker in self._tickers:
            ticker.start()
        return wall_tick

    def pause(self) -> None:
        """Go quiet (NM bus sleep): stop the decision and telemetry tickers. Frames are still
        received and stored; instead of the fast path they go to `wake_hooks`, which decide
        whether to `resume`. Energy is integrated up to now and again at resume (the domains
        keep drawing while we sleep)."""
        if self.paused or not self._tickers:
            return
        self.paused = True
        for ticker in self._tickers:
            ticker.stop()
        self._tickers = []
        self._integrate(self.clock.now())
        self._ping_watchdog_while_paused()
        log.info("daemon paused (tickers stopped)")

    def _ping_watchdog_while_paused(self) -> None:
        # The decision tick pings systemd's watchdog; paused, a slow timer must, or systemd
        # would kill a daemon that merely sleeps with the bus.
        if not self.paused or self._notifier is None or not self._watchdog_every:
            return
        self._notifier.notify("WATCHDOG=1")
        period = self._watchdog_every * max(self.clock.wall_seconds(self.config.daemon.tick_ms / 1000),
                                            _MIN_WALL_TICK_S)
        asyncio.get_running_loop().call_later(period, self._ping_watchdog_while_paused)

    def resume(self, *, reset: bool = True) -> None:
        """Restart the tickers. With `reset`, drop all samples (they predate the sleep) and
        start the policy afresh from its current target, as after a start."""
        if not self.paused:
            return
        self.paused = False
        now = self.clock.now()
        self._integrate(now)
        if reset and self._state is not None:
            self.samples.clear()
            self._state = self.policy.initial_state(now, self._state.target)
        self._start_tickers()
        log.info("daemon resumed")

    async def async_pause(self) -> None:
        self.pause()

    async def async_resume(self, *, reset: bool = True) -> None:
        self.resume(reset=reset)

    async def async_stop(self) -> None:
        for ticker in self._tickers:
            ticker.stop()
        self._tickers = []
        for service in reversed(self.services):
            try:
                await service.async_stop()
            except Exception as exc:  # one failing service must not keep the others running
                log.error("stopping %s failed: %s", type(service).__name__, exc)
        for ingest in self.ingests:
            await ingest.async_stop()
        self.ingests = []
        now = self.clock.now()
        self._integrate(now)
        for hook in self.stop_hooks:
            hook(now)
        await self.actuator.async_stop(AccelState(self.config.daemon.safe_state))
        await self.metrics.async_stop()
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1")

    async def async_run(self, stop: asyncio.Event) -> None:
        await self.async_start()
        try:
            await stop.wait()
        finally:
            await self.async_stop()

    async def async_reload(self, path: str | None = None) -> bool:
        """Validate first, then swap atomically; on error keep the old config."""
        path = path or self.config_path
        if path is None:
            return False
        try:
            new = await asyncio.to_thread(load_config, path)
            if [b.model_dump() for b in new.can] != [b.model_dump() for b in self.config.can]:
                log.warning("reload: [[can]] changes need a restart; bus settings kept")
            if new.accelerator.profile != self.config.accelerator.profile:
                log.warning("reload: a new accelerator profile needs a restart; profile kept")
            self._configure(new)
            assert self._state is not None
            now = self.clock.now()
            self._state = self.policy.initial_state(now, self._state.target)
            self.metrics.config_reloads.labels("ok").inc()
            log.info("configuration reloaded from %s", path)
            return True
        except Exception as exc:  # any failure keeps the running config
            self.metrics.config_reloads.labels("error").inc()
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False

    def add_decision_listener(self, listener: Callable[[Snapshot], None]) -> None:
        self._decision_listeners.append(listener)

    # -- systemd ---------------------------------------------------------------------------

    def _notify_ready(self, wall_tick: float) -> None:
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        import sdnotify

        self._notifier = sdnotify.SystemdNotifier()
        self._notifier.notify("READY=1")
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec > 0:
            self._watchdog_every = max(1, int(usec / 1e6 / 2 / wall_tick))

    # -- inputs ----------------------------------------------------------------------------

    def _on_samples(self, samples: Sequence[tuple[str, float]], t: float) -> None:
        critical_changed = False
        store = self.samples
        for name, value in samples:
            old = store.get(name)
            store[name] = Sample(value, t)
            if name in self._critical_inputs and (old is None or old.value != value):
                critical_changed = True
        if self.paused:
            for hook in self.wake_hooks:  # no fast path while asleep: NM validates wake-ups
                hook(t)
            return
        if critical_changed and self._state is not None and self._state.target is not AccelState.ACTIVE:
            # Fast path: a critical input moved; decide now instead of at the next tick.
            self._decide(self.clock.now(), fast_path=True)

    # -- loops -----------------------------------------------------------------------------

    def _on_tick(self, info: TickInfo) -> None:
        m = self.metrics
        m.tick_lateness.labels("decision").observe(info.lateness_s)
        if info.expirations > 1:
            m.tick_overruns.labels("decision").inc(info.expirations - 1)
        # Frames that arrived while the loop was busy are decoded before deciding: after a stall
        # of our own, signals must not look stale merely because their frames wait in the queue.
        for ingest in self.ingests:
            ingest.drain()
        now = self.clock.now()
        self._decide(now, fast_path=False)
        self._integrate(now)
        for hook in self.tick_hooks:
            hook(now)
        if self._watchdog_every and info.index % self._watchdog_every == 0 and self._notifier is not None:
            self._notifier.notify("WATCHDOG=1")

    def _on_telemetry(self, info: TickInfo) -> None:
        m = self.metrics
        m.tick_lateness.labels("telemetry").observe(info.lateness_s)
        if info.expirations > 1:
            m.tick_overruns.labels("telemetry").inc(info.expirations - 1)
        now = self.clock.now()
        m.holds_active.set(len(self.active_holds(now)))
        for hook in self.telemetry_hooks:
            hook(now)
        for d in self.config.power.domains:
            m.domain_power.labels(d.name, "sensor" if d.source in ("hwmon", "mcu") else "model").set(
                self.watts.get(d.name, 0.0))

    def _decide(self, now: float, *, fast_path: bool) -> None:
        assert self._state is not None
        inputs = Inputs(self.samples, self.active_holds(now), self.actuator.state, fast_path, self.quiet_bus)
        started = time.perf_counter()
        self._state, d = self.policy.step(self._state, inputs, now)
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        self.decisions += 1
        m = self.metrics
        for _demand, result in d.validations:
            m.wake_validations.labels(result).inc()
        if d.denied:
            m.denied_wakes.labels(d.denied).inc()
        active = set(d.active_demands)
        for demand in self.params.demands:
            flag = demand.name in active
            if self._demand_flags.get(demand.name) != flag:
                self._demand_flags[demand.name] = flag
                m.demand_active.labels(demand.name).set(1 if flag else 0)
        stale = set(d.stale_signals)
        for name in self.config.signals:
            flag = name in stale
            if self._stale_flags.get(name) != flag:
                self._stale_flags[name] = flag
                m.signal_stale.labels(name).set(1 if flag else 0)
        if d.changed:
            if d.wake:
                self.wakes += 1
                m.wakes.labels(d.reason).inc()
            elif d.target is not AccelState.ACTIVE and self._last_target is AccelState.ACTIVE:
                self.sleeps += 1
                m.sleeps.labels(d.target.value, d.reason).inc()
            log.debug("decision: %s -> %s (%s)", self._last_target.value, d.target.value, d.reason)
            self._last_target = d.target
        self._last_reason = d.reason
        self.actuator.request(d.target)
        if d.changed and self._decision_listeners:
            snap = self.snapshot()
            for listener in self._decision_listeners:
                listener(snap)

    def _integrate(self, now: float) -> None:
        last = self._last_integration
        self._last_integration = now
        if last is None or now <= last:
            return
        dt = now - last
        for d in self.config.power.domains:
            if d.source == "model":
                watts = self.actuator.estimated_power_w()
            elif d.source == "constant":
                watts = d.watts or 0.0
            else:
                source = self.power_sources.get(d.name)
                reading = source() if source is not None else None
                watts = reading if reading is not None else self.watts.get(d.name, 0.0)
            self.watts[d.name] = watts
            if d.name in self.self_integrated:
                continue  # its service integrates between readings (trapezoid): count once
            joules = watts * dt
            self.joules[d.name] += joules
            self.metrics.domain_energy.labels(d.name).inc(joules)

    def active_holds(self, now: float) -> tuple[Hold, ...]:
        if len(self.hold_sources) == 1:
            return self.holds.active(now)
        return tuple(h for source in self.hold_sources for h in source(now))

    def snapshot(self) -> Snapshot:
        now = self.clock.now()
        state = self._state
        return Snapshot(
            time=now,
            state=self.actuator.state,
            target=state.target if state else AccelState.UNKNOWN,
            reason=self._last_reason,
            active_demands=tuple(n for n, f in self._demand_flags.items() if f),
            stale_signals=tuple(n for n, f in self._stale_flags.items() if f),
            watts=dict(self.watts),
            joules=dict(self.joules),
            signals={k: v.value for k, v in self.samples.items()},
            holds=self.active_holds(now),
            wakes=self.wakes,
            sleeps=self.sleeps,
            frames=sum(i.frames for i in self.ingests),
            can_errors=sum(sum(i.errors.values()) for i in self.ingests),
            last_wake_latency_s=self.actuator.last_wake_latency_s,
            measured=frozenset(d.name for d in self.config.power.domains if d.source in ("hwmon", "mcu")),
        )
