"""The daemon's core: the imperative shell around the pure policy. Ingest and the other sources
publish samples, a fixed-period ticker steps the policy, the actuator drives the accelerator, the
energy ledger integrates every domain, and everything is exported.

The core implements the narrow host interface (`daemon/host.py`) its parts are given; the parts
themselves are built, started, stopped and swapped on reload by the composition root,
`daemon/assembly.py` (`daemon/runtime.py` puts the two together as `Daemon`). Nothing here
knows which parts exist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..accel import AcceleratorModel, AccelState
from ..config import Config, policy_params, rail_fed_domains
from ..drivers import registry
from ..drivers.base import AcceleratorDriver
from ..policies.calibration import Calibration
from ..policies.cerebellum import CerebellumFirst, PolicyState
from ..policies.entry_risk import EntryRisk, EntryRiskParams
from ..policies.learned import Learned
from ..policies.types import DemandClass, Hold, Inputs, PolicyParams, Sample
from ..profiles import load_profile
from .actuator import Actuator
from .clock import Clock
from .control import CommandProcessor, HoldStore
from .host import CoreTotals, HoldSource, Hooks, PowerSource, Snapshot, Undo
from .ingest import CanIngest
from .ledger import EnergyLedger
from .metrics import Metrics
from .ticker import Ticker, TickInfo

log = logging.getLogger(__name__)
_MIN_WALL_TICK_S = 0.001


@dataclass(frozen=True)
class PolicyCore:
    """Everything derived from `[signals]`, `[[demands]]`, `[policy]` and `[guards]`: built (and
    validated) before a reload swaps it in, so a swap cannot fail halfway."""

    params: PolicyParams
    policy: CerebellumFirst
    critical_inputs: frozenset[str]

    @classmethod
    def build(cls, config: Config, model: AcceleratorModel) -> PolicyCore:
        params = policy_params(config)
        critical = frozenset(n for d in params.demands if d.demand_class is DemandClass.CRITICAL
                             for n in d.expression.names)
        return cls(params, CerebellumFirst(params, model), critical)


def build_driver(config: Config, model: AcceleratorModel, clock: Clock) -> AcceleratorDriver:
    factory = registry.load("accelerator", config.accelerator.driver)
    from_options = getattr(factory, "from_options", None)
    kwargs: dict[str, Any] = {"model": model, "time_scale": clock.scale,
                              "initial": AccelState(config.daemon.initial_state)}
    driver = from_options(config.accelerator.options, **kwargs) if from_options else factory(config.accelerator.options)
    if not isinstance(driver, AcceleratorDriver):
        raise TypeError(f"driver {config.accelerator.driver!r} does not implement AcceleratorDriver")
    return driver


class DaemonCore:
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
        self.config = config
        self.model = model or load_profile(config.accelerator.profile)
        self.core = PolicyCore.build(config, self.model)
        self.metrics = Metrics(
            domains=[d.name for d in config.power.domains],
            measured_domains={d.name for d in config.power.domains if d.source in ("hwmon", "mcu")},
            demands=[d.name for d in config.demands],
            signals=list(config.signals),
            buses=[b.name for b in config.can],
            loops=("decision", "telemetry"),
            mqtt=config.mqtt.enabled,
        )
        self.driver = driver or build_driver(config, self.model, self.clock)
        self.actuator = Actuator(self.driver, self.model, config.accelerator, self.clock, self.metrics)
        self.ledger = EnergyLedger(config.power.domains, self.metrics, self.actuator.estimated_power_w,
                                   rail_fed_domains(config), config.power.accelerator_domain)
        self.holds = HoldStore()
        self.commands = CommandProcessor(
            self.holds, operators=frozenset(config.mqtt.operators),
            rate_per_minute=config.mqtt.command_rate_per_minute, report=self.report)
        self._reports: dict[str, list[float]] = {"late": [], "served": []}
        self.samples: dict[str, Sample] = {}
        self.wakes = 0
        self.sleeps = 0
        self.decisions = 0
        self.port: int | None = None
        self.quiet_bus = False  # set by NM while the bus sleeps: stale signals are quiet, not failed
        self.parked = False  # set by the vehicle power part: the car is off
        self.paused = False
        self._state: PolicyState | None = None
        self._tickers: list[Ticker] = []
        self._last_reason = "start"
        self._last_target = AccelState(config.daemon.initial_state)
        self._demand_flags: dict[str, bool] = {}
        self._stale_flags: dict[str, bool] = {}
        self._notifier: Any = None
        self._watchdog_every = 0
        self._ingests: Hooks[CanIngest] = Hooks()
        self._tick_hooks: Hooks[Callable[[float], None]] = Hooks()
        self._telemetry_hooks: Hooks[Callable[[float], None]] = Hooks()
        self._decision_listeners: Hooks[Callable[[Snapshot], None]] = Hooks()
        self._paused_input_hooks: Hooks[Callable[[float], None]] = Hooks()
        self._hold_sources: Hooks[HoldSource] = Hooks()

    # -- read-only views ---------------------------------------------------------------------

    @property
    def params(self) -> PolicyParams:
        return self.core.params

    @property
    def policy(self) -> CerebellumFirst:
        return self.core.policy

    @property
    def joules(self) -> dict[str, float]:
        return self.ledger.joules

    @property
    def watts(self) -> dict[str, float]:
        return self.ledger.watts

    @property
    def ingests(self) -> tuple[CanIngest, ...]:
        return tuple(self._ingests)

    @property
    def tick_period_s(self) -> float | None:
        """The running decision ticker's period in wall seconds (None while stopped or paused)."""
        return self._tickers[0].period_s if self._tickers else None

    @property
    def deepest_state(self) -> AccelState:
        return self.core.params.deepest_state

    @property
    def latency_budget_s(self) -> float:
        return self.core.params.latency_budget_s

    # -- lifecycle steps (the assembly runs them in its order) ----------------------------------

    def begin(self) -> None:
        """Called by the assembly once the actuator runs: the policy starts from here."""
        now = self.clock.now()
        self._state = self.policy.initial_state(now, AccelState(self.config.daemon.initial_state))
        self.ledger.integrate(now)

    def start_tickers(self) -> Undo:
        cfg = self.config
        wall_tick = max(self.clock.wall_seconds(cfg.daemon.tick_ms / 1000), _MIN_WALL_TICK_S)
        wall_telemetry = max(self.clock.wall_seconds(cfg.daemon.telemetry_interval_ms / 1000), 0.05)
        self._tickers = [
            Ticker(wall_tick, self._on_tick, name="decision"),
            Ticker(wall_telemetry, self._on_telemetry, name="telemetry"),
        ]
        for ticker in self._tickers:
            ticker.start()
        self._notify_ready(wall_tick)
        return self.stop_tickers

    def stop_tickers(self) -> None:
        for ticker in self._tickers:
            ticker.stop()
        self._tickers = []

    def finish(self) -> None:
        """Last accounting before the safe state: energy up to now."""
        self.ledger.integrate(self.clock.now())
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1")

    # -- reload: applied by the assembly between ticks ----------------------------------------

    def apply_config(self, config: Config, core: PolicyCore) -> None:
        """Swap in a validated config and its prebuilt policy core. Synchronous: no tick runs
        in between. Joule totals are kept; new domains start at zero."""
        old = self.config
        old_features = self.policy.params.learned.features
        now = self.clock.now()
        self.ledger.integrate(now)  # the old domains' energy up to the swap
        self.config = config
        self.core = core
        self.metrics.prepare(demands=[d.name for d in config.demands], signals=list(config.signals))
        self._demand_flags = {k: v for k, v in self._demand_flags.items() if any(d.name == k for d in config.demands)}
        self._stale_flags = {k: v for k, v in self._stale_flags.items() if k in config.signals}
        self.ledger.reconfigure(config.power.domains, rail_fed_domains(config), config.power.accelerator_domain)
        self.actuator.reconfigure(config.accelerator)
        self.commands.reconfigure(operators=frozenset(config.mqtt.operators),
                                  rate_per_minute=config.mqtt.command_rate_per_minute)
        if self._state is not None:
            # Learned anticipation's table survives a reload that keeps its features (same contexts).
            learned = (self._state.learned.without_segment()
                       if self.policy.params.learned.features == old_features else None)
            self._state = self.policy.initial_state(now, self._state.target, self._state.calibration, learned)
        if self._tickers and (old.daemon.tick_ms, old.daemon.telemetry_interval_ms) != (
                config.daemon.tick_ms, config.daemon.telemetry_interval_ms):
            self.stop_tickers()
            self.start_tickers()

    # -- host interface: events ---------------------------------------------------------------

    def on_tick(self, hook: Callable[[float], None]) -> Undo:
        return self._tick_hooks.add(hook)

    def on_telemetry(self, hook: Callable[[float], None]) -> Undo:
        return self._telemetry_hooks.add(hook)

    def on_decision(self, listener: Callable[[Snapshot], None]) -> Undo:
        return self._decision_listeners.add(listener)

    def on_input_while_paused(self, hook: Callable[[float], None]) -> Undo:
        return self._paused_input_hooks.add(hook)

    def add_ingest(self, ingest: CanIngest) -> Undo:
        """A bus whose queue is drained before each decision."""
        return self._ingests.add(ingest)

    # -- host interface: inputs ---------------------------------------------------------------

    def publish_samples(self, samples: Sequence[tuple[str, float]], t: float) -> None:
        critical_changed = False
        store = self.samples
        critical = self.core.critical_inputs
        for name, value in samples:
            old = store.get(name)
            store[name] = Sample(value, t)
            if name in critical and (old is None or old.value != value):
                critical_changed = True
        if self.paused:
            for hook in self._paused_input_hooks:  # no fast path while asleep: NM validates wake-ups
                hook(t)
            return
        if critical_changed and self._state is not None and self._state.target is not AccelState.ACTIVE:
            # Fast path: a critical input moved; decide now instead of at the next tick.
            self._decide(self.clock.now(), fast_path=True)

    def signal_value(self, name: str | None, now: float) -> float | None:
        """A signal's value if it is fresh, else None (unknown: never seen, stale or unconfigured)."""
        if name is None:
            return None
        sample = self.samples.get(name)
        spec = self.config.signals.get(name)
        if sample is None or spec is None or now - sample.time > spec.max_age_ms / 1000:
            return None
        return sample.value

    def latest_sample(self, name: str | None) -> Sample | None:
        """A signal's latest sample, fresh or not (the caller applies its own timeout)."""
        return None if name is None else self.samples.get(name)

    def set_parked(self, parked: bool) -> None:
        """The vehicle is off: a policy input from the next decision on (policies/types.py Inputs)."""
        self.parked = parked

    # -- host interface: holds -----------------------------------------------------------------

    def add_hold_source(self, source: HoldSource) -> Undo:
        return self._hold_sources.add(source)

    def operator_holds(self, now: float) -> tuple[Hold, ...]:
        return self.holds.active(now)

    def active_holds(self, now: float) -> tuple[Hold, ...]:
        operator = self.holds.active(now)
        if not self._hold_sources:
            return operator
        return operator + tuple(h for source in self._hold_sources for h in source(now))

    # -- host interface: energy ----------------------------------------------------------------

    def add_power_source(self, domain: str, source: PowerSource) -> Undo:
        return self.ledger.add_power_source(domain, source)

    def add_energy(self, domain: str, joules: float) -> None:
        self.ledger.add_energy(domain, joules)

    def domain_watts(self) -> dict[str, float]:
        return dict(self.ledger.watts)

    def totals(self) -> CoreTotals:
        self.ledger.integrate(self.clock.now())
        return CoreTotals(dict(self.ledger.joules), self.wakes, self.sleeps)

    def restore_totals(self, totals: CoreTotals) -> None:
        for domain in self.ledger.restore(totals.joules):
            log.warning("state file: domain %r is no longer configured; its %.1f J are dropped",
                        domain, totals.joules[domain])
        self.wakes += totals.wakes
        self.sleeps += totals.sleeps

    # -- host interface: the policy's calibration ------------------------------------------------

    def calibration(self) -> Calibration | None:
        """What the policy learned about late wakes (None before the policy began)."""
        return self._state.calibration if self._state is not None else None

    def restore_calibration(self, calibration: Calibration) -> None:
        """A calibration persisted by an earlier run, applied to the running policy state."""
        if self._state is not None:
            self._state = dataclasses.replace(self._state, calibration=calibration)

    def entry_risk(self) -> EntryRisk | None:
        """The challenges entry risk has counted (None before the policy began)."""
        return self._state.entry_risk if self._state is not None else None

    def entry_risk_params(self) -> EntryRiskParams:
        return self.policy.params.entry_risk

    def restore_entry_risk(self, risk: EntryRisk) -> None:
        """Counts persisted by an earlier run, applied to the running policy state."""
        if self._state is not None:
            self._state = dataclasses.replace(self._state, entry_risk=risk)

    def learned_table(self) -> dict[str, Any] | None:
        """Learned anticipation's table, persistable (None when learning is off or not begun)."""
        if self._state is None or not self.policy.params.learned.enabled:
            return None
        return self._state.learned.to_dict(self.policy.params.learned)

    def restore_learned(self, data: Any) -> int:
        """A table persisted by an earlier run (ValueError if it does not read back); the number
        of contexts restored (0: learning is off, or the table was learned on other features)."""
        params = self.policy.params.learned
        if self._state is None or not params.enabled:
            return 0
        learned = Learned.from_dict(data, params)
        self._state = dataclasses.replace(self._state, learned=learned)
        return len(learned.table)

    def unannounced_budget_s(self) -> float:
        """The latency budget for unannounced challenges in force (learned or configured)."""
        if self._state is None:
            return self.params.latency_budget_s
        return self.policy.unannounced_budget_s(self._state)

    def _energy_reason(self) -> str:
        """What the accelerator's energy goes to from now: a path filter that holds the target
        (NM quiet bus, power-down, the watchdog's alarm) before the policy's reason, as the
        evaluator names them."""
        return self.actuator.clamped_by or self._last_reason

    # -- host interface: the bus (network management) -------------------------------------------

    def pause(self) -> None:
        """Go quiet (NM bus sleep): stop the decision and telemetry tickers. Frames are still
        received and stored; instead of the fast path they go to the paused-input hooks, which
        decide whether to `resume`. Energy is integrated up to now and again at resume (the
        domains keep drawing while we sleep)."""
        if self.paused or not self._tickers:
            return
        self.paused = True
        self.stop_tickers()
        self.ledger.integrate(self.clock.now(), "paused")  # the bus sleeps: no decision until resume
        self._ping_watchdog_while_paused()
        log.info("daemon paused (tickers stopped)")

    def resume(self, *, reset: bool = True) -> None:
        """Restart the tickers. With `reset`, drop all samples (they predate the sleep) and
        start the policy afresh from its current target, as after a start."""
        if not self.paused:
            return
        self.paused = False
        now = self.clock.now()
        self.ledger.integrate(now, self._energy_reason())
        if reset and self._state is not None:
            self.samples.clear()
            self._state = self.policy.initial_state(now, self._state.target, self._state.calibration,
                                                    self._state.learned.without_segment())
        self.start_tickers()
        log.info("daemon resumed")

    def set_quiet(self, quiet: bool) -> None:
        self.quiet_bus = quiet

    def demand_needs_bus(self, now: float) -> bool:
        """A demand is active on fresh signals. One woken only because its signals went stale
        does not count: the silence of a bus going to sleep must not hold that bus awake."""
        if self.paused or not self.params.demands:
            return False
        stale = {n for n, f in self._stale_flags.items() if f}
        active = {n for n, f in self._demand_flags.items() if f}
        return any(spec.name in active and not (set(spec.expression.names) & stale) for spec in self.params.demands)

    def _ping_watchdog_while_paused(self) -> None:
        # The decision tick pings systemd's watchdog; paused, a slow timer must, or systemd
        # would kill a daemon that merely sleeps with the bus.
        if not self.paused or self._notifier is None or not self._watchdog_every:
            return
        self._notifier.notify("WATCHDOG=1")
        period = self._watchdog_every * max(self.clock.wall_seconds(self.config.daemon.tick_ms / 1000),
                                            _MIN_WALL_TICK_S)
        asyncio.get_running_loop().call_later(period, self._ping_watchdog_while_paused)

    # -- systemd ---------------------------------------------------------------------------

    def _notify_ready(self, wall_tick: float) -> None:
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        if self._notifier is None:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
            self._notifier.notify("READY=1")
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec > 0:
            self._watchdog_every = max(1, int(usec / 1e6 / 2 / wall_tick))

    # -- loops -----------------------------------------------------------------------------

    def _on_tick(self, info: TickInfo) -> None:
        m = self.metrics
        m.tick_lateness.labels("decision").observe(info.lateness_s)
        if info.expirations > 1:
            m.tick_overruns.labels("decision").inc(info.expirations - 1)
        # Frames that arrived while the loop was busy are decoded before deciding: after a stall
        # of our own, signals must not look stale merely because their frames wait in the queue.
        for ingest in self._ingests:
            ingest.drain()
        now = self.clock.now()
        self._decide(now, fast_path=False)
        self.ledger.integrate(now, self._energy_reason())
        for hook in self._tick_hooks:
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
        for hook in self._telemetry_hooks:
            hook(now)
        self.ledger.export_power()

    def report(self, kind: str, seconds: float) -> None:
        """A consumer's report on the latest wake (MQTT `late` / `served`): ready `seconds` after
        its challenge's deadline, or on time with `seconds` allowed from the challenge's onset.
        The next decision hands it to the policy (`Inputs.late_reports` / `served_reports`)."""
        self._reports[kind].append(seconds)
        self.metrics.consumer_reports.labels(kind).inc()

    def _decide(self, now: float, *, fast_path: bool) -> None:
        assert self._state is not None
        late, served = tuple(self._reports["late"]), tuple(self._reports["served"])
        if late or served:
            self._reports = {"late": [], "served": []}
        inputs = Inputs(self.samples, self.active_holds(now), self.actuator.state, fast_path=fast_path,
                        quiet_bus=self.quiet_bus, parked=self.parked, late_reports=late, served_reports=served)
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
            watts=dict(self.ledger.watts),
            joules=dict(self.ledger.joules),
            signals={k: v.value for k, v in self.samples.items()},
            holds=self.active_holds(now),
            wakes=self.wakes,
            sleeps=self.sleeps,
            frames=sum(i.frames for i in self._ingests),
            can_errors=sum(sum(i.errors.values()) for i in self._ingests),
            last_wake_latency_s=self.actuator.last_wake_latency_s,
            measured=self.ledger.measured,
        )
