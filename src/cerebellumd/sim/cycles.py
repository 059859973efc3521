"""Drive cycles: 1 Hz speed traces (`time_s,speed_kmh`), shipped or from a user's file.

A cycle is the only real-world input of a scenario; everything else (events, precursors,
signals) is derived from it deterministically, so a malformed file must fail loudly with the
file and line rather than produce a quietly wrong evaluation.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

HEADER = ("time_s", "speed_kmh")
_PACKAGE_DIR = ("sim", "cycles")


class CycleError(ValueError):
    """A drive cycle that cannot be used; the message names the file and line."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line


@dataclass(frozen=True, slots=True)
class DriveCycle:
    """A speed trace: `times` strictly increasing (s), `speeds` non-negative (km/h)."""

    name: str
    times: tuple[float, ...]
    speeds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.times) != len(self.speeds) or len(self.times) < 2:
            raise ValueError("a drive cycle needs at least 2 (time, speed) pairs of equal length")

    @property
    def duration_s(self) -> float:
        return self.times[-1] - self.times[0]

    def speed_at(self, t: float) -> float:
        """Linear interpolation; clamped to the first/last speed outside the trace."""
        times = self.times
        if t <= times[0]:
            return self.speeds[0]
        if t >= times[-1]:
            return self.speeds[-1]
        i = bisect.bisect_right(times, t) - 1
        t0, t1 = times[i], times[i + 1]
        v0, v1 = self.speeds[i], self.speeds[i + 1]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def shipped_cycles() -> list[str]:
    """Names of the drive cycles shipped in the package (see cycles/PROVENANCE.md)."""
    folder = resources.files("cerebellumd").joinpath(*_PACKAGE_DIR)
    return sorted(p.name.removesuffix(".csv") for p in folder.iterdir() if p.name.endswith(".csv"))


def load_cycle(name_or_path: str | Path) -> DriveCycle:
    """A shipped cycle by name (`udds`) or any CSV file by path."""
    text_name = str(name_or_path)
    if text_name in shipped_cycles():
        resource = resources.files("cerebellumd").joinpath(*_PACKAGE_DIR, f"{text_name}.csv")
        return parse_cycle(resource.read_text(encoding="utf-8"), text_name, f"{text_name}.csv")
    path = Path(name_or_path)
    if not path.is_file():
        raise CycleError(
            text_name,
            None,
            f"not a shipped cycle ({', '.join(shipped_cycles())}) nor a readable file",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CycleError(str(path), None, f"cannot read: {exc}") from None
    return parse_cycle(text, path.stem, str(path))


def parse_cycle(text: str, name: str, file: str = "<cycle>") -> DriveCycle:
    """Validate and parse CSV text; raise CycleError with the file and 1-based line."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    if not rows or tuple(c.strip() for c in rows[0]) != HEADER:
        got = ",".join(rows[0]) if rows else "(empty file)"
        raise CycleError(file, 1, f"header must be exactly {','.join(HEADER)}, got {got!r}")
    times: list[float] = []
    speeds: list[float] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue  # a trailing blank line is harmless
        if len(row) != 2:
            raise CycleError(file, line, f"expected 2 columns, got {len(row)}")
        try:
            t, v = float(row[0]), float(row[1])
        except ValueError:
            raise CycleError(file, line, f"not numeric: {','.join(row)!r}") from None
        if not (math.isfinite(t) and math.isfinite(v)):
            raise CycleError(file, line, "values must be finite")
        if v < 0:
            raise CycleError(file, line, f"negative speed {v}")
        if times and t <= times[-1]:
            raise CycleError(file, line, f"time {t} does not increase (previous {times[-1]})")
        times.append(t)
        speeds.append(v)
    if len(times) < 2:
        raise CycleError(file, None, "a drive cycle needs at least 2 rows")
    return DriveCycle(name=name, times=tuple(times), speeds=tuple(speeds))
