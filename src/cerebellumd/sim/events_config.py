"""The event model as a file: `cerebellumd evaluate --events FILE.toml`.

An event file is flat TOML whose keys are the fields of `EventModel` (today's names are the
contract: `surprise_rate_per_h`, `surprise_deadline_ms`, `precursor_lead_s`, ...), plus an
optional `name` (default: the file's stem) and `description`. Keys left out keep their
defaults, which are the `default` world. Unknown keys and bad values are errors naming the
file and line (`ConfigError`, as `cerebellumd check` prints them). `cerebellumd schema --events`
prints the JSON Schema.

The shipped worlds are such files in the package (`examples/events/*.toml`); a scenario's
variant name (`udds:surprise_heavy`) is one of their names.

Besides the event model, a file may schedule what the daemon's whole decision path sees
(sim/evaluate.py runs it): `[[holds]]` (operator holds and application leases: `at_s`,
`duration_s`, `mode`, `owner`, `priority`, `reason`), `[[key_off]]` (ignition off from `at_s`
for `duration_s`: the vehicle's ECUs keep sending `bus_tail_s` more, with ignition 0, then the
bus is silent until key-on) and `[signals.NAME]` (values of signals the virtual vehicle cannot
send, e.g. SOME/IP- or MCU-fed ones: a `constant` or a step `series`, delivered every
`period_ms`). Times are seconds from the start of the scenario.
"""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import read_text, validate_toml
from ..policies.types import HoldMode

_RANGES = (
    "urban_duration_s",
    "parking_duration_s",
    "surprise_duration_s",
    "precursor_lead_s",
    "false_precursor_duration_s",
    "accel_temp_c",
)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HoldAt(_Part):
    """An operator hold or an application lease in force from `at_s` for `duration_s`."""

    at_s: float = Field(..., ge=0, description="Start (s from the start of the scenario).")
    duration_s: float = Field(..., gt=0, description="Length; the hold expires then (a lease's max_duration).")
    mode: HoldMode = Field(HoldMode.AWAKE, description="awake (keep the accelerator active) or sleep.")
    owner: str = Field(
        "operator", min_length=1,
        description="Who holds it; `app:NAME` is an application lease (keep-awake reason `lease`), else `hold`.")
    priority: int = Field(0, description="Higher wins among holds (safety-critical leases use a high one).")
    reason: str = Field("", description="The stated reason (reported with keep-awake events).")


class KeyOff(_Part):
    """Ignition off from `at_s` for `duration_s` (then key-on)."""

    at_s: float = Field(..., ge=0, description="Key-off (s from the start of the scenario).")
    duration_s: float = Field(..., gt=0, description="How long the ignition stays off.")
    bus_tail_s: float = Field(
        2.0, ge=0,
        description="The vehicle's ECUs keep sending this long after key-off (ignition 0), then the bus is "
                    "silent until key-on.")


class ProvidedSignal(_Part):
    """Values of a configured signal that the virtual vehicle cannot send (SOME/IP, MCU)."""

    constant: float | None = Field(None, description="The same value throughout.")
    series: tuple[tuple[float, float], ...] | None = Field(
        None, description="[[t_s, value], ...]: each value holds from its time to the next (times increasing).")
    period_ms: int = Field(100, gt=0, description="A sample is delivered this often.")

    @model_validator(mode="after")
    def _one(self) -> ProvidedSignal:
        if (self.constant is None) == (self.series is None):
            raise ValueError("give exactly one of constant or series")
        if self.series is not None:
            times = [t for t, _ in self.series]
            if not times or any(b <= a for a, b in itertools.pairwise(times)):
                raise ValueError("series: times must be increasing")
        return self


class EventModel(BaseModel):
    """Parameters of the event model. Defaults give the `default` scenario."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # highway assist: fast and steady
    highway_min_speed_kmh: float = Field(70.0, gt=0, description="Highway assist needs at least this speed.")
    highway_max_accel_mps2: float = Field(0.6, gt=0, description="Steady: |accel| at most this (3 s mean).")
    highway_steady_s: float = Field(8.0, ge=0, description="Fast and steady this long before assist engages.")
    highway_exit_speed_kmh: float = Field(60.0, gt=0, description="Assist disengages below this speed.")
    highway_exit_accel_mps2: float = Field(1.2, gt=0, description="Assist disengages above this |accel|.")
    highway_min_duration_s: float = Field(5.0, ge=0, description="Shorter engagements are dropped.")
    highway_deadline_ms: int = Field(1000, gt=0, description="Deadline of a highway event.")
    # urban perception: pull-away in stop-and-go
    urban_max_segment_kmh: float = Field(60.0, gt=0, description="Pull-aways into segments slower than this are urban.")
    urban_min_stop_s: float = Field(1.0, ge=0, description="Only after a stop at least this long.")
    urban_duration_s: tuple[float, float] = Field((6.0, 12.0), description="Range of an urban event's length.")
    urban_deadline_ms: int = Field(500, gt=0, description="Deadline of an urban event.")
    # parking maneuvers: reverse gear at low speed during long stops
    parking_min_stop_s: float = Field(12.0, gt=0, description="Stops at least this long may hold a maneuver.")
    parking_stop_probability: float = Field(
        0.25, ge=0, le=1, description="Chance of a maneuver at a long stop (the last long stop always has one)."
    )
    parking_duration_s: tuple[float, float] = Field((8.0, 15.0), description="Range of a maneuver's length.")
    parking_speed_kmh: float = Field(5.0, ge=0, description="Peak reversing speed during a maneuver.")
    parking_deadline_ms: int = Field(1500, gt=0, description="Deadline of a parking event.")
    # surprises: no precursor at all
    surprise_rate_per_h: float = Field(13.0, ge=0, description="Poisson rate per hour of driving (moving).")
    surprise_duration_s: tuple[float, float] = Field((2.0, 6.0), description="Range of a surprise's length.")
    surprise_deadline_ms: int = Field(1500, gt=0, description="Deadline of a surprise event.")
    # precursors: honest but noisy
    precursor_lead_s: tuple[float, float] = Field(
        (3.0, 15.0), description="Range of a precursor's lead time before its event."
    )
    precursor_missing_probability: float = Field(0.1, ge=0, le=1, description="Chance an event has no precursor.")
    false_precursor_rate_per_h: float = Field(6.0, ge=0, description="Precursors with no event, per hour per kind.")
    false_precursor_duration_s: tuple[float, float] = Field(
        (5.0, 20.0), description="Range of a false precursor's length."
    )
    # slow traces
    battery_nominal_v: float = Field(13.8, gt=0, description="Charging-system voltage while driving.")
    accel_temp_c: tuple[float, float] = Field((40.0, 60.0), description="Range of the accelerator temperature walk.")
    # the schedule of the daemon's whole decision path (sim/evaluate.py)
    holds: tuple[HoldAt, ...] = Field((), description="Operator holds and application leases, by time.")
    key_off: tuple[KeyOff, ...] = Field((), description="Ignition-off periods (in time order, not overlapping).")
    signals: dict[str, ProvidedSignal] = Field(
        default_factory=dict, description="Signals the evaluator cannot feed from the virtual vehicle, by name.")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> EventModel:
        for key in _RANGES:
            lo, hi = getattr(self, key)
            if lo > hi or lo < 0:
                raise ValueError(f"{key}: range [{lo}, {hi}] must be non-negative and ordered low, high")
        for a, b in zip(self.key_off, self.key_off[1:], strict=False):
            if b.at_s < a.at_s + a.duration_s:
                raise ValueError(f"key_off: the period at {b.at_s} s starts before the one at {a.at_s} s ends")
        return self

    def key_off_intervals(self) -> list[tuple[float, float, float]]:
        """(key-off, key-on, bus silent from) of each key-off period, s from the scenario start."""
        return [(k.at_s, k.at_s + k.duration_s, min(k.at_s + k.bus_tail_s, k.at_s + k.duration_s))
                for k in self.key_off]


class EventFile(EventModel):
    """An event file: the event model plus its name and a description."""

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Name reported as `scenario` (default: the file's stem)."
    )
    description: str = Field("", description="What this world is (free text).")

    def event_model(self) -> EventModel:
        return EventModel.model_validate(self.model_dump(exclude={"name", "description"}))


def event_schema() -> dict[str, Any]:
    """JSON Schema of an event file (`cerebellumd schema --events`)."""
    return EventFile.model_json_schema()


def parse_event_file(text: str, file: str = "<events>", default_name: str = "events") -> tuple[str, EventModel]:
    """(name, model) of an event file's text; `ConfigError` naming file and line otherwise."""
    parsed = validate_toml(text, file, EventFile)
    return parsed.name or default_name, parsed.event_model()


def load_event_file(path: str | Path) -> tuple[str, EventModel]:
    """(name, model) of the event file at `path`; its name defaults to the file's stem."""
    p = Path(path)
    text = read_text(p)
    return parse_event_file(text, str(p), p.stem)


def _shipped() -> dict[str, EventModel]:
    folder = resources.files("cerebellumd").joinpath("examples", "events")
    out: dict[str, EventModel] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            stem = entry.name.removesuffix(".toml")
            name, model = parse_event_file(entry.read_text(encoding="utf-8"), f"examples/events/{entry.name}", stem)
            out[name] = model
    return out


#: The shipped worlds, by name (the files in examples/events/; `default` has every default).
NAMED_MODELS: dict[str, EventModel] = _shipped()


def shipped_event_files() -> list[str]:
    return list(NAMED_MODELS)


def named_scenario(name: str) -> EventModel:
    try:
        return NAMED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(NAMED_MODELS)}") from None


def resolve_events(spec: str) -> tuple[str, EventModel]:
    """A shipped world's name or an event file's path."""
    if spec in NAMED_MODELS:
        return spec, NAMED_MODELS[spec]
    if spec.endswith(".toml") or Path(spec).exists():
        return load_event_file(spec)
    raise ValueError(f"unknown event model {spec!r}: not a shipped one ({', '.join(NAMED_MODELS)}) nor a .toml file")
