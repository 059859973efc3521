"""Rail maps never double-count: maps that naive summing would get wrong, remainder clamping
and the sensor-error flag, and trapezoid energy on a monotonic clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from cerebellumd.config.rails import RailMapConfig
from cerebellumd.policies.rails import (
    BUILTIN_RAIL_MAPS,
    RailGroup,
    RailMap,
    domain_power,
    integrate_trapezoid,
)

ORIN = BUILTIN_RAIL_MAPS["jetson_orin_nano"]


@pytest.mark.parametrize(
    ("rail_map", "readings", "expect", "overdrawn"),
    [
        # Jetson: VDD_IN 7 W includes CPU/GPU/CV 3 W and SOC 1.5 W. Naive sum: 11.5 W.
        (ORIN, {"VDD_IN": 7.0, "VDD_CPU_GPU_CV": 3.0, "VDD_SOC": 1.5},
         {"accelerator": 3.0, "soc": 1.5, "module_other": 2.5}, ()),
        # Gateway board input contains the M.2 slot; the MCU rail is beside it. Naive: 14 W.
        (BUILTIN_RAIL_MAPS["gateway_m2"], {"board_in": 8.0, "m2_slot": 5.0, "mcu_5v": 1.0},
         {"gateway": 3.0, "accelerator": 5.0, "mcu": 1.0}, ()),
        # Parts exceed the total beyond tolerance: other clamps to 0, the group is flagged.
        (ORIN, {"VDD_IN": 4.0, "VDD_CPU_GPU_CV": 3.0, "VDD_SOC": 1.5},
         {"accelerator": 3.0, "soc": 1.5, "module_other": 0.0}, ("VDD_IN",)),
        # Within tolerance (sampling skew): clamped, not flagged.
        (ORIN, {"VDD_IN": 4.47, "VDD_CPU_GPU_CV": 3.0, "VDD_SOC": 1.5},
         {"accelerator": 3.0, "soc": 1.5, "module_other": 0.0}, ()),
        # Two parts mapped to one domain add up; two groups stay separate.
        (RailMap("two", groups=(
            RailGroup("in_a", "rest_a", {"a1": "accelerator", "a2": "accelerator"}),
            RailGroup("in_b", "rest_b", {"b1": "soc"}))),
         {"in_a": 10.0, "a1": 2.0, "a2": 3.0, "in_b": 4.0, "b1": 1.0},
         {"accelerator": 5.0, "rest_a": 5.0, "soc": 1.0, "rest_b": 3.0}, ()),
    ],
    ids=["jetson", "gateway-m2", "parts-exceed-total", "within-tolerance", "two-groups"],
)
def test_domain_power(
    rail_map: RailMap, readings: dict[str, float], expect: dict[str, float],
    overdrawn: tuple[str, ...],
) -> None:
    result = domain_power(readings, rail_map)
    assert result.watts == pytest.approx(expect)
    assert result.overdrawn == overdrawn
    naive = sum(readings.values())
    if not overdrawn:
        # Everything measured is counted once: the domains add up to the totals plus the
        # independent rails, strictly less than the naive sum of every rail.
        assert result.total_w < naive
        assert result.trustworthy


def test_missing_total_keeps_parts_and_flags() -> None:
    result = domain_power({"VDD_CPU_GPU_CV": 3.0, "VDD_SOC": math.nan}, ORIN)
    assert result.watts == {"accelerator": 3.0}
    assert set(result.missing) == {"VDD_SOC", "VDD_IN"} and not result.trustworthy


def test_unmapped_rails_are_reported_not_counted() -> None:
    result = domain_power({"VDD_IN": 5.0, "VDD_CPU_GPU_CV": 2.0, "VDD_SOC": 1.0, "FAN": 0.5}, ORIN)
    assert result.unmapped == ("FAN",)
    assert result.total_w == pytest.approx(5.0)


def test_a_rail_may_appear_only_once() -> None:
    with pytest.raises(ValueError, match="more than once"):
        RailMap("bad", groups=(RailGroup("VDD_IN", "other", {"VDD_SOC": "soc"}),),
                independent={"VDD_SOC": "soc"})
    with pytest.raises(ValidationError):
        RailMapConfig(groups=[{"total": "A", "other_domain": "o", "parts": {"A": "x"}}])


@given(
    total=st.floats(0, 100), parts=st.lists(st.floats(0, 50), max_size=4),
    independent=st.lists(st.floats(0, 50), max_size=3),
)
def test_sum_of_domains_is_total_plus_independent_unless_overdrawn(
    total: float, parts: list[float], independent: list[float]
) -> None:
    rail_map = RailMap(
        "p",
        groups=(RailGroup("T", "other", {f"p{i}": f"d{i}" for i in range(len(parts))}),),
        independent={f"i{i}": "ind" for i in range(len(independent))},
    )
    readings = {"T": total, **{f"p{i}": w for i, w in enumerate(parts)},
                **{f"i{i}": w for i, w in enumerate(independent)}}
    result = domain_power(readings, rail_map)
    assert all(w >= 0 for w in result.watts.values())
    if sum(parts) <= total:
        assert result.total_w == pytest.approx(total + sum(independent), abs=1e-9)
    else:
        assert result.watts["other"] == 0.0
        assert result.total_w == pytest.approx(sum(parts) + sum(independent), abs=1e-9)


def test_config_uses_shipped_map_or_explicit_groups() -> None:
    assert RailMapConfig(board="jetson_orin_nano").rail_map().groups == ORIN.groups
    cfg = RailMapConfig(board="bench", groups=[{"total": "in", "other_domain": "gateway",
                                                "parts": {"npu": "accelerator"}}],
                        independent={"mcu": "mcu"})
    assert domain_power({"in": 6, "npu": 2, "mcu": 1}, cfg.rail_map()).watts == {
        "accelerator": 2, "gateway": 4, "mcu": 1}
    with pytest.raises(ValidationError):
        RailMapConfig(board="unknown_board")
    with pytest.raises(ValidationError):
        RailMapConfig.model_validate({"board": "jetson_orin_nano", "sum_all": True})


@pytest.mark.parametrize(
    ("prev_t", "prev_w", "t", "w", "joules"),
    [
        (0.0, 10.0, 1.0, 10.0, 10.0),
        (0.0, 0.0, 2.0, 10.0, 10.0),  # ramp: the mean, not the last value
        (5.0, 4.0, 5.0, 8.0, 0.0),  # no time passed
        (5.0, 4.0, 4.0, 8.0, 0.0),  # clock went backwards (a wall clock would)
        (0.0, math.nan, 1.0, 3.0, 0.0),
        (0.0, 2.0, math.inf, 3.0, 0.0),
        (0.0, -0.2, 1.0, 0.2, 0.1),  # negative offset noise counts as zero
    ],
)
def test_integrate_trapezoid(prev_t: float, prev_w: float, t: float, w: float, joules: float) -> None:
    assert integrate_trapezoid(prev_t, prev_w, t, w) == pytest.approx(joules)


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 50)), min_size=2, max_size=50))
def test_energy_is_additive_over_a_series(series: list[tuple[float, float]]) -> None:
    t, total = 0.0, 0.0
    times, watts = [], []
    for dt, w in series:
        t += dt
        times.append(t)
        watts.append(w)
    for i in range(1, len(times)):
        total += integrate_trapezoid(times[i - 1], watts[i - 1], times[i], watts[i])
    assert 0.0 <= total <= max(watts) * (times[-1] - times[0]) + 1e-6
