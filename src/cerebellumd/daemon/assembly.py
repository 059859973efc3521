"""The composition root: builds the daemon's parts from a `Config` in an order written here,
starts them, stops them in the exact reverse, and swaps them on reload.

Start order (stop is its reverse):

 1. the actuator (its stop, which commands `daemon.safe_state`, therefore runs last and always);
 2. the policy begins; the metrics endpoint;
 3. file checks, persistence (restores the totals), leases, NM (taps its bus before it opens);
 4. one CAN ingest per bus; SOME/IP endpoints; the MCU link; power readers; the rail map; the
    vehicle power state and battery budget (built before NM, which takes its fused ignition);
 5. the wake watchdog (lifecycle); the policy's calibration (exported, persisted); MQTT (told the
    parts that add to its state);
 6. the tickers.

Each part gets its config section, the peers it needs as arguments, and the daemon only through
the narrow Protocols of `daemon/host.py`; whatever it registers it undoes at stop. A stop step
that fails is logged and counted in the result, and never keeps the later steps (the safe state
above all) from running.

Reload is a transaction under one lock: validate the file, classify the changes
(`config/reload.py`), refuse the whole file if any key needs a restart, build the policy core
and the replacement parts, stop the parts being replaced, start their replacements, then swap the
config and the core synchronously (between two ticks). If anything fails on the way, the parts
started for the new config are stopped and the old ones rebuilt from the old config: never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..accel import AccelState
from ..config import Config, ConfigError, parse_config, rail_fed_domains
from ..config.dbc_check import dbc_issues
from ..config.reload import ReloadPlan, plan_reload
from ..drivers.accel_mcu import McuAccelerator
from ..drivers.dbc import load_dbc
from ..drivers.mcu_link import McuLink
from .calibration import CalibrationPart
from .core import DaemonCore, PolicyCore
from .host import Part, PowerDownLink, StateExtra
from .ingest import CanIngest
from .lease_service import LeaseService
from .lifecycle import Lifecycle
from .nm_service import NmService
from .overhead import ScrapeTimer
from .persist import Persistence
from .power import RailPower, build_rail_sensor
from .security import FileCheck
from .sources import McuSource, PowerReaders, SomeIpSource, SourcesCollector, build_sensor, signal_routes
from .vehicle_power import VehiclePower

if TYPE_CHECKING:
    from .mqtt import MqttBridge

log = logging.getLogger(__name__)

#: A stop step that takes longer is abandoned (and counted as failed) so the rest still run.
STOP_STEP_TIMEOUT_S = 10.0


class StartError(RuntimeError):
    """A part of the daemon could not start; the parts started before it have been stopped (in
    reverse, as at any stop). `part` names it as the stop steps do ("metrics endpoint", "CAN bus
    vehicle", "leases", ...), so that `run` can say in one line what failed and why."""

    def __init__(self, part: str, cause: Exception) -> None:
        super().__init__(f"{part}: {cause}")
        self.part = part


@contextlib.contextmanager
def _starting(part: str) -> Iterator[None]:
    try:
        yield
    except StartError:
        raise
    except Exception as exc:
        raise StartError(part, exc) from exc


@dataclass(frozen=True)
class ReloadResult:
    result: str  # ok | error | restart_required (the metric's label)
    message: str
    plan: ReloadPlan | None = None

    @property
    def applied(self) -> bool:
        return self.result == "ok"


def wanted_signals(config: Config, bus: str) -> dict[tuple[str, str], str]:
    """{(DBC message, DBC signal): our signal} of the signals read from CAN bus `bus`."""
    default = config.can[0].name if config.can else None
    wanted: dict[tuple[str, str], str] = {}
    for name, s in config.signals.items():
        if s.can and (s.bus or default) == bus:
            message, signal = s.can.split(".", 1)
            wanted[(message, signal)] = name
    return wanted


class _Stack:
    """Started steps with their undo, run in reverse; every error is collected."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def push(self, name: str, undo: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((name, undo))

    async def async_unwind(self) -> list[tuple[str, BaseException]]:
        errors: list[tuple[str, BaseException]] = []
        while self._steps:
            name, undo = self._steps.pop()
            try:
                async with asyncio.timeout(STOP_STEP_TIMEOUT_S):
                    await undo()
            except Exception as exc:  # collected: one failing step must not skip the rest
                log.error("stopping %s failed: %r", name, exc)
                errors.append((name, exc))
        return errors


class Assembly:
    def __init__(self, daemon: DaemonCore) -> None:
        self.daemon = daemon
        self.stop_errors: list[tuple[str, BaseException]] = []
        self.safe_state_reached: bool | None = None
        self._stack = _Stack()
        self._lock = asyncio.Lock()
        self._started = False
        # The parts, by role; each None when its section is off.
        self.file_check: FileCheck | None = None
        self.persistence: Persistence | None = None
        self.leases: LeaseService | None = None
        self.nm: NmService | None = None
        self.ingests: dict[str, CanIngest] = {}
        self.someip: list[SomeIpSource] = []
        self.mcu: McuSource | None = None
        self.sources_collector: SourcesCollector | None = None
        self.power_readers: PowerReaders | None = None
        self.rails: RailPower | None = None
        self.lifecycle: Lifecycle | None = None
        self.mqtt: MqttBridge | None = None
        self.vehicle_power: VehiclePower | None = None
        self.calibration: CalibrationPart | None = None
        self.scrape_timer = ScrapeTimer(daemon.metrics.registry)

    @property
    def parts(self) -> tuple[object, ...]:
        ordered: list[object | None] = [
            self.file_check, self.persistence, self.leases, self.nm, *self.ingests.values(), *self.someip,
            self.mcu, self.power_readers, self.rails, self.vehicle_power, self.lifecycle, self.calibration, self.mqtt]
        return tuple(p for p in ordered if p is not None)

    # -- building (nothing runs or registers until started) ------------------------------------

    def _mcu_link(self) -> McuLink | None:
        """One serial port has one link: the `mcu` accelerator driver's, else the MCU source's."""
        driver = self.daemon.driver
        if isinstance(driver, McuAccelerator):
            return driver.link
        return self.mcu.link if self.mcu is not None else None

    @property
    def power_down_link(self) -> PowerDownLink | None:
        """The gateway's supply through the MCU, for the part that decides to power down (None
        without `[mcu]`)."""
        return self.mcu

    def _budget_wh(self) -> float | None:
        """The 12 V budget for garage-mode leases (None without [battery]: leases are granted)."""
        return self.vehicle_power.budget_wh() if self.vehicle_power is not None else None

    def _accelerator_joules(self, config: Config) -> Callable[[], float] | None:
        """The accelerator domain's energy (`[power] accelerator_domain`) for lease energy caps
        (None without such a domain)."""
        domain = config.power.accelerator_domain
        if not any(dm.name == domain for dm in config.power.domains):
            return None
        d = self.daemon  # read at each call: a reload of [power] gives the ledger a new dict, or a new domain
        return lambda: d.joules.get(d.config.power.accelerator_domain, 0.0)

    async def _async_wake_at(self, when: float | None) -> None:
        """A next-wake request from the lease socket, to the MCU link (started after the leases)."""
        if self.mcu is None:
            raise RuntimeError("the MCU link is not running")
        await self.mcu.async_request_wake_at(when)

    def _build_someip(self, config: Config) -> list[SomeIpSource]:
        d = self.daemon
        routes = signal_routes(config, "someip")
        return [SomeIpSource(e, routes, d.publish_samples, d.clock, d.metrics) for e in config.someip]

    def _build_power_readers(self, config: Config) -> PowerReaders | None:
        fed = rail_fed_domains(config)  # the rail map reads those
        measured = [dm for dm in config.power.domains if dm.source in ("hwmon", "mcu") and dm.name not in fed]
        if not measured:
            return None
        link = self._mcu_link()
        return PowerReaders(((dm, build_sensor(dm, link)) for dm in measured),
                            energy=self.daemon, metrics=self.daemon.metrics)

    def _build_rails(self, config: Config) -> RailPower | None:
        power = config.power
        if power.rails is None:
            return None
        rail_map = power.rails.rail_map()
        link = self._mcu_link()
        sensors = {rail: build_rail_sensor(power.rail_sensors[rail], link) for rail in rail_map.rails()}
        return RailPower(rail_map, sensors, power.rail_interval_ms / 1000, metrics=self.daemon.metrics,
                         energy=self.daemon)

    def _build_mqtt(self, config: Config) -> MqttBridge | None:
        if not config.mqtt.enabled:
            return None
        # Imported here: aiomqtt and paho cost `run` about 1 MB of RSS where MQTT is off
        # (docs/PERFORMANCE.md, "Install, memory and start-up").
        from .mqtt import MqttBridge

        d = self.daemon
        extras: list[StateExtra] = [p for p in (self.lifecycle, self.leases, self.nm, self.vehicle_power,
                                                self.calibration, _CanState(lambda: self.ingests))
                                    if p is not None]
        return MqttBridge(config.mqtt, node=config.daemon.node, domains=[dm.name for dm in config.power.domains],
                          host=d, commands=d.commands, clock=d.clock, metrics=d.metrics, extras=extras)

    async def _async_build_ingests(self, config: Config) -> dict[str, CanIngest]:
        d = self.daemon
        ingests = {}
        for bus in config.can:
            db = await asyncio.to_thread(load_dbc, bus.dbc, bus.dbc_strict)
            ingests[bus.name] = CanIngest(bus, db, wanted_signals(config, bus.name), d.publish_samples,
                                          d.metrics, now=d.clock.now, from_monotonic=d.clock.from_monotonic)
        return ingests

    # -- start / stop ----------------------------------------------------------------------------

    async def _start(self, name: str, part: Part) -> None:
        with _starting(name):
            await part.async_start()
        self._stack.push(name, lambda: part.async_stop())

    async def _start_role(self, name: str, holders: Callable[[], Sequence[Part | None]]) -> None:
        """A role a reload may hand to a new part: its stop step stops whoever holds it then."""
        with _starting(name):
            await _start_all(holders())

        async def stop_holders() -> None:
            for part in reversed(holders()):
                if part is not None:
                    await part.async_stop()

        self._stack.push(name, stop_holders)

    async def async_start(self) -> None:
        d = self.daemon
        cfg = d.config
        try:
            with _starting("actuator"):
                await d.actuator.async_start()
            self._stack.push("actuator (safe state)", self._async_safe_stop)
            d.begin()
            if cfg.prometheus.enabled:
                with _starting(f"metrics endpoint {cfg.prometheus.address}:{cfg.prometheus.port}"):
                    d.port = await d.metrics.async_serve(cfg.prometheus.address, cfg.prometheus.port,
                                                         self.scrape_timer)
                self._stack.push("metrics endpoint", d.metrics.async_stop)
                log.info("metrics on http://%s:%d/metrics", cfg.prometheus.address, d.port)
            self.file_check = FileCheck(d.config_path, cfg.daemon.state_file, d.metrics)
            await self._start("file checks", self.file_check)
            if cfg.daemon.state_file is not None:
                self.persistence = Persistence(Path(cfg.daemon.state_file), cfg.daemon.persist_interval_s,
                                               cfg.daemon.node, d, d.metrics)
                await self._start("persistence", self.persistence)
            if cfg.leases.enabled:
                self.leases = LeaseService(cfg.leases, host=d, clock=d.clock, metrics=d.metrics,
                                           energy_j=self._accelerator_joules(cfg), budget_wh=self._budget_wh,
                                           wake_at=self._async_wake_at if cfg.mcu is not None else None,
                                           commands=d.commands)
                await self._start("leases", self.leases)
            with _starting("CAN DBCs"):
                self.ingests = await self._async_build_ingests(cfg)
            if cfg.vehicle_power.enabled:  # built before NM (NM takes its ignition), started after the sources
                self.vehicle_power = VehiclePower(cfg.vehicle_power, cfg.battery, host=d, actuator=d.actuator,
                                                  model=d.model, clock=d.clock, metrics=d.metrics,
                                                  persistence=self.persistence)
            if cfg.nm.enabled and cfg.can:
                bus = cfg.nm.bus or cfg.can[0].name
                self.nm = NmService(cfg.nm, ingest=self.ingests[bus], host=d, actuator=d.actuator, clock=d.clock,
                                    metrics=d.metrics, leases=self.leases,
                                    ignition=self.vehicle_power.ignition if self.vehicle_power else None)
                await self._start("network management", self.nm)
            if self.vehicle_power is not None:
                self.vehicle_power.attach_nm(self.nm)
            for name, ingest in self.ingests.items():
                await self._start(f"CAN bus {name}", ingest)
                undo_ingest = d.add_ingest(ingest)
                self._stack.push(f"CAN bus {name} (loop)", _as_async(undo_ingest))
            self.someip = self._build_someip(cfg)
            await self._start_role("SOME/IP endpoints", lambda: self.someip)
            if cfg.mcu is not None:
                shared = d.driver.link if isinstance(d.driver, McuAccelerator) else None
                self.mcu = McuSource(cfg.mcu, signal_routes(cfg, "mcu"), d.publish_samples, d.clock, link=shared)
                await self._start("MCU link", self.mcu)
            if self.vehicle_power is not None:
                self.vehicle_power.attach_power_down(self.power_down_link)
            self._register_sources_collector()
            self.power_readers = self._build_power_readers(cfg)
            await self._start_role("power readers", lambda: [self.power_readers])
            self.rails = self._build_rails(cfg)
            await self._start_role("rail map", lambda: [self.rails])
            if self.vehicle_power is not None:
                await self._start("vehicle power", self.vehicle_power)
            self.lifecycle = Lifecycle(cfg.accelerator.escalation, actuator=d.actuator, driver=d.driver, host=d,
                                       clock=d.clock, metrics=d.metrics)
            await self._start("wake watchdog", self.lifecycle)
            self.calibration = CalibrationPart(host=d, clock=d.clock, metrics=d.metrics, persistence=self.persistence)
            await self._start("calibration", self.calibration)
            self.mqtt = self._build_mqtt(cfg)
            await self._start_role("MQTT", lambda: [self.mqtt])
            undo_tickers = d.start_tickers()
            self._stack.push("tickers", _as_async(undo_tickers))
            self._started = True
        except BaseException:
            await self.async_stop()
            raise

    def _register_sources_collector(self) -> None:
        if self.someip or self.mcu is not None:
            self.sources_collector = SourcesCollector(self.someip, self.mcu)
            undo = self.daemon.metrics.register(self.sources_collector)
            self._stack.push("source counters", _as_async(undo))

    async def _async_safe_stop(self) -> None:
        d = self.daemon
        try:
            d.finish()  # energy up to now; STOPPING=1
        finally:
            safe = AccelState(d.config.daemon.safe_state)
            self.safe_state_reached = await d.actuator.async_stop(safe)

    async def async_stop(self) -> None:
        async with self._lock:  # a reload under way finishes first
            self.stop_errors = await self._stack.async_unwind()
            self._started = False

    # -- reload ------------------------------------------------------------------------------

    async def async_reload(self, path: str | None = None) -> ReloadResult:
        d = self.daemon
        path = path or d.config_path
        if path is None:
            return ReloadResult("error", "no config file to reload")
        async with self._lock:
            if not self._started:
                return ReloadResult("error", "the daemon is not running")
            try:
                new = await asyncio.to_thread(self._load_checked, path)
            except ConfigError as exc:
                issues = "; ".join(str(i) for i in exc.issues)
                return self._count(ReloadResult("error", f"reload failed, keeping the running configuration: {issues}"))
            except Exception as exc:  # unreadable file and the like: the running config stays
                return self._count(ReloadResult("error", f"reload failed, keeping the running configuration: {exc}"))
            plan = plan_reload(d.config, new)
            if plan.refused:
                return self._count(ReloadResult("restart_required", plan.message(), plan))
            if not plan.changed:
                return self._count(ReloadResult("ok", plan.message(), plan))
            try:
                await self._async_swap(d.config, new, plan)
            except Exception as exc:
                log.exception("reload failed while swapping; the old parts were restored")
                return self._count(ReloadResult("error", f"reload failed, old configuration restored: {exc}", plan))
            return self._count(ReloadResult("ok", f"{plan.message()} (from {path})", plan))

    def _load_checked(self, path: str) -> Config:
        """Blocking (file reads). As `check` and `run` do: the file, then its CAN signals against
        the DBCs of the running buses (a reload never changes `[[can]]`: that needs a restart)."""
        text = Path(path).read_text("utf-8")
        new = parse_config(text, path)
        dbcs = {name: ingest.db for name, ingest in self.ingests.items()}
        if [b.name for b in new.can] == list(dbcs):
            found = dbc_issues(new, dbcs, text, path)
            if found.errors:
                raise ConfigError(found.errors)
        return new

    def _count(self, result: ReloadResult) -> ReloadResult:
        self.daemon.metrics.config_reloads.labels(result.result).inc()
        level = {"ok": logging.INFO, "restart_required": logging.WARNING}.get(result.result, logging.ERROR)
        log.log(level, "%s", result.message)
        return result

    async def _async_swap(self, old: Config, new: Config, plan: ReloadPlan) -> None:
        d = self.daemon
        core = PolicyCore.build(new, d.model)  # built before anything is stopped: a bad core changes nothing
        sections = plan.sections
        rebuild_someip = "someip" in sections
        rebuild_power = "power" in sections
        rebuild_mqtt = bool({"mqtt", "power"} & sections)
        replaced = _Replacement(
            someip=self._build_someip(new) if rebuild_someip else None,
            power_readers=self._build_power_readers(new) if rebuild_power else None,
            rails=self._build_rails(new) if rebuild_power else None,
            mqtt=self._build_mqtt(new) if rebuild_mqtt else None,
        )
        old_parts = _Replacement(
            someip=self.someip if rebuild_someip else None,
            power_readers=self.power_readers if rebuild_power else None,
            rails=self.rails if rebuild_power else None,
            mqtt=self.mqtt if rebuild_mqtt else None,
        )
        await old_parts.async_stop_quietly()
        try:
            await replaced.async_start()
        except Exception:
            await replaced.async_stop_quietly()
            restored = _Replacement(
                someip=self._build_someip(old) if rebuild_someip else None,
                power_readers=self._build_power_readers(old) if rebuild_power else None,
                rails=self._build_rails(old) if rebuild_power else None,
                mqtt=self._build_mqtt(old) if rebuild_mqtt else None,
            )
            await restored.async_start()
            self._adopt(restored, rebuild_someip, rebuild_power, rebuild_mqtt)
            raise
        # The swap itself: synchronous, so no tick sees a mix of old and new.
        self._adopt(replaced, rebuild_someip, rebuild_power, rebuild_mqtt)
        d.apply_config(new, core)
        refilter = [ingest for name, ingest in self.ingests.items()
                    if ingest.set_wanted(wanted_signals(new, name))]
        routes = signal_routes(new, "someip")
        for source in self.someip:
            source.set_routes(routes)
        if self.mcu is not None:
            self.mcu.set_routes(signal_routes(new, "mcu"))
        if self.persistence is not None:
            self.persistence.interval_s = new.daemon.persist_interval_s
        for ingest in refilter:  # where the kernel filters, new IDs must get through
            try:
                await ingest.async_apply_filters()
            except Exception as exc:  # the routes are in place; only the kernel filter is stale
                log.error("CAN bus %s: acceptance filters not updated: %s", ingest.name, exc)

    def _adopt(self, parts: _Replacement, someip: bool, power: bool, mqtt: bool) -> None:
        """The stack keeps stopping whatever part currently holds each role."""
        if someip:
            self.someip = parts.someip or []
            if self.sources_collector is not None:
                self.sources_collector.set_someip(self.someip)
        if power:
            self.power_readers, self.rails = parts.power_readers, parts.rails
        if mqtt:
            self.mqtt = parts.mqtt


@dataclass
class _Replacement:
    someip: list[SomeIpSource] | None = None
    power_readers: PowerReaders | None = None
    rails: RailPower | None = None
    mqtt: MqttBridge | None = None

    def _parts(self) -> list[Part]:
        return [p for p in (*(self.someip or ()), self.power_readers, self.rails, self.mqtt) if p is not None]

    async def async_start(self) -> None:
        await _start_all(self._parts())

    async def async_stop_quietly(self) -> None:
        for part in reversed(self._parts()):
            await _stop_quietly(part)


class _CanState:
    """The MQTT state's `can` key: per bus, whether it is open, whether it is silent, and the
    frames received (what `cerebellumd status` shows over MQTT, as it does from the metrics)."""

    def __init__(self, ingests: Callable[[], Mapping[str, CanIngest]]) -> None:
        self._ingests = ingests

    def state_extra(self) -> dict[str, Any]:
        buses = self._ingests()
        if not buses:
            return {}
        return {"can": {name: {"connected": i.connected, "silent": i.silent, "frames": i.frames}
                        for name, i in buses.items()}}


async def _start_all(parts: Iterable[Part | None]) -> None:
    """Start in order; if one fails, stop those already started (in reverse) and re-raise."""
    started: list[Part] = []
    try:
        for part in parts:
            if part is not None:
                await part.async_start()
                started.append(part)
    except BaseException:
        for part in reversed(started):
            await _stop_quietly(part)
        raise


async def _stop_quietly(part: Part) -> None:
    try:
        async with asyncio.timeout(STOP_STEP_TIMEOUT_S):
            await part.async_stop()
    except Exception as exc:  # already on an error path: log, keep going
        log.error("stopping %s failed: %r", type(part).__name__, exc)


def _as_async(undo: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        undo()

    return run


__all__ = ["Assembly", "ReloadResult", "wanted_signals"]
