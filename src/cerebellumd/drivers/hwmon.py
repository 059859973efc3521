"""Power from Linux hwmon (INA219 / INA226 / INA3221 current monitors).

INA219 and INA226 export `power1_input` in microwatts. INA3221 has no power file: the power of
channel N is V x I from `in{N}_input` (bus voltage, mV) and `curr{N}_input` (mA). The device
is found under `root` (default /sys/class/hwmon) by its `name` file and/or by a channel label
(`in{N}_label`, e.g. "VDD_NPU"); the match is cached and searched again after a read fails
(hwmon numbering can change when a driver is reloaded).

Reads run in a worker thread. A missing device, a missing file or garbage in a file gives
None, counts the kind (`counters`) and logs once per failure streak, never raises.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import PowerReading, options_of

_LOG = logging.getLogger(__name__)

SUPPORTED_CHIPS = ("ina219", "ina226", "ina3221")
ERROR_KINDS = ("no_device", "missing_file", "garbage")


class HwmonOptions(BaseModel):
    """Where to find the power monitor and which channel to read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Field(Path("/sys/class/hwmon"), description="hwmon class directory.")
    name: str | None = Field(
        None, description="Chip name as in the `name` file: ina219, ina226 or ina3221.")
    label: str | None = Field(
        None, description="Channel label (`in{N}_label`), e.g. VDD_NPU; selects the channel.")
    channel: int = Field(
        1, ge=1, le=8, description="Channel number when no label is given (INA3221: 1-3).")

    @model_validator(mode="after")
    def _needs_a_selector(self) -> HwmonOptions:
        if self.name is None and self.label is None:
            raise ValueError("give the chip `name`, a channel `label`, or both")
        if self.name is not None and self.name not in SUPPORTED_CHIPS:
            raise ValueError(f"unsupported chip {self.name!r}; known: {', '.join(SUPPORTED_CHIPS)}")
        return self


@dataclass(frozen=True, slots=True)
class _Channel:
    device: Path
    chip: str
    number: int


class _ReadFailure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


_LABEL_FILE = re.compile(r"^(in|curr|power)(\d+)_label$")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise _ReadFailure("missing_file", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        # EIO/ENODATA from a chip that does not answer on I2C counts as garbage, not absence.
        raise _ReadFailure("garbage", f"{path}: {exc}") from None


def _read_int(path: Path) -> int:
    text = _read_text(path)
    try:
        return int(text)
    except ValueError:
        raise _ReadFailure("garbage", f"{path} holds {text[:40]!r}, not an integer") from None


class HwmonSensor:
    """PowerSensor reading one hwmon power monitor channel."""

    kind: ClassVar[str] = "hwmon"

    def __init__(self, options: HwmonOptions | Mapping[str, Any]) -> None:
        self.options = options_of(HwmonOptions, options)
        self.counters: dict[str, int] = dict.fromkeys(("reads", *ERROR_KINDS), 0)
        self._channel: _Channel | None = None
        self._failing = False

    @property
    def device(self) -> Path | None:
        """The hwmon directory in use (None before the first successful discovery)."""
        return self._channel.device if self._channel else None

    async def async_read(self) -> PowerReading | None:
        try:
            watts = await asyncio.to_thread(self._read_watts)
        except _ReadFailure as exc:
            self.counters[exc.kind] += 1
            self._channel = None  # search again next time
            if not self._failing:
                _LOG.warning("hwmon power read failed (%s): %s", exc.kind, exc)
            self._failing = True
            return None
        if self._failing:
            _LOG.info("hwmon power readable again")
        self._failing = False
        self.counters["reads"] += 1
        return PowerReading(watts=watts, measured=True)

    def probe(self) -> tuple[Path, float]:
        """One blocking read, for `cerebellumd check --here` (no loop): the device found and its
        watts. ValueError saying what is missing or unreadable."""
        try:
            watts = self._read_watts()
        except _ReadFailure as exc:
            raise ValueError(str(exc)) from None
        assert self._channel is not None
        return self._channel.device, watts

    # -- in the worker thread ------------------------------------------------------------------

    def _read_watts(self) -> float:
        channel = self._channel
        if channel is None or not channel.device.is_dir():
            channel = self._discover()
        self._channel = channel
        base = channel.device
        n = channel.number
        if channel.chip != "ina3221" and (base / f"power{n}_input").exists():
            return _read_int(base / f"power{n}_input") / 1e6
        millivolts = _read_int(base / f"in{n}_input")
        milliamps = _read_int(base / f"curr{n}_input")
        return millivolts * milliamps / 1e6

    def _discover(self) -> _Channel:
        opts = self.options
        try:
            devices = sorted(p for p in opts.root.iterdir() if p.is_dir())
        except OSError as exc:
            raise _ReadFailure("no_device", f"cannot list {opts.root}: {exc}") from None
        for device in devices:
            try:
                chip = (device / "name").read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if opts.name is not None and chip != opts.name:
                continue
            if opts.name is None and chip not in SUPPORTED_CHIPS:
                continue
            if opts.label is None:
                return _Channel(device, chip, opts.channel)
            number = self._find_label(device, opts.label)
            if number is not None:
                return _Channel(device, chip, number)
        wanted = ", ".join(
            f"{k}={v!r}" for k, v in (("name", opts.name), ("label", opts.label)) if v is not None
        )
        raise _ReadFailure("no_device", f"no hwmon device under {opts.root} with {wanted}")

    @staticmethod
    def _find_label(device: Path, label: str) -> int | None:
        for path in sorted(device.iterdir()):
            m = _LABEL_FILE.match(path.name)
            if not m:
                continue
            try:
                if path.read_text(encoding="ascii").strip() == label:
                    return int(m.group(2))
            except (OSError, UnicodeDecodeError):
                continue
        return None
