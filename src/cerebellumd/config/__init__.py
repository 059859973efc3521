"""Configuration: TOML validated by pydantic v2 models, one model per section.

Every model forbids unknown keys and describes each field (the descriptions become the JSON
Schema printed by `cerebellumd schema`). `load_config` adds the checks pydantic cannot do
alone (expressions, signal references, driver names) and reports every problem with the file,
line and dotted key, as `cerebellumd check` prints them.

This module sits between the pure core and the shells: it imports `policies` (to build the
core's frozen parameters) and the driver registry (to check names), and is imported by both
`daemon` and `sim`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..accel import AccelState
from ..drivers.mcu_link import McuLinkOptions
from ..drivers.someip_options import SomeIpOptions
from ..drivers.someip_sd_options import SdOptions
from ..policies.calibration import CalibrationParams
from ..policies.entry_risk import EntryRiskParams
from ..policies.expr import ExpressionError, compile_expression
from ..policies.learned import LearnedParams
from ..policies.types import (
    DemandClass,
    DemandSpec,
    Guards,
    OnStale,
    PolicyParams,
    SignalSpec,
)
from .escalation import EscalationConfig
from .nm import NmConfig
from .rails import RailMapConfig
from .vehicle_power import BatteryConfig, VehiclePowerConfig

PositiveMs = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DaemonConfig(Section):
    node: str = Field("gateway", description="Node name: MQTT topics and metric context.",
                      pattern=r"^[A-Za-z0-9_.-]+$")
    tick_ms: PositiveMs = Field(10, description="Period of the decision loop in milliseconds.")
    initial_state: Literal["off", "sleep", "idle", "active"] = Field(
        "idle", description="Accelerator state assumed at start-up before the first read-back.")
    safe_state: Literal["off", "sleep", "idle", "active"] = Field(
        "idle", description="State the accelerator is left in on SIGTERM.")
    state_file: Path | None = Field(
        None, description="Where energy counters persist across restarts (atomic writes).")
    persist_interval_s: float = Field(10.0, gt=0, description="How often the state file is written.")
    telemetry_interval_ms: PositiveMs = Field(
        1000, description="Period of the telemetry loop (power integration, exports).")


class RealtimeConfig(Section):
    uvloop: bool = Field(False, description="Run the event loop on uvloop when installed.")
    cpu_affinity: list[int] = Field(default_factory=list, description="CPUs to pin the daemon to.")
    sched_fifo_priority: int = Field(
        0, ge=0, le=99, description="SCHED_FIFO priority (0 = normal scheduling).")
    mlockall: bool = Field(False, description="Lock memory (mlockall) to avoid page faults.")
    gc_freeze: bool = Field(True, description="gc.freeze() after start-up to shorten GC pauses.")


class AcceleratorConfig(Section):
    profile: str = Field("orin_nano", description="Power profile: a shipped name or a TOML path.")
    driver: str = Field("simulated", description="Accelerator control driver, by registered name.")
    options: dict[str, Any] = Field(default_factory=dict, description="Driver-specific options.")
    command_timeout_ms: PositiveMs = Field(5000, description="Time limit of one driver command.")
    retries: int = Field(3, ge=0, le=20, description="Retries of a failed command (with backoff).")
    retry_backoff_ms: PositiveMs = Field(200, description="First retry delay; doubles each retry.")
    escalation: EscalationConfig = Field(
        default_factory=EscalationConfig, description="Wake watchdog ladder (docs/accelerators.md).")


class CanBusConfig(Section):
    name: str = Field(..., description="Bus name (metrics label `bus`).", pattern=r"^[A-Za-z0-9_-]+$")
    interface: str = Field(..., description="python-can interface: socketcan, slcan, udp_multicast, virtual, ...")
    channel: str = Field(..., description="Channel (can0, /dev/ttyACM0@115200, multicast group, ...).")
    bitrate: int | None = Field(None, gt=0, description="Nominal bitrate (bit/s).")
    fd: bool = Field(False, description="CAN FD.")
    data_bitrate: int | None = Field(None, gt=0, description="CAN FD data-phase bitrate.")
    dbc: str = Field("builtin:vehicle.dbc", description="DBC file path, or builtin:NAME for a shipped one.")
    dbc_strict: bool = Field(True, description="cantools strict mode (many real DBCs need false).")
    filters: bool = Field(True, description="Install acceptance filters for the IDs the signals need.")
    silence_timeout_ms: PositiveMs = Field(1000, description="No frame for this long = silent bus.")
    queue_size: PositiveMs = Field(4096, description=(
        "Bound of the ingest queue of a bus read by a thread (backends without a file descriptor, e.g. virtual; "
        "drops are counted). Buses with one are read on the loop: the kernel's receive buffer bounds them."))
    reconnect_backoff_ms: PositiveMs = Field(500, description="First reconnect delay; doubles up to 30 s.")
    receive_own_messages: bool = Field(False, description="Passed to python-can.")
    listen_only: bool = Field(
        True, description="Never transmit on this bus: the daemon refuses (and counts) every send, and the "
                          "adapter is opened in its listen-only mode where python-can has one (slcan, vector, "
                          "nixnet: listen_only; cantact: monitor; pcan: state=passive; kvaser: silent driver "
                          "mode). socketcan: set it on the interface (`ip link set can0 type can listen-only "
                          "on`). Active NM (nm.passive = false) needs false.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for can.Bus.")
    j1939: Literal["auto", "on", "off"] = Field(
        "auto", description="J1939 matching by PGN (priority and source address masked), transport-protocol "
        "reassembly and address claims: auto = for the DBC messages marked J1939 (VFrameFormat J1939PG, or "
        "ProtocolType J1939), on = for every extended message of the DBC, off = exact IDs only.")


class SignalConfig(Section):
    can: str | None = Field(None, description="`Message.Signal` in the bus DBC.", pattern=r"^\w+\.\w+$")
    bus: str | None = Field(None, description="CAN bus name (default: the first bus).")
    someip: str | None = Field(None, description="SOME/IP field `notification.field`.")
    mcu: str | None = Field(None, description="Companion-MCU reading name.")
    max_age_ms: PositiveMs = Field(500, description="Older than this, the value is stale (unknown).")
    on_stale: OnStale | None = Field(
        None, description="wake | hold | ignore when stale; default wake if it feeds a critical demand, else ignore.")
    description: str = Field("", description="Free text.")

    @model_validator(mode="after")
    def _one_source(self) -> SignalConfig:
        sources = [s for s in (self.can, self.someip, self.mcu) if s]
        if len(sources) != 1:
            raise ValueError("a signal needs exactly one source: can, someip or mcu")
        return self


class DemandConfig(Section):
    name: str = Field(..., description="Demand name (metrics label `demand`).", pattern=r"^[A-Za-z0-9_]+$")
    when: str = Field(..., description="Expression over signal names (safe subset, no eval).")
    demand_class: DemandClass = Field(..., alias="class", description="critical | normal | anticipatory.")
    confirm_ms: int = Field(0, ge=0, description="Wake validation: must hold this long (normal).")
    deadline_ms: PositiveMs = Field(1000, description="How fast the accelerator must be active for it.")
    description: str = Field("", description="Free text.")


class LearnedAnticipationConfig(Section):
    """`[policy.learned_anticipation]`: learn online in which contexts challenges begin and keep
    a warm state there (policies/learned.py). The config names the features, not the rules."""

    enabled: bool = Field(True, description="Learn and use the learned contexts (false: the section is ignored).")
    features: dict[str, list[float]] = Field(
        ..., min_length=1,
        description="Signal -> bin edges (strictly increasing; a value v falls in bin i when edges[i-1] <= v < "
                    "edges[i]), or [] for categorical (a bin per value). A context is the tuple of the features' "
                    "bins; a stale or missing signal is a bin of its own.")
    min_rate_per_h: float = Field(
        60.0, gt=0, description="Warm a context only when its learned onset rate (onsets per hour of exposure) is "
                                "at least this.")
    min_ratio: float = Field(
        2.0, ge=1, description="... and at least this many times the overall onset rate (surprises that come at the "
                              "same rate in every context warm none).")
    prior_exposure_s: float = Field(
        30.0, gt=0, description="Exposure (s) added to every context's and to the overall rate's denominator: "
                                "a prior that damps the first onsets.")
    min_onsets: int = Field(1, ge=1, description="Onsets a context needs before it may be warm.")

    @model_validator(mode="after")
    def _increasing(self) -> LearnedAnticipationConfig:
        for name, edges in self.features.items():
            if any(b <= a for a, b in pairwise(edges)):
                raise ValueError(f"features.{name}: bin edges must be strictly increasing")
        return self


class PolicyConfig(Section):
    name: str = Field("cerebellum_first", description="Name reported by evaluate.")
    release_ms: int = Field(5000, ge=0, description="Stay active this long after the last demand ends.")
    anticipation_release_ms: int = Field(
        3000, ge=0, description="Stay warm this long after an anticipatory demand ends.")
    min_dwell_ms: int = Field(500, ge=0, description="No state change sooner than this (critical excepted).")
    max_wake_cycles_per_hour: int = Field(60, ge=1, description="Non-critical wake cap.")
    latency_budget_ms: PositiveMs = Field(
        1500, description="Deadline of challenges that may come unannounced: bounds sleep depth.")
    initial_idle_prediction_s: float = Field(30.0, gt=0, description="Idle-time guess before any history.")
    idle_prediction_weight: float = Field(0.3, gt=0, le=1, description="EWMA weight of the newest idle gap.")
    deepest_state: Literal["off", "sleep", "idle"] = Field("off", description="Never rest deeper than this.")
    mid_entry_late_share: float = Field(
        0.005, ge=0, lt=1,
        description="Challenges that may come late because they arrived while the accelerator was entering a "
        "resting state whose entry plus exit is over the latency budget, as a share of all challenges: such "
        "entries are spaced out to keep under it, given the share of challenges that came unannounced "
        "(policies/entry_risk.py). 0 turns the spacing off.")
    mid_entry_burst_ms: PositiveMs = Field(
        2000, description="Window time (ms) that such entries may spend back to back before the spacing paces "
        "them: the size of the bucket that `mid_entry_late_share` refills.")
    mid_entry_prior_unannounced_share: float = Field(
        0.3, ge=0, le=1, description="Share of challenges assumed to come unannounced before any was counted "
        "(the spacing's prior; the counted share replaces it as challenges are seen).")
    mid_entry_prior_challenges: float = Field(
        5.0, gt=0, description="Weight of that prior, in challenges: how many counted challenges it takes for "
        "the counted share to outweigh it.")
    budget_probation_s: float = Field(
        0.0, ge=0,
        description="Before the world has confirmed `latency_budget_ms`, rest no deeper than idle for this many "
        "seconds of rest (seconds the policy would otherwise have rested deeper): an unannounced challenge met "
        "in that time tells, through its consumer's report, what it allowed, and ends the probation. Persisted "
        "with the calibration, so a car pays it once, not at every start (policies/calibration.py; measured in "
        "docs/PERFORMANCE.md, \"Probation\"). 0 (the default) trusts the budget from the start.")
    timeout_idle_s: float = Field(30.0, gt=0, description="Idle timeout of the `timeout` baseline.")
    timeout_state: Literal["off", "sleep", "idle"] = Field("sleep", description="Rest state of the `timeout` baseline.")
    learned_anticipation: LearnedAnticipationConfig | None = Field(
        None, description="Learned anticipation (`[policy.learned_anticipation]`); off when absent.")


class GuardsConfig(Section):
    battery_signal: str | None = Field(None, description="Signal with battery voltage (V).")
    battery_min_v: float = Field(11.8, description="Below this only critical demands wake.")
    temperature_signal: str | None = Field(None, description="Signal with accelerator temperature (°C).")
    temperature_max_c: float = Field(95.0, description="Above this only critical demands wake.")


class DomainConfig(Section):
    name: str = Field(..., description="Domain name (metrics label `domain`).", pattern=r"^[A-Za-z0-9_]+$")
    source: Literal["model", "constant", "hwmon", "mcu"] = Field(
        ..., description="model: accelerator model; constant: fixed estimate; hwmon/mcu: measured.")
    watts: float | None = Field(None, ge=0, description="Estimate for source=constant.")
    sensor: str | None = Field(None, description="hwmon label/path or MCU reading for measured sources.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Sensor options: hwmon (name, label, channel, root) or mcu (readings_max_age_ms).")
    interval_ms: PositiveMs = Field(1000, description="How often a measured domain's sensor is read.")


class SomeIpEndpointConfig(SomeIpOptions):
    """One SOME/IP receive endpoint (`[[someip]]`): a UDP socket and the payload fields it maps."""

    name: str = Field("someip", description="Endpoint name (metrics label `endpoint`).",
                      pattern=r"^[A-Za-z0-9_-]+$")
    sd: SdOptions | None = Field(
        None, description="SOME/IP-SD client (`[someip.sd]`): find the services and subscribe to their "
                          "eventgroups with this endpoint's host:port (docs/someip.md). Off when absent.")

    @model_validator(mode="after")
    def _sd_port_apart(self) -> SomeIpEndpointConfig:
        if self.sd is not None and self.port != 0 and self.port == self.sd.port:
            raise ValueError(f"port {self.port} is the SD port: notifications need a port of their own")
        return self


#: What `signals.X.mcu` may name: READINGS values (SI units), the HEARTBEAT's ignition flag, and
#: the latched wake/sleep request of the MCU (`wake_request` 1 after WAKE_REQUEST, 0 after
#: SLEEP_REQUEST; `request_reason` the reason code of the latest one).
MCU_SIGNALS: tuple[str, ...] = (
    "battery_v", "mcu_temp_c", "accel_temp_c", "rail_v", "rail_a", "rail_w", "rail_on",
    "ignition", "wake_request", "request_reason",
)


class McuConfig(McuLinkOptions):
    """The companion MCU (`[mcu]`): one serial link shared by signals, sensors and the `mcu`
    accelerator driver."""

    wake_request_hold_ms: int | None = Field(
        None, gt=0,
        description="wake_request falls back to 0 this long after the last WAKE_REQUEST "
                    "(default: it stays 1 until a SLEEP_REQUEST).")
    power_down_after_s: int = Field(
        30, ge=0, le=65535,
        description="POWER_DOWN_ALLOWED: the MCU cuts the gateway's supply this long after its ACK "
                    "(time for the OS to shut down).")

    def link_options(self) -> McuLinkOptions:
        return McuLinkOptions.model_validate(self.model_dump(include=set(McuLinkOptions.model_fields)))


class SensorConfig(Section):
    driver: str = Field("hwmon", description="Power sensor driver, by registered name (hwmon, mcu).")
    options: dict[str, Any] = Field(default_factory=dict, description="Driver-specific options.")


class PowerConfig(Section):
    domains: list[DomainConfig] = Field(
        default_factory=lambda: [
            DomainConfig(name="accelerator", source="model"),
            DomainConfig(name="gateway", source="constant", watts=3.5),
            DomainConfig(name="mcu", source="constant", watts=0.6),
        ],
        description="Power domains; each joule is attributed to one.")
    rail_sensors: dict[str, SensorConfig] = Field(
        default_factory=dict, description="One power sensor per rail of the rail map, by rail name.")
    rails: RailMapConfig | None = Field(
        None, description="Rail map: which rail is a total and which are its parts (never summed twice).")
    rail_interval_ms: PositiveMs = Field(1000, description="How often the rail sensors are read.")
    accelerator_domain: str = Field(
        "accelerator", description="The domain that is the accelerator's: lease energy caps (max_energy_wh) count "
        "its energy, and it is also counted by the reason behind the policy's target "
        "(cerebellumd_accelerator_energy_joules_total{reason}). A name no domain has: neither.")


LeasePriorityName = Literal["safety", "normal", "power_saver"]
LeaseModeName = Literal["awake", "sleep"]


def _unprivileged_priorities() -> list[LeasePriorityName]:
    return ["normal", "power_saver"]


def _all_modes() -> list[LeaseModeName]:
    return ["awake", "sleep"]


def _awake_only() -> list[LeaseModeName]:
    return ["awake"]


class LeaseRuleConfig(Section):
    """One `[[leases.rules]]` entry: which peers (by the uid/gid the kernel reports for the socket,
    SO_PEERCRED) may claim what. The first rule that matches a peer decides; a rule naming neither
    uid/user nor gid/group matches everyone."""

    uid: int | None = Field(None, ge=0, description="Peer user id this rule applies to.")
    user: str | None = Field(None, min_length=1, description="Peer user name (resolved to a uid at start).")
    gid: int | None = Field(None, ge=0, description="Peer group id (the peer's own gid as SO_PEERCRED reports it).")
    group: str | None = Field(None, min_length=1, description="Peer group name (resolved to a gid at start).")
    priorities: list[LeasePriorityName] = Field(
        default_factory=_unprivileged_priorities, description="Lease priorities the peer may claim.")
    modes: list[LeaseModeName] = Field(
        default_factory=_all_modes, description="Lease modes the peer may claim.")
    max_duration_s: float | None = Field(
        None, gt=0, description="Longest hard cap (max_duration_s) the peer may ask for (default: [leases] "
                                "max_duration_s).")
    max_energy_wh: float | None = Field(
        None, gt=0, description="Largest energy cap the peer may ask for; its awake leases get this cap "
                                "when they name none (default: no energy limit).")
    next_wake: bool = Field(True, description="The peer may ask the MCU for a next wake (op wake_at).")

    @model_validator(mode="after")
    def _one_name_each(self) -> LeaseRuleConfig:
        if self.uid is not None and self.user is not None:
            raise ValueError("give uid or user, not both")
        if self.gid is not None and self.group is not None:
            raise ValueError("give gid or group, not both")
        return self


class LeaseConfig(Section):
    """`[leases]`: the local lease socket for inference applications."""

    enabled: bool = Field(False, description="Serve the lease socket.")
    path: Path = Field(
        Path("/run/cerebellumd/leases.sock"), description="Unix socket path (its directory must exist).")
    socket_mode: int = Field(0o660, ge=0, le=0o777, description="Permission bits of the socket file.")
    max_line_bytes: int = Field(4096, ge=64, le=1 << 20, description="Longest request line accepted.")
    max_leases_per_client: int = Field(8, ge=1, le=1024, description="Leases one connection may hold.")
    max_clients: int = Field(64, ge=1, le=4096, description="Concurrent connections accepted.")
    max_ttl_s: float = Field(3600.0, gt=0, description="Longest lease (s); apps renew beyond it.")
    override_grace_s: float = Field(
        30.0, ge=0, description="After a manual operator command, non-safety leases wait this long.")
    cap_required_modes: list[LeaseModeName] = Field(
        default_factory=_awake_only,
        description="Lease modes that must carry a hard cap (max_duration_s); one without is refused "
                    "(error no_cap). Awake leases keep the accelerator, and the car, awake.")
    max_duration_s: float = Field(
        3600.0, gt=0, description="Longest hard cap a lease may ask for (s): the lease ends then, renewed or not.")
    min_budget_wh: float = Field(
        0.0, ge=0, description="Awake leases are granted, and kept, only while the 12 V energy budget is at "
                               "least this (Wh); a lease may ask for more (min_budget_wh). No budget known: granted.")
    max_wake_requests: int = Field(
        16, ge=1, le=1024, description="Next-wake requests (op wake_at) held at once, one per app.")
    rules: list[LeaseRuleConfig] | None = Field(
        None, description="Who may claim what, by peer uid/gid (SO_PEERCRED); first match wins. Absent: uid 0 "
                          "may claim every priority, everyone else normal and power_saver. An empty list refuses "
                          "everyone.")


class PrometheusConfig(Section):
    enabled: bool = Field(True, description="Serve metrics.")
    address: str = Field("127.0.0.1", description="Bind address (localhost by default).")
    port: int = Field(9108, ge=0, le=65535, description="Port (0 = any free port).")


class MqttConfig(Section):
    enabled: bool = Field(False, description="Connect to an MQTT broker.")
    host: str = Field("127.0.0.1", description="Broker host.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    prefix: str = Field("cerebellumd", description="Topic prefix: <prefix>/<node>/...")
    username: str | None = Field(None, description="Username.")
    password: str | None = Field(None, description="Password.")
    password_file: Path | None = Field(None, description="File holding the password.")
    tls_ca_file: Path | None = Field(None, description="CA bundle; enables TLS.")
    tls_cert_file: Path | None = Field(None, description="Client certificate.")
    tls_key_file: Path | None = Field(None, description="Client key.")
    keepalive_s: int = Field(30, ge=5, description="MQTT keepalive.")
    publish_interval_ms: PositiveMs = Field(1000, description="State is published at most this often.")
    command_rate_per_minute: PositiveMs = Field(60, description="Commands beyond this rate are rejected.")
    operators: list[str] = Field(default_factory=list, description="Owners allowed to command (empty: any).")
    homeassistant_discovery: bool = Field(False, description="Publish Home Assistant discovery configs.")
    reconnect_max_s: float = Field(
        30.0, gt=0, description="Longest wait between reconnect attempts (the backoff doubles up to it).")


class Config(Section):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="Daemon settings.")
    realtime: RealtimeConfig = Field(default_factory=RealtimeConfig, description="Real-time settings.")
    accelerator: AcceleratorConfig = Field(default_factory=AcceleratorConfig, description="Accelerator.")
    can: list[CanBusConfig] = Field(default_factory=list, description="CAN buses.")
    signals: dict[str, SignalConfig] = Field(default_factory=dict, description="Signals by name.")
    demands: list[DemandConfig] = Field(default_factory=list, description="Demands (challenges).")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Policy parameters.")
    guards: GuardsConfig = Field(default_factory=GuardsConfig, description="Battery and thermal guards.")
    power: PowerConfig = Field(default_factory=PowerConfig, description="Power domains.")
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig, description="Metrics endpoint.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT telemetry and control.")
    nm: NmConfig = Field(default_factory=NmConfig, description="CAN network management (docs/network-management.md).")
    leases: LeaseConfig = Field(default_factory=LeaseConfig, description="Local lease socket for applications.")
    someip: list[SomeIpEndpointConfig] = Field(
        default_factory=list, description="SOME/IP notification endpoints (UDP).")
    mcu: McuConfig | None = Field(None, description="Companion-MCU serial link.")
    vehicle_power: VehiclePowerConfig = Field(
        default_factory=VehiclePowerConfig, description="Ignition fusion: the vehicle power state (docs/parked.md).")
    battery: BatteryConfig = Field(
        default_factory=BatteryConfig, description="The 12 V energy budget while parked (docs/parked.md).")

    @model_validator(mode="before")
    @classmethod
    def _mcu_driver_uses_mcu_link(cls, data: Any) -> Any:
        """With accelerator.driver = "mcu" and an [mcu] section, the driver runs on [mcu]'s link
        (one serial port, one link): its link settings are taken from there unless given."""
        if not isinstance(data, dict) or not isinstance(data.get("mcu"), dict):
            return data
        accel = data.get("accelerator")
        if not isinstance(accel, dict) or accel.get("driver") != "mcu":
            return data
        options = accel.get("options", {})
        if not isinstance(options, dict) or "link" in options:
            return data
        link = {k: v for k, v in data["mcu"].items() if k in McuLinkOptions.model_fields}
        return {**data, "accelerator": {**accel, "options": {**options, "link": link}}}


# -- errors with file, line and key ------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = tuple(issues)


_TABLE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


def locate(text: str, loc: Sequence[str | int]) -> int | None:
    """Best line number (1-based) for a key path in a TOML text: the line of the deepest part of
    the path found, so an unknown key points at itself and a missing one at its table."""
    arrays: dict[str, int] = {}
    table: tuple[str | int, ...] = ()
    best_line, best_len = None, -1
    target = tuple(loc)
    for number, line in enumerate(text.splitlines(), start=1):
        m = _TABLE.match(line)
        if m:
            parts = tuple(_unquote(p) for p in m.group(2).split("."))
            if m.group(1) == "[[":
                key = ".".join(parts)
                arrays[key] = arrays.get(key, -1) + 1
                table = (*parts, arrays[key])
            else:
                table = _with_indices(parts, arrays)
            depth = _prefix_len(table, target)
            if depth == len(table) and depth > best_len:
                best_line, best_len = number, depth
            continue
        k = _KEY.match(line)
        if k:
            full = (*table, *(_unquote(p) for p in k.group(1).split(".")))
            depth = _prefix_len(full, target)
            if depth == len(full) and depth > best_len:
                best_line, best_len = number, depth
    return best_line


def _with_indices(parts: tuple[str, ...], arrays: dict[str, int]) -> tuple[str | int, ...]:
    out: list[str | int] = []
    for i, part in enumerate(parts):
        out.append(part)
        key = ".".join(parts[: i + 1])
        if key in arrays and i < len(parts) - 1:
            out.append(arrays[key])
    return tuple(out)


def _unquote(part: str) -> str:
    part = part.strip()
    return part[1:-1] if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'" else part


def _prefix_len(a: Sequence[str | int], b: Sequence[str | int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


M = TypeVar("M", bound=BaseModel)


def validate_toml(text: str, file: str, model: type[M]) -> M:
    """A TOML text validated as `model`; ConfigError with the file, line and dotted key of every
    problem (a syntax error, an unknown key, a wrong type, a model-level check). The config, the
    event, day and labels files all read through here."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))  # tomllib puts the line in the message only
        raise ConfigError([ConfigIssue(file, int(m.group(1)) if m else None, "", f"TOML syntax: {exc}")]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_validation_issue(file, text, err) for err in exc.errors()]) from None


def _validation_issue(file: str, text: str, err: Any) -> ConfigIssue:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
    msg = "unknown key (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
    if not loc:  # a model-level check names its key first ("key: why")
        key = msg.removeprefix("Value error, ").split(":", 1)[0]
        return ConfigIssue(file, locate(text, (key,)), key, msg)
    return ConfigIssue(file, locate(text, loc), _dotted(loc), msg)


def read_text(path: str | Path) -> str:
    """A config-like file's text; ConfigError naming it when it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), None, "", f"cannot read: {exc.strerror}")]) from None


def parse_config(text: str, file: str = "<config>") -> Config:
    """Parse and validate a TOML text; raise ConfigError listing every problem."""
    config = validate_toml(text, file, Config)
    issues = [ConfigIssue(file, locate(text, loc), _dotted(loc), msg) for loc, msg in semantic_issues(config)]
    if issues:
        raise ConfigError(issues)
    return config


_UNION_TAGS = {"function-after[_one_source(), SignalConfig]"}


def load_config(path: str | Path) -> Config:
    return parse_config(read_text(path), str(path))


def builtin_example(name: str = "demo.toml") -> str:
    return resources.files("cerebellumd").joinpath("examples", name).read_text(encoding="utf-8")


def semantic_issues(config: Config) -> list[tuple[tuple[str | int, ...], str]]:
    """Checks across sections: expressions, signal and bus references, driver names."""
    from ..drivers.registry import known_names  # drivers sit below config; avoids a cycle at import

    issues: list[tuple[tuple[str | int, ...], str]] = []
    names = frozenset(config.signals)
    bus_names = [b.name for b in config.can]
    someip_fields: set[str] = set()
    for i, endpoint in enumerate(config.someip):
        for j, spec in enumerate(endpoint.fields):
            if spec.signal in someip_fields:
                issues.append((("someip", i, "fields", j), f"field {spec.signal!r} is defined twice"))
            someip_fields.add(spec.signal)
    endpoint_names = [e.name for e in config.someip]
    if len(set(endpoint_names)) != len(endpoint_names):
        issues.append((("someip",), "endpoint names must be unique"))
    if len(set(bus_names)) != len(bus_names):
        issues.append((("can",), "bus names must be unique"))
    for name, sig in config.signals.items():
        if sig.can and not config.can:
            issues.append((("signals", name, "can"), "no [[can]] bus is configured"))
        if sig.someip and sig.someip not in someip_fields:
            known = ", ".join(sorted(someip_fields)) or "none: no [[someip]] endpoint"
            issues.append((("signals", name, "someip"), f"no [[someip]] field {sig.someip!r}; known: {known}"))
        if sig.mcu and config.mcu is None:
            issues.append((("signals", name, "mcu"), "no [mcu] section is configured"))
        elif sig.mcu and sig.mcu not in MCU_SIGNALS:
            issues.append((("signals", name, "mcu"),
                           f"unknown MCU reading {sig.mcu!r}; known: {', '.join(MCU_SIGNALS)}"))
        if sig.bus and sig.bus not in bus_names:
            issues.append((("signals", name, "bus"), f"unknown bus {sig.bus!r}"))
    seen: set[str] = set()
    for i, demand in enumerate(config.demands):
        if demand.name in seen:
            issues.append((("demands", i, "name"), f"duplicate demand {demand.name!r}"))
        seen.add(demand.name)
        try:
            compile_expression(demand.when, names)
        except ExpressionError as exc:
            issues.append((("demands", i, "when"), str(exc)))
    for key in ("battery_signal", "temperature_signal"):
        ref = getattr(config.guards, key)
        if ref is not None and ref not in names:
            issues.append((("guards", key), f"unknown signal {ref!r}"))
    if config.policy.learned_anticipation is not None:
        for ref in config.policy.learned_anticipation.features:
            if ref not in names:
                issues.append((("policy", "learned_anticipation", "features", ref), f"unknown signal {ref!r}"))
    if config.accelerator.driver not in known_names("accelerator"):
        issues.append(
            (("accelerator", "driver"),
             f"unknown driver {config.accelerator.driver!r}; known: {', '.join(sorted(known_names('accelerator')))}")
        )
    for i, bus in enumerate(config.can):
        if bus.interface not in known_names("can"):
            issues.append((("can", i, "interface"), f"unknown python-can interface {bus.interface!r}"))
    from ..profiles import ProfileError, load_profile

    try:
        load_profile(config.accelerator.profile)
    except ProfileError as exc:
        issues.append((("accelerator", "profile"), str(exc)))
    domains = [d.name for d in config.power.domains]
    if len(set(domains)) != len(domains):
        issues.append((("power", "domains"), "domain names must be unique"))
    for i, d in enumerate(config.power.domains):
        if d.source == "constant" and d.watts is None:
            issues.append((("power", "domains", i, "watts"), "source=constant needs watts"))
        if d.name not in rail_fed_domains(config):  # the rail map feeds it: its rails are checked below
            issues.extend(_sensor_issues(config, i, d))
    issues += _power_and_nm_issues(config)
    if config.accelerator.driver == "mcu" and config.mcu is not None:
        link = config.accelerator.options.get("link")
        if isinstance(link, dict) and link.get("port") != config.mcu.port:
            issues.append((("accelerator", "options", "link", "port"),
                           f"differs from [mcu] port {config.mcu.port!r}: one serial port has one link"))
    return issues


def _sensor_issues(config: Config, i: int, d: DomainConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """A measured domain's sensor options must build its driver (hwmon) or find the MCU."""
    from ..drivers.accel_mcu import McuPowerSensorOptions
    from ..drivers.hwmon import HwmonOptions

    where: tuple[str | int, ...] = ("power", "domains", i)
    try:
        if d.source == "hwmon":
            HwmonOptions.model_validate(hwmon_options(d))
        elif d.source == "mcu":
            if config.mcu is None:
                return [((*where, "source"), "source=mcu needs an [mcu] section")]
            if d.sensor not in (None, "rail_w"):
                return [((*where, "sensor"), "the MCU measures the accelerator rail only: use rail_w or omit")]
            if "link" in d.options:
                return [((*where, "options", "link"), "the sensor shares the [mcu] link: remove it")]
            McuPowerSensorOptions.model_validate(d.options)
    except ValidationError as exc:
        return [((*where, "options"), "; ".join(e["msg"] for e in exc.errors()))]
    return []


def hwmon_options(d: DomainConfig) -> dict[str, Any]:
    """hwmon sensor options of a domain: `sensor` is shorthand for the channel label."""
    options = dict(d.options)
    if d.sensor is not None:
        options.setdefault("label", d.sensor)
    return options


def rail_fed_domains(config: Config) -> frozenset[str]:
    """Domains whose watts come from the rail map (`[power.rails]`), not from a sensor of their own."""
    rails = config.power.rails
    if rails is None:
        return frozenset()
    rail_map = rails.rail_map()
    fed = {g.other_domain for g in rail_map.groups} | set(rail_map.independent.values())
    return frozenset(fed | {d for g in rail_map.groups for d in g.parts.values()})


def _power_and_nm_issues(config: Config) -> list[tuple[tuple[str | int, ...], str]]:
    """A watt is counted once: a domain fed by the rail map has no sensor of its own, and every
    mapped rail has a sensor. NM names a configured bus and signals."""
    power = config.power
    issues: list[tuple[tuple[str | int, ...], str]] = []
    if power.rails is not None:
        rail_map = power.rails.rail_map()
        fed = rail_fed_domains(config)
        for rail in sorted(set(rail_map.rails()) - set(power.rail_sensors)):
            issues.append((("power", "rail_sensors"), f"rail {rail!r} has no [power.rail_sensors.{rail}]"))
        for i, d in enumerate(power.domains):
            if d.name in fed and (d.sensor is not None or d.options or d.source not in ("hwmon", "mcu")):
                # One domain, one source of watts: a sensor of its own would count it twice.
                issues.append((("power", "domains", i, "source"),
                               f"domain {d.name!r} is fed by the rail map: use source=hwmon without sensor/options"))
    nm = config.nm
    buses = [b.name for b in config.can]
    if nm.enabled and not buses:
        issues.append((("nm", "enabled"), "NM needs a [[can]] bus"))
    if nm.bus is not None and nm.bus not in buses:
        issues.append((("nm", "bus"), f"unknown bus {nm.bus!r}"))
    for key in ("ignition_signal", "battery_signal"):
        ref = getattr(nm, key)
        if ref is not None and ref not in config.signals:
            issues.append((("nm", key), f"unknown signal {ref!r}"))
    if nm.enabled and not nm.passive and config.can:
        nm_bus = next((b for b in config.can if b.name == (nm.bus or config.can[0].name)), None)
        if nm_bus is not None and nm_bus.listen_only:
            issues.append((("nm", "passive"), f"active NM transmits: set listen_only = false on bus {nm_bus.name!r}"))
    return issues + _parked_issues(config)


def _parked_issues(config: Config) -> list[tuple[tuple[str | int, ...], str]]:
    vp, battery = config.vehicle_power, config.battery
    issues: list[tuple[tuple[str | int, ...], str]] = []
    for section, model, keys in (
            ("vehicle_power", vp, ("line_signal", "can_ignition_signal", "power_mode_signal")),
            ("battery", battery, ("current_signal", "voltage_signal"))):
        for key in keys:
            ref = getattr(model, key)
            if ref is not None and ref not in config.signals:
                issues.append(((section, key), f"unknown signal {ref!r}"))
    if vp.enabled and not (vp.line_signal or vp.can_ignition_signal or vp.power_mode_signal
                           or (vp.use_nm and config.nm.enabled)):
        issues.append((("vehicle_power", "enabled"),
                       "no source: set line_signal, can_ignition_signal, power_mode_signal or enable [nm]"))
    if battery.enabled and not vp.enabled:
        issues.append((("battery", "enabled"), "the budget needs [vehicle_power] enabled (parked or driving)"))
    return issues


# -- to the pure core --------------------------------------------------------------------------


def policy_params(config: Config) -> PolicyParams:
    names = frozenset(config.signals)
    demands = tuple(
        DemandSpec(
            name=d.name,
            expression=compile_expression(d.when, names),
            demand_class=d.demand_class,
            confirm_s=d.confirm_ms / 1000,
            deadline_s=d.deadline_ms / 1000,
        )
        for d in config.demands
    )
    critical_inputs = {
        n for d in demands if d.demand_class is DemandClass.CRITICAL for n in d.expression.names
    }
    signals = tuple(
        SignalSpec(
            name=name,
            max_age_s=s.max_age_ms / 1000,
            on_stale=s.on_stale or (OnStale.WAKE if name in critical_inputs else OnStale.IGNORE),
        )
        for name, s in config.signals.items()
    )
    p = config.policy
    g = config.guards
    la = p.learned_anticipation
    learned = LearnedParams() if la is None or not la.enabled else LearnedParams(
        features=tuple((name, tuple(edges)) for name, edges in la.features.items()),
        min_rate_per_h=la.min_rate_per_h,
        min_ratio=la.min_ratio,
        prior_exposure_s=la.prior_exposure_s,
        min_onsets=la.min_onsets,
    )
    return PolicyParams(
        signals=signals,
        demands=demands,
        release_s=p.release_ms / 1000,
        min_dwell_s=p.min_dwell_ms / 1000,
        anticipation_release_s=p.anticipation_release_ms / 1000,
        max_wake_cycles_per_hour=p.max_wake_cycles_per_hour,
        latency_budget_s=p.latency_budget_ms / 1000,
        initial_idle_prediction_s=p.initial_idle_prediction_s,
        idle_prediction_weight=p.idle_prediction_weight,
        deepest_state=AccelState(p.deepest_state),
        entry_risk=EntryRiskParams(late_share=p.mid_entry_late_share, burst_s=p.mid_entry_burst_ms / 1000,
                                   prior_challenges=p.mid_entry_prior_challenges,
                                   prior_unannounced_share=p.mid_entry_prior_unannounced_share),
        calibration=CalibrationParams(probation_s=p.budget_probation_s),
        guards=Guards(
            battery_signal=g.battery_signal,
            battery_min_v=g.battery_min_v,
            temperature_signal=g.temperature_signal,
            temperature_max_c=g.temperature_max_c,
        ),
        learned=learned,
    )
