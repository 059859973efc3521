"""Drive cycles: shipped files load, bad files fail with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cerebellumd.sim.cycles import CycleError, load_cycle, parse_cycle, shipped_cycles


def test_shipped_cycles_are_the_documented_set() -> None:
    assert shipped_cycles() == ["hwfet", "nedc", "udds", "us06", "wltc_class3b"]


@pytest.mark.parametrize(
    ("name", "duration", "max_kmh"),
    [
        ("udds", 1369, 91.25),
        ("hwfet", 765, 96.4),
        ("us06", 600, 129.23),
        ("nedc", 1180, 120.0),
        ("wltc_class3b", 1800, 131.3),
    ],
)
def test_shipped_cycle_matches_provenance_table(name: str, duration: float, max_kmh: float) -> None:
    cycle = load_cycle(name)
    assert cycle.name == name
    assert cycle.duration_s == duration
    assert max(cycle.speeds) == pytest.approx(max_kmh, abs=0.01)


def test_speed_at_interpolates_linearly_and_clamps() -> None:
    cycle = parse_cycle("time_s,speed_kmh\n0,0\n2,10\n3,4\n", "t")
    assert cycle.speed_at(1.0) == pytest.approx(5.0)
    assert cycle.speed_at(2.5) == pytest.approx(7.0)
    assert cycle.speed_at(-1) == 0.0
    assert cycle.speed_at(99) == 4.0


def test_load_by_path(tmp_path: Path) -> None:
    f = tmp_path / "mine.csv"
    f.write_text("time_s,speed_kmh\n0,0\n1,3.5\n", encoding="utf-8")
    cycle = load_cycle(f)
    assert cycle.name == "mine"
    assert cycle.speeds == (0.0, 3.5)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("time,speed\n0,0\n1,1\n", 1, "header"),
        ("time_s,speed_kmh\n0,0\n1,abc\n", 3, "not numeric"),
        ("time_s,speed_kmh\n0,0\n1,1\n1,2\n", 4, "does not increase"),
        ("time_s,speed_kmh\n0,0\n1,-2\n", 3, "negative"),
        ("time_s,speed_kmh\n0,0,1\n", 2, "columns"),
        ("time_s,speed_kmh\n0,0\n", None, "at least 2"),
        ("", 1, "header"),
    ],
)
def test_bad_cycle_names_file_and_line(tmp_path: Path, text: str, line: int | None, words: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(CycleError) as info:
        load_cycle(f)
    assert info.value.line == line
    assert info.value.file == str(f)
    assert words in str(info.value)
    assert str(f) in str(info.value)


def test_unknown_name_is_an_error() -> None:
    with pytest.raises(CycleError, match="not a shipped cycle"):
        load_cycle("no_such_cycle")
