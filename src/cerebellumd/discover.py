"""`cerebellumd discover LOG --dbc DBC`: what a recording carries, and which signals look like
the roles a config needs (speed, gear, ignition, pedals, steering, turn signals, cruise/ACC,
lane keeping), each with its COVESA VSS name.

Two halves: `Discovery` is pure analysis (it is fed `(time, id, extended, data, error)` frames and
a cantools database, and never opens a file); `discover()` does the I/O around it (loading the DBC,
reading the log with python-can's `LogReader`). `suggest_config()` turns a result into a starting
TOML config; `render()` draws the rich tables.

Roles are judged by name patterns (over `Message.Signal`, opendbc's and OEM spellings) and by
behaviour: a speed has a km/h-like unit and range and agrees with the wheel speeds when the car
sends them; a gear has few values and DBC choices; a switch (brake, ignition, turn signal) has
few values. Each candidate carries the reasons it was chosen, and its score.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import can
import cantools
from cantools.database.can import Database, Message

#: How often a signal's value is kept for the behaviour checks (the statistics see every frame).
SERIES_STEP_S = 0.1
#: More distinct values than this are counted as "many".
DISTINCT_CAP = 256


class DiscoverError(ValueError):
    """The log or the DBC cannot be used; the message says which and why."""


# -- statistics ----------------------------------------------------------------------------------


@dataclass
class SignalStats:
    message: str
    name: str
    unit: str
    choices: dict[int, str]
    dbc_min: float | None
    dbc_max: float | None
    count: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    changes: int = 0
    distinct: set[float] = field(default_factory=set)
    last: float | None = None
    series_t: list[float] = field(default_factory=list)
    series_v: list[float] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.message}.{self.name}"

    def add(self, t: float, value: float) -> None:
        self.count += 1
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        if self.last is not None and value != self.last:
            self.changes += 1
        self.last = value
        if len(self.distinct) <= DISTINCT_CAP:
            self.distinct.add(value)
        if not self.series_t or t - self.series_t[-1] >= SERIES_STEP_S:
            self.series_t.append(t)
            self.series_v.append(value)

    @property
    def distinct_count(self) -> int:
        return len(self.distinct)

    def value_at(self, t: float) -> float | None:
        """The kept value nearest before t (None before the first)."""
        i = bisect.bisect_right(self.series_t, t) - 1
        return self.series_v[i] if i >= 0 else None


@dataclass
class MessageStats:
    name: str
    frame_id: int
    extended: bool
    frames: int = 0
    decode_errors: int = 0
    first: float = math.inf
    last: float = -math.inf
    dlcs: Counter[int] = field(default_factory=Counter)

    @property
    def rate_hz(self) -> float:
        span = self.last - self.first
        return (self.frames - 1) / span if self.frames > 1 and span > 0 else 0.0

    @property
    def period_ms(self) -> float | None:
        rate = self.rate_hz
        return 1000.0 / rate if rate > 0 else None


@dataclass
class UnknownId:
    frame_id: int
    extended: bool
    frames: int = 0
    first: float = math.inf
    last: float = -math.inf

    @property
    def rate_hz(self) -> float:
        span = self.last - self.first
        return (self.frames - 1) / span if self.frames > 1 and span > 0 else 0.0


# -- roles ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    name: str  # our signal name in a suggested config
    title: str
    vss: str | None
    include: re.Pattern[str]
    exclude: re.Pattern[str] | None = None


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


#: The roles a cerebellumd config typically needs, with their COVESA VSS (v4) names.
ROLES: tuple[Role, ...] = (
    Role("speed", "vehicle speed", "Vehicle.Speed",
         _rx(r"(^|[._])(VEH(ICLE)?_?)?(SPEED|SPD|VELOCITY|VSPD|SP1)($|[._0-9])|VEHICLESPEED|FORWARD_SPEED"),
         _rx(r"WHEEL|WHL|SET|UI_|TARGET|LIMIT|CRUISE|ENGINE|RPM|FAN|WIPER|STEER|RATE|REL_|LEAD|SPDVAL|SPLSGN|UNIT"
             r"|ENCODER|CHECKSUM|COUNTER|MAX|MIN|OVSP|NTLVL")),
    Role("wheel_speed", "wheel speed (evidence for the speed)", "Vehicle.Chassis.Axle.Row1.Wheel.Left.Speed",
         _rx(r"WHEEL.*SP(EE)?D|WHL.*SP(EE)?D|^VX(FR|FL|RR|RL)$|WHEEL_?SPEED")),
    Role("gear", "gear / reverse", "Vehicle.Powertrain.Transmission.SelectedGear",
         _rx(r"GEAR|PRND|SHIFT|SELECTOR|TRANS(MISSION)?_?(POS|STATE)|REVERSE"),
         _rx(r"SPORT|HD$|GEARHD|REVERSE_CAMERA|GUIDELINES|CHECKSUM|COUNTER|RATIO|ECON|_ON$")),
    Role("ignition", "ignition / power mode", "Vehicle.LowVoltageSystemState",
         _rx(r"(^|[._])(IGN|IGNITION|KL_?15)([._0-9]|_?(SW|ON|STATE|STATUS|ST|POS)|$)|IGNITION|POWER_?MODE|KEY_?(POS|STATE)"
             r"|PWR_?MODE|SYS_?POWER_?(MODE|STATE)"),
         _rx(r"CHECKSUM|COUNTER")),
    Role("brake", "brake pedal", "Vehicle.Chassis.Brake.PedalPosition",
         _rx(r"BRAKE_?(PRESS|PEDAL|SWITCH|POS|ON|LIGHT)|BRK_?(ON|SW|PED)|BRKON|BRAKE_PRESSED|BRAKEPEDAL"),
         _rx(r"CHECKSUM|COUNTER|HOLD|ACC_|CMD|PRESSURE|REQ")),
    Role("accel_pedal", "accelerator pedal", "Vehicle.Chassis.Accelerator.PedalPosition",
         _rx(r"GAS_?PEDAL|ACC(EL)?(ERATOR)?_?PEDAL|THROTTLE|PEDAL_?POS|APP|GAS_RELEASED"),
         _rx(r"CHECKSUM|COUNTER|CMD|ALT$")),
    Role("steering_angle", "steering wheel angle", "Vehicle.Chassis.SteeringWheel.Angle",
         _rx(r"STEER(ING)?(_?WHEEL)?_?ANGLE|SAS_?ANGLE|SWA$"),
         _rx(r"CMD|REQ|INITIALIZING|RATE|CHECKSUM|COUNTER|LTA|IPAS")),
    Role("turn_signal", "turn signals", "Vehicle.Body.Lights.DirectionIndicator.Left.IsSignaling",
         _rx(r"TURN|BLINK|INDICATOR|DIR_?IND"),
         _rx(r"CHECKSUM|COUNTER|BUTTON|LTA_RELATED")),
    Role("cruise", "cruise control / ACC state", "Vehicle.ADAS.CruiseControl.IsActive",
         _rx(r"CRUISE_?(ACTIVE|STATE|STATUS|ENGAGED|ON)|ACC_?(ACTIVE|STATE|STATUS|ENGAGED)|CRUISE_CONTROL_STATE"
             r"|MAIN_ON"),
         _rx(r"CHECKSUM|COUNTER|FAULT|BTN|BUTTON|REQ|CANCEL|DSU_CRUISE")),
    Role("lane_keeping", "lane keeping / ADAS state", "Vehicle.ADAS.LaneDepartureDetection.IsEnabled",
         _rx(r"LKAS?_?(STATE|STATUS|ACTIVE)|LDA_?(STATE|ACTIVE|ALERT)|LDW|LANE_?(KEEP|DEPART|ASSIST)|LTA_?STATE"
             r"|LKA_ACTIVE|LKAS_STATUS"),
         _rx(r"CHECKSUM|COUNTER|CMD|MALFUNCTION|UNAVAILABLE|SENSITIVITY|TOGGLE|EXIST")),
)
ROLE_BY_NAME = {r.name: r for r in ROLES}
#: Roles a suggested config gets a signal for (wheel speed is only evidence).
CONFIG_ROLES = tuple(r.name for r in ROLES if r.name != "wheel_speed")

_SPEED_UNITS = {"km/h", "kph", "kmh", "km/hr", "mph", "m/s"}


@dataclass(frozen=True)
class Candidate:
    role: str
    signal: str  # Message.Signal
    score: float
    reasons: tuple[str, ...]
    vss: str | None

    def as_json(self) -> dict[str, Any]:
        return {"signal": self.signal, "score": round(self.score, 2), "reasons": list(self.reasons), "vss": self.vss}


# -- the analysis --------------------------------------------------------------------------------


@dataclass
class Discovery:
    """Statistics of one recording against one DBC; feed it frames, then read it."""

    db: Database
    frames: int = 0
    decoded: int = 0
    error_frames: int = 0
    first: float | None = None
    last: float | None = None
    messages: dict[str, MessageStats] = field(default_factory=dict)
    signals: dict[str, SignalStats] = field(default_factory=dict)
    unknown: dict[tuple[int, bool], UnknownId] = field(default_factory=dict)
    _by_id: dict[tuple[int, bool], Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_id = {(m.frame_id, m.is_extended_frame): m for m in self.db.messages}

    def feed(self, t: float, frame_id: int, extended: bool, data: bytes, error_frame: bool = False) -> None:
        self.frames += 1
        self.first = t if self.first is None else self.first
        self.last = t
        if error_frame:
            self.error_frames += 1
            return
        message = self._by_id.get((frame_id, extended))
        if message is None:
            u = self.unknown.setdefault((frame_id, extended), UnknownId(frame_id, extended))
            u.frames += 1
            u.first = min(u.first, t)
            u.last = max(u.last, t)
            return
        stats = self.messages.get(message.name)
        if stats is None:
            stats = self.messages[message.name] = MessageStats(message.name, frame_id, extended)
        stats.frames += 1
        stats.first = min(stats.first, t)
        stats.last = max(stats.last, t)
        stats.dlcs[len(data)] += 1
        try:
            values = cast(Mapping[str, Any], message.decode(data, decode_choices=False))
        except Exception:  # cantools raises several types for bad frames; all are bad input
            stats.decode_errors += 1
            return
        self.decoded += 1
        for name, value in values.items():
            if not isinstance(value, int | float):
                continue
            key = f"{message.name}.{name}"
            s = self.signals.get(key)
            if s is None:
                s = self.signals[key] = _signal_stats(message, name)
            s.add(t, float(value))

    # -- reading ---------------------------------------------------------------------------------

    @property
    def duration_s(self) -> float:
        return (self.last - self.first) if self.first is not None and self.last is not None else 0.0

    def changes_per_s(self, s: SignalStats) -> float:
        return s.changes / self.duration_s if self.duration_s > 0 else 0.0

    def by_activity(self) -> list[SignalStats]:
        """Signals that changed, most changes first; then the constant ones."""
        return sorted(self.signals.values(), key=lambda s: (-s.changes, -s.count, s.ref))

    def period_ms(self, ref: str) -> float | None:
        return self.messages[ref.split(".", 1)[0]].period_ms

    def roles(self) -> dict[str, list[Candidate]]:
        """Candidates per role, best first (a role without candidates is absent)."""
        out: dict[str, list[Candidate]] = {}
        wheels = self._score_all(ROLE_BY_NAME["wheel_speed"], [])
        wheel_refs = [c.signal for c in wheels if c.score >= 2]
        for role in ROLES:
            found = wheels if role.name == "wheel_speed" else self._score_all(role, wheel_refs)
            found = [c for c in found if c.score >= 2]
            if found:
                out[role.name] = found
        return out

    def best(self) -> dict[str, Candidate]:
        return {name: found[0] for name, found in self.roles().items()}

    def _score_all(self, role: Role, wheel_refs: list[str]) -> list[Candidate]:
        found = []
        for s in self.signals.values():
            c = self._score(role, s, wheel_refs)
            if c is not None:
                found.append(c)
        # Ties: the signal sent most often (a sensor's own message before a copy in a status frame).
        return sorted(found, key=lambda c: (-c.score, -self.signals[c.signal].count, c.signal))

    def _score(self, role: Role, s: SignalStats, wheel_refs: list[str]) -> Candidate | None:
        if not role.include.search(s.ref) or (role.exclude is not None and role.exclude.search(s.name)):
            return None
        reasons = [f"name matches {role.title}"]
        score = 2.0
        unit = s.unit.lower()
        few = s.distinct_count <= 16
        if s.changes == 0:
            score -= 1.0
            reasons.append("never changed in this recording")
        if role.name in ("speed", "wheel_speed"):
            if unit in _SPEED_UNITS:
                score += 2.0
                reasons.append(f"unit {s.unit}")
            if s.maximum > 3 and s.minimum > -5 and s.maximum < 400 and s.distinct_count > 16:
                score += 1.0
                reasons.append(f"range {s.minimum:g}..{s.maximum:g} with many values")
            else:
                score -= 1.5
            if role.name == "speed":
                agreement = self._agreement(s, wheel_refs)
                if agreement is not None:
                    score += 3.0 * agreement
                    reasons.append(f"agrees with the wheel speeds ({agreement:.0%} of samples within 10 %)")
        elif role.name == "gear":
            if s.choices:
                score += 2.0
                reasons.append(f"DBC choices {', '.join(s.choices.values())}")
                labels = {v.strip().upper() for v in s.choices.values()}
                if labels & {"P", "R", "N", "D", "PARK", "REVERSE", "DRIVE"}:
                    score += 1.0
            if few:
                score += 1.0
                reasons.append(f"{s.distinct_count} distinct values")
            else:
                score -= 2.0
        elif role.name in ("ignition", "brake", "turn_signal", "cruise", "lane_keeping"):
            if few:
                score += 1.0
                reasons.append(f"{s.distinct_count} distinct values")
            if s.choices:
                score += 0.5
                reasons.append("DBC choices")
            if role.name == "brake" and s.name.upper().endswith("PRESSED"):
                score += 1.0
            if role.name == "cruise" and "ACTIVE" in s.name.upper():
                score += 1.0
        elif role.name == "accel_pedal":
            if s.distinct_count > 2:
                score += 1.0
                reasons.append(f"{s.distinct_count} distinct values (a position)")
            if "%" in unit:
                score += 0.5
        elif role.name == "steering_angle":
            if unit in ("deg", "°", "degree", "degrees"):
                score += 1.0
                reasons.append(f"unit {s.unit}")
            if s.distinct_count > 16:
                score += 1.0
                reasons.append("many values")
        return Candidate(role.name, s.ref, score, tuple(reasons), role.vss)

    def _agreement(self, s: SignalStats, wheel_refs: list[str]) -> float | None:
        """Share of this signal's kept samples within 10 % (or 2 units) of the mean wheel speed."""
        wheels = [self.signals[r] for r in wheel_refs if r != s.ref and self.signals[r].changes > 0]
        if not wheels or not s.series_t:
            return None
        good = total = 0
        for t, v in zip(s.series_t, s.series_v, strict=True):
            ws = [w.value_at(t) for w in wheels]
            known = [w for w in ws if w is not None]
            if not known:
                continue
            mean = sum(known) / len(known)
            total += 1
            good += abs(v - mean) <= max(2.0, 0.1 * abs(mean))
        return good / total if total else None

    def as_json(self) -> dict[str, Any]:
        roles = self.roles()
        return {
            "frames": self.frames,
            "decoded": self.decoded,
            "error_frames": self.error_frames,
            "unknown_frames": sum(u.frames for u in self.unknown.values()),
            "decode_errors": sum(m.decode_errors for m in self.messages.values()),
            "duration_s": round(self.duration_s, 3),
            "messages": [
                {"name": m.name, "id": m.frame_id, "extended": m.extended, "frames": m.frames,
                 "rate_hz": round(m.rate_hz, 2), "dlc": sorted(m.dlcs), "decode_errors": m.decode_errors}
                for m in sorted(self.messages.values(), key=lambda m: m.frame_id)
            ],
            "signals": [
                {"signal": s.ref, "count": s.count, "min": s.minimum, "max": s.maximum,
                 "distinct": s.distinct_count if s.distinct_count <= DISTINCT_CAP else f">{DISTINCT_CAP}",
                 "changes": s.changes, "changes_per_s": round(self.changes_per_s(s), 3), "unit": s.unit,
                 "choices": {str(k): v for k, v in s.choices.items()}}
                for s in self.by_activity()
            ],
            "unknown_ids": [
                {"id": u.frame_id, "extended": u.extended, "frames": u.frames, "rate_hz": round(u.rate_hz, 2)}
                for u in sorted(self.unknown.values(), key=lambda u: u.frame_id)
            ],
            "roles": {name: [c.as_json() for c in found] for name, found in roles.items()},
        }


def _signal_stats(message: Message, name: str) -> SignalStats:
    sig = message.get_signal_by_name(name)
    choices = {int(k): str(v) for k, v in (sig.choices or {}).items()}
    lo = float(sig.minimum) if sig.minimum is not None else None
    hi = float(sig.maximum) if sig.maximum is not None else None
    return SignalStats(message.name, name, sig.unit or "", choices, lo, hi)


# -- I/O -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedDbc:
    db: Database
    strict: bool
    #: Why strict loading failed (None when it did not): what non-strict mode let through.
    strict_error: str | None


def load_dbc(path: str | Path) -> LoadedDbc:
    """Strict first; if only non-strict loads, say why (the overlap/length check that failed)."""
    try:
        db = cantools.database.load_file(str(path), strict=True)
        if isinstance(db, Database):
            return LoadedDbc(db, True, None)
    except OSError as exc:
        raise DiscoverError(f"{path}: cannot read the DBC: {exc.strerror}") from None
    except Exception as exc:  # cantools' parser and checks raise many types
        strict_error = str(exc)
    else:
        raise DiscoverError(f"{path}: not a CAN database")
    try:
        db = cantools.database.load_file(str(path), strict=False)
    except Exception as exc:
        raise DiscoverError(f"{path}: the DBC does not load, not even non-strict: {exc}") from None
    if not isinstance(db, Database):
        raise DiscoverError(f"{path}: not a CAN database")
    return LoadedDbc(db, False, strict_error)


def read_log(path: str | Path) -> Iterator[can.Message]:
    """Frames of a recording; a clear error (naming the formats python-can reads) if it cannot."""
    p = Path(path)
    if not p.is_file():
        raise DiscoverError(f"{p}: no such file")
    try:
        reader = can.LogReader(str(p))
    except ValueError as exc:  # python-can: "No read support for unknown log format"
        raise DiscoverError(f"{p}: {exc}; python-can reads {', '.join(_formats())}") from None
    except Exception as exc:
        raise DiscoverError(f"{p}: cannot read: {exc}") from None
    try:
        yield from reader
    except Exception as exc:  # a malformed line deep in a text log
        raise DiscoverError(f"{p}: not a readable {p.suffix or 'log'} recording: {exc}") from None


def _formats() -> list[str]:
    """File suffixes python-can's LogReader reads (its own table, plugins included)."""
    from can.io import player

    readers = getattr(player, "MESSAGE_READERS", None)
    if isinstance(readers, Mapping) and readers:
        return sorted(str(k) for k in readers)
    return [".asc", ".blf", ".csv", ".db", ".log", ".mf4", ".trc"]


def analyse(frames: Iterable[can.Message], db: Database) -> Discovery:
    out = Discovery(db)
    for msg in frames:
        out.feed(float(msg.timestamp), msg.arbitration_id, bool(msg.is_extended_id), bytes(msg.data),
                 bool(msg.is_error_frame))
    return out


@dataclass(frozen=True)
class DiscoverResult:
    log: str
    dbc: str
    loaded: LoadedDbc
    discovery: Discovery

    def as_json(self) -> dict[str, Any]:
        return {"log": self.log, "dbc": self.dbc, "dbc_strict": self.loaded.strict,
                "dbc_strict_error": self.loaded.strict_error} | self.discovery.as_json()


def discover(log: str | Path, dbc: str | Path) -> DiscoverResult:
    loaded = load_dbc(dbc)
    result = analyse(read_log(log), loaded.db)
    if result.frames == 0:
        raise DiscoverError(f"{log}: the recording has no frames")
    if result.decoded == 0:
        ids = sorted(result.unknown, key=lambda k: -result.unknown[k].frames)[:5]
        seen = ", ".join(f"0x{i:X}" for i, _ in ids)
        raise DiscoverError(
            f"{log}: none of its {result.frames} frames is a message of {dbc} "
            f"(the recording's most frequent IDs: {seen}; the DBC has {len(loaded.db.messages)} messages): "
            "is it the DBC of this bus?")
    return DiscoverResult(str(log), str(dbc), loaded, result)


# -- a starting config ---------------------------------------------------------------------------


def max_age_ms(period_ms: float | None) -> int:
    """Four periods, rounded up to 10 ms, at least 50 ms (500 ms when the period is unknown)."""
    if period_ms is None:
        return 500
    return max(50, int(math.ceil(4 * period_ms / 10.0) * 10))


def _demand_lines(role: str, name: str, s: SignalStats) -> list[str]:
    """A commented demand for a role, from its choices where the DBC has them."""
    by_label = {v.strip().upper(): k for k, v in s.choices.items()}

    def demand(dname: str, when: str, klass: str, deadline: int, why: str, confirm: int = 100) -> list[str]:
        lines = [f"# {why}", "# [[demands]]", f'# name = "{dname}"', f'# when = "{when}"', f'# class = "{klass}"']
        if klass == "normal":
            lines.append(f"# confirm_ms = {confirm}")
        lines += [f"# deadline_ms = {deadline}   # fill in: how soon the accelerator must be active", ""]
        return lines

    if role == "gear":
        rev = next((by_label[k] for k in ("R", "REVERSE") if k in by_label), None)
        if rev is not None:
            return demand("reversing", f"{name} == {rev}", "normal", 1500,
                          f"reverse gear ({s.ref} = {rev} means {s.choices[rev]!r}): parking perception")
        return demand("reversing", f"{name} == 0", "normal", 1500,
                      f"reverse gear: fill in the value of R in {s.ref} (values seen: {_seen(s)})")
    if role in ("cruise", "lane_keeping", "turn_signal"):
        what = {"cruise": ("cruise_active", "normal", 1000, "cruise control / ACC engaged"),
                "lane_keeping": ("lane_keeping", "normal", 1000, "lane keeping / ADAS active"),
                "turn_signal": ("turning", "anticipatory", 1000, "a turn signal: a lane change or a turn is coming")}
        dname, klass, deadline, why = what[role]
        return demand(dname, _on_expression(name, s), klass, deadline, f"{why} ({s.ref}, values seen: {_seen(s)})")
    if role == "speed":
        return demand("cruising", f"{name} > 65", "anticipatory", 800,
                      "fast and steady: warm the accelerator for a highway function") + demand(
                          "standing", f"{name} < 1", "anticipatory", 400,
                          "standing still: a pull-away needs urban perception soon")
    return []


_ON_LABELS = ("active", "enabled", "engaged", "on", "left", "right")
_OFF_LABELS = ("none", "off", "disabled", "inactive", "standby", "not active")


def _on_expression(name: str, s: SignalStats) -> str:
    """`name == <active>` / `name != <off>` from the DBC's choices, else `name != 0`."""
    labels = {k: v.strip().lower() for k, v in s.choices.items()}
    on = [k for k, v in labels.items() if v in _ON_LABELS]
    if len(on) == 1:
        return f"{name} == {on[0]}"
    off = [k for k, v in labels.items() if v in _OFF_LABELS]
    if len(off) == 1:
        return f"{name} != {off[0]}"
    return f"{name} != 0"


def _seen(s: SignalStats) -> str:
    values = sorted(s.distinct)[:8]
    text = ", ".join(f"{v:g}" + (f" {s.choices[int(v)]!r}" if v.is_integer() and int(v) in s.choices else "")
                     for v in values)
    return text + (", ..." if s.distinct_count > 8 else "")


def suggest_config(result: DiscoverResult, dbc_path: str, *, bus: str = "vehicle", interface: str = "socketcan",
                   channel: str = "can0") -> str:
    """A starting config (TOML text) for the roles found: the bus, the signals, commented demands."""
    d = result.discovery
    best = d.best()
    lines = [
        f"# cerebellumd config suggested by `cerebellumd discover {Path(result.log).name} --dbc {dbc_path}`.",
        "# Signals: the best candidate of each role found (see the discover table); max_age_ms is four",
        "# periods of the message as measured in the recording. Demands: commented; fill in the deadlines,",
        "# uncomment, then `cerebellumd check` and `cerebellumd replay --config`.",
        "",
        "[accelerator]",
        'profile = "orin_nano"',
        'driver = "simulated"',
        "",
        "[[can]]",
        f'name = "{bus}"',
        f'interface = "{interface}"',
        f'channel = "{channel}"',
        f'dbc = "{dbc_path}"',
    ]
    if not result.loaded.strict:
        lines.append("dbc_strict = false   # the DBC loads only non-strict (see `cerebellumd discover`)")
    lines.append("")
    demands: list[str] = []
    for role in CONFIG_ROLES:
        c = best.get(role)
        if c is None:
            continue
        s = d.signals[c.signal]
        period = d.period_ms(c.signal)
        lines.append(f"[signals.{role}]")
        lines.append(f'can = "{c.signal}"')
        lines.append(f"max_age_ms = {max_age_ms(period)}")
        rate = f"{1000 / period:.1f} Hz" if period else "once"
        desc = f"{ROLE_BY_NAME[role].title}; VSS {c.vss}; sent at {rate}; {s.minimum:g}..{s.maximum:g} {s.unit}".strip()
        lines.append(f'description = "{desc}"')
        lines.append("")
        demands += _demand_lines(role, role, s)
    if demands:
        lines += ["# -- demands (uncomment and fill in) -----------------------------------------------", ""]
        lines += demands
    return "\n".join(lines).rstrip() + "\n"


# -- tables --------------------------------------------------------------------------------------


def render(result: DiscoverResult, top: int = 25) -> list[Any]:
    """rich renderables: summary, roles, the most active signals, messages, unknown IDs."""
    from rich.table import Table
    from rich.text import Text

    d = result.discovery
    out: list[Any] = []
    errors = sum(m.decode_errors for m in d.messages.values())
    unknown = sum(u.frames for u in d.unknown.values())
    out.append(Text(f"{result.log}: {d.frames} frames in {d.duration_s:.1f} s; {d.decoded} decoded, "
                    f"{errors} decode errors, {unknown} of unknown IDs, {d.error_frames} error frames"))
    if not result.loaded.strict:
        out.append(Text(f"{result.dbc}: loads only non-strict (cantools then skips its overlap checks; every "
                        f"message is kept, but overlapping signals may decode wrongly): {result.loaded.strict_error}",
                        style="yellow"))
    roles = Table(title="Role candidates (best first)")
    for col in ("role", "signal", "VSS", "score", "why"):
        roles.add_column(col)
    for name, found in d.roles().items():
        for i, c in enumerate(found[:3]):
            roles.add_row(name if i == 0 else "", c.signal, c.vss or "", f"{c.score:.1f}", "; ".join(c.reasons),
                          style=None if i == 0 else "dim")
    out.append(roles)
    sig = Table(title=f"Most active signals (top {top} of {len(d.signals)})")
    for col in ("signal", "Hz", "min", "max", "distinct", "changes/s", "unit", "choices"):
        sig.add_column(col, justify="right" if col in ("Hz", "min", "max", "distinct", "changes/s") else "left")
    for s in d.by_activity()[:top]:
        m = d.messages[s.message]
        distinct = str(s.distinct_count) if s.distinct_count <= DISTINCT_CAP else f">{DISTINCT_CAP}"
        choices = ", ".join(f"{k}={v}" for k, v in list(s.choices.items())[:4])
        choices += ", ..." if len(s.choices) > 4 else ""
        sig.add_row(s.ref, f"{m.rate_hz:.1f}", f"{s.minimum:g}", f"{s.maximum:g}", distinct,
                    f"{d.changes_per_s(s):.2f}", s.unit, choices)
    out.append(sig)
    msgs = Table(title=f"Messages ({len(d.messages)} of the DBC's {len(d.db.messages)} seen)")
    for col in ("message", "id", "frames", "Hz", "DLC", "decode errors"):
        msgs.add_column(col, justify="left" if col == "message" else "right")
    for m in sorted(d.messages.values(), key=lambda m: -m.rate_hz):
        msgs.add_row(m.name, f"0x{m.frame_id:X}", str(m.frames), f"{m.rate_hz:.1f}",
                     ",".join(str(k) for k in sorted(m.dlcs)), str(m.decode_errors))
    out.append(msgs)
    if d.unknown:
        unk = Table(title=f"IDs not in the DBC ({len(d.unknown)})")
        for col in ("id", "frames", "Hz"):
            unk.add_column(col, justify="right")
        for u in sorted(d.unknown.values(), key=lambda u: -u.frames)[:top]:
            unk.add_row(f"0x{u.frame_id:X}" + (" (ext)" if u.extended else ""), str(u.frames), f"{u.rate_hz:.1f}")
        out.append(unk)
    return out
