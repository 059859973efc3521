"""Rail maps: which measured power rails add up to what, so no watt is counted twice.

The trap (Jetson and many boards with INA3221 monitors): one rail measures the module's whole
input ("total", e.g. VDD_IN) and others measure parts *inside* it (VDD_CPU_GPU_CV, VDD_SOC).
Summing every rail counts the parts twice. A rail map says, per board, which rail is a group's
total, which rails are its parts, and which rails are independent (measured beside, not
inside, any total). Each group's remainder `total - sum(parts)` goes to its `other` domain,
clamped at 0, with a flag when the parts exceed the total (a sensor or map error).

Pure: readings in, watts per domain out. Energy is integrated by the shell with
`integrate_trapezoid` on monotonic times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Parts may exceed the total by this much (W) before it counts as a sensor error: monitors
#: on different rails are sampled at slightly different moments and have offset errors.
DEFAULT_TOLERANCE_W = 0.05


@dataclass(frozen=True, slots=True)
class RailGroup:
    total: str  # the rail measuring the whole group
    other_domain: str  # gets total - sum(parts)
    parts: Mapping[str, str] = field(default_factory=dict)  # rail -> domain, inside `total`


@dataclass(frozen=True, slots=True)
class RailMap:
    board: str
    groups: tuple[RailGroup, ...] = ()
    independent: Mapping[str, str] = field(default_factory=dict)  # rail -> domain
    tolerance_w: float = DEFAULT_TOLERANCE_W

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rail in self.rails():
            if rail in seen:
                # A rail in two places would be counted twice: the exact error maps prevent.
                raise ValueError(f"{self.board}: rail {rail!r} appears more than once")
            seen.add(rail)

    def rails(self) -> list[str]:
        out: list[str] = []
        for g in self.groups:
            out.append(g.total)
            out.extend(g.parts)
        out.extend(self.independent)
        return out


@dataclass(frozen=True, slots=True)
class DomainPower:
    watts: Mapping[str, float]  # per domain; a domain without any usable reading is absent
    overdrawn: tuple[str, ...] = ()  # groups (by total rail) whose parts exceeded the total
    missing: tuple[str, ...] = ()  # mapped rails with no (finite) reading
    unmapped: tuple[str, ...] = ()  # readings of rails the map does not know (ignored)

    @property
    def total_w(self) -> float:
        return sum(self.watts.values())

    @property
    def trustworthy(self) -> bool:
        return not self.overdrawn and not self.missing


def domain_power(readings: Mapping[str, float], rail_map: RailMap) -> DomainPower:
    """Watts per domain from rail readings (W), counting each watt once."""
    watts: dict[str, float] = {}
    overdrawn: list[str] = []
    missing: list[str] = []

    def usable(rail: str) -> float | None:
        w = readings.get(rail)
        if w is None or not math.isfinite(w):
            missing.append(rail)
            return None
        return max(0.0, w)  # a negative reading is offset noise around zero

    def add(domain: str, w: float) -> None:
        watts[domain] = watts.get(domain, 0.0) + w

    for group in rail_map.groups:
        parts_sum = 0.0
        for rail, domain in group.parts.items():
            w = usable(rail)
            if w is not None:
                add(domain, w)
                parts_sum += w
        total = usable(group.total)
        if total is None:
            continue  # without the total the remainder is unknown; the parts still count
        remainder = total - parts_sum
        if remainder < -rail_map.tolerance_w:
            overdrawn.append(group.total)
        add(group.other_domain, max(0.0, remainder))

    for rail, domain in rail_map.independent.items():
        w = usable(rail)
        if w is not None:
            add(domain, w)

    known = set(rail_map.rails())
    unmapped = tuple(sorted(r for r in readings if r not in known))
    return DomainPower(watts, tuple(overdrawn), tuple(missing), unmapped)


def integrate_trapezoid(prev_t: float, prev_w: float, t: float, w: float) -> float:
    """Joules between two readings on a monotonic clock. A non-advancing clock or a
    non-finite reading adds nothing (never negative or NaN energy in a counter)."""
    dt = t - prev_t
    if not (dt > 0 and math.isfinite(dt) and math.isfinite(prev_w) and math.isfinite(w)):
        return 0.0
    return 0.5 * (max(0.0, prev_w) + max(0.0, w)) * dt


# -- shipped maps (verify against your board's hwmon labels; they differ by carrier/BSP) ------

BUILTIN_RAIL_MAPS: Mapping[str, RailMap] = {
    # Orin Nano / Orin NX dev kits, INA3221 channels: VDD_IN is the module input.
    "jetson_orin_nano": RailMap(
        "jetson_orin_nano",
        groups=(RailGroup("VDD_IN", "module_other",
                          {"VDD_CPU_GPU_CV": "accelerator", "VDD_SOC": "soc"}),),
    ),
    # Xavier NX: same shape, different rail names in older BSPs.
    "jetson_xavier_nx": RailMap(
        "jetson_xavier_nx",
        groups=(RailGroup("VDD_IN", "module_other",
                          {"VDD_CPU_GPU_CV": "accelerator", "VDD_SOC": "soc"}),),
    ),
    # Gateway with a PCIe M.2 accelerator on its own INA226 and the board input on another:
    # the M.2 slot is fed from the board input, so it is a part of it.
    "gateway_m2": RailMap(
        "gateway_m2",
        groups=(RailGroup("board_in", "gateway", {"m2_slot": "accelerator"}),),
        independent={"mcu_5v": "mcu"},
    ),
}
