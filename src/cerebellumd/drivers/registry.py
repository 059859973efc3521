"""Drivers registered by name, as python-can registers interfaces: built-ins by module path
(imported only when used), third-party ones through entry points
(`cerebellumd.accelerators`, `cerebellumd.sensors`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any

BUILTIN: dict[str, dict[str, str]] = {
    "accelerator": {
        "simulated": "cerebellumd.drivers.accel_simulated:SimulatedAccelerator",
        "gpio": "cerebellumd.drivers.accel_gpio:GpioAccelerator",
        "pcie_runtime_pm": "cerebellumd.drivers.accel_pcie:PcieRuntimePmAccelerator",
        "command": "cerebellumd.drivers.accel_command:CommandAccelerator",
        "mcu": "cerebellumd.drivers.accel_mcu:McuAccelerator",
        "hailo_pcie": "cerebellumd.drivers.accel_hailo:HailoAccelerator",
        "coral_pcie": "cerebellumd.drivers.accel_coral:CoralAccelerator",
        "jetson": "cerebellumd.drivers.accel_jetson:JetsonAccelerator",
    },
    "sensor": {
        "hwmon": "cerebellumd.drivers.hwmon:HwmonSensor",
        "mcu": "cerebellumd.drivers.accel_mcu:McuPowerSensor",
    },
}
_ENTRY_POINT_GROUPS = {"accelerator": "cerebellumd.accelerators", "sensor": "cerebellumd.sensors"}


def register(kind: str, name: str, target: str) -> None:
    """Register `module:attribute` under `name` (for tests and embedding applications)."""
    BUILTIN.setdefault(kind, {})[name] = target
    _entry_point_names.cache_clear()


@cache
def _entry_point_names(kind: str) -> dict[str, str]:
    group = _ENTRY_POINT_GROUPS.get(kind)
    if group is None:
        return {}
    return {ep.name: ep.value for ep in entry_points(group=group)}


def known_names(kind: str) -> frozenset[str]:
    if kind == "can":
        from can.interfaces import VALID_INTERFACES

        return frozenset(VALID_INTERFACES)
    return frozenset(BUILTIN.get(kind, {})) | frozenset(_entry_point_names(kind))


def load(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered as `name`; KeyError naming the known ones otherwise."""
    target = BUILTIN.get(kind, {}).get(name) or _entry_point_names(kind).get(name)
    if target is None:
        raise KeyError(f"unknown {kind} driver {name!r}; known: {', '.join(sorted(known_names(kind)))}")
    module, _, attr = target.partition(":")
    obj: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return obj
