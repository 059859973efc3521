"""The small interfaces every driver implements. Drivers move bytes and read hardware; they
never decide. Each kind has one module per backend, registered by name (`registry.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from ..accel import AccelState


class DriverError(Exception):
    """A driver command failed; the message says what the hardware or the OS answered."""


@runtime_checkable
class AcceleratorDriver(Protocol):
    """Controls the accelerator. Commands are idempotent; the shell bounds each call with a
    timeout, retries with backoff and trusts only `async_read_state` for the result."""

    kind: ClassVar[str]

    async def async_open(self) -> None: ...

    async def async_set_state(self, target: AccelState) -> None: ...

    async def async_read_state(self) -> AccelState: ...

    async def async_close(self) -> None: ...


#: Recovery actions of the wake watchdog ladder (policies.escalation.Rung values, except
#: retry and give_up, which the shell does with async_set_state).
RECOVERY_ACTIONS: tuple[str, ...] = ("rebind", "pci_rescan", "rail_cycle")


@runtime_checkable
class RecoverableAccelerator(Protocol):
    """Optional: a driver that can take the wake watchdog's heavier rungs. `recovery_actions`
    says which of RECOVERY_ACTIONS this instance can do (as configured); `async_recover`
    performs one (DriverError when it cannot) and returns once the action is done, not
    once the accelerator is active: the watchdog keeps reading the state back."""

    def recovery_actions(self) -> frozenset[str]: ...

    async def async_recover(self, action: str) -> None: ...


@runtime_checkable
class EagerAccelerator(Protocol):
    """Optional: a driver that can issue a command synchronously without blocking (a GPIO
    line already requested, a frame into a non-blocking queue, a model). The actuator calls
    `request_now` for a wake straight from the fast-path decision, skipping the task hop
    before the first `async_set_state`; it raises DriverError like `async_set_state`, and
    the result is still read back, with the usual retries on failure."""

    def request_now(self, target: AccelState) -> None: ...


@dataclass(frozen=True, slots=True)
class PowerReading:
    """Watts for one domain; `measured` False means an estimate (exported as source=model)."""

    watts: float
    measured: bool


@runtime_checkable
class PowerSensor(Protocol):
    kind: ClassVar[str]

    async def async_read(self) -> PowerReading | None: ...


#: Options given to a driver factory: the `options` table of its config section.
DriverOptions = Mapping[str, Any]


_Options = TypeVar("_Options", bound=BaseModel)


def options_of(model: type[_Options], options: _Options | Mapping[str, Any]) -> _Options:
    """A driver's options: as given when already validated (the config did), else validated by
    `model` (a mapping from a test, a tool or `check --here`)."""
    return options if isinstance(options, model) else model.model_validate(options)
