"""Jetson class module (Orin Nano/NX) beside the gateway: SC7 suspend and nvpmodel power modes.

A Jetson is its own computer, reached over Ethernet/serial and a wake pin, not a PCIe endpoint
of the gateway: there is nothing to rebind or rescan (docs/accelerators.md). Every action is an
external program (argv, never a shell), configured per board:

- `sleep`: `suspend` (e.g. `ssh jetson sudo systemctl suspend`) -> SC7 (~1 W); read back
  `status` until it says suspended;
- `active`/`idle`: `wake` (e.g. pulse the wake pin with `gpioset`) when suspended, `power_on`
  when off; wait for `status` active; then **re-apply the settings after every resume**: the
  live nvpmodel mode (`nvpmodel` argv with `{mode}`) and each `reapply` argv (jetson_clocks,
  fan profile, ...), because a resume or boot may come back in defaults;
- `off`: `power_off` (rail/PMIC via a helper).

nvpmodel modes are listed with `needs_reboot` marked: those are never switched live (a mode
change that needs a reboot takes ~90 s) and can be neither the configured `mode` nor a target
of `async_set_power_mode`. Recovery: rail_cycle when `power_off` and `power_on` are given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..accel import AccelState
from . import subprocess_run
from ._poll import PollTimeout, poll_until
from .base import DriverError, options_of
from .preflight_checks import Problem, program

_TAIL = 300


class JetsonMode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(..., ge=0, description="nvpmodel mode id (nvpmodel -m ID).")
    needs_reboot: bool = Field(False, description="Switching to it needs a reboot: never done live.")
    description: str = Field("", description="E.g. '7W' (draws 4.6-5.3 W on an Orin Nano).")


class JetsonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    suspend: list[str] = Field(..., min_length=1, description="argv entering SC7.")
    wake: list[str] = Field(..., min_length=1, description="argv waking it from SC7 (wake pin).")
    status: list[str] = Field(..., min_length=1, description="argv printing active | suspended | off.")
    power_on: list[str] | None = Field(None, description="argv switching the module's power on.")
    power_off: list[str] | None = Field(None, description="argv switching the module's power off.")
    nvpmodel: list[str] = Field(["nvpmodel", "-m", "{mode}"], description="argv setting a mode; {mode} = id.")
    modes: dict[str, JetsonMode] = Field(default_factory=dict, description="Power modes by name.")
    mode: str | None = Field(None, description="Live mode re-applied after every resume.")
    reapply: list[list[str]] = Field(default_factory=list, description="argvs re-run after every resume.")
    status_words: dict[str, Literal["off", "sleep", "idle", "active"]] = Field(
        default_factory=lambda: {"active": "active", "running": "active", "suspended": "sleep",  # type: ignore[arg-type]
                                 "sc7": "sleep", "off": "off"},
        description="First word of `status` -> state.")
    timeout_ms: int = Field(10000, gt=0, description="Kill a command running longer than this.")
    settle_timeout_ms: int = Field(5000, gt=0, description="How long the state may take to read back.")
    poll_interval_ms: int = Field(100, gt=0, description="Status polling period while settling.")

    @model_validator(mode="after")
    def _live_mode(self) -> JetsonOptions:
        if self.mode is not None:
            if self.mode not in self.modes:
                raise ValueError(f"mode {self.mode!r} is not in modes")
            if self.modes[self.mode].needs_reboot:
                raise ValueError(f"mode {self.mode!r} needs a reboot: it cannot be the live mode")
        return self


class JetsonAccelerator:
    kind: ClassVar[str] = "jetson"

    @staticmethod
    def preflight(options: JetsonOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: every program it would run is there to run."""
        opts = options_of(JetsonOptions, options)
        argvs = [("suspend", opts.suspend), ("wake", opts.wake), ("status", opts.status),
                 ("power_on", opts.power_on), ("power_off", opts.power_off),
                 ("nvpmodel", opts.nvpmodel if opts.modes else None),
                 *((f"reapply[{i}]", argv) for i, argv in enumerate(opts.reapply))]
        return [p for what, argv in argvs if (p := program(argv, what)) is not None]

    def __init__(self, options: JetsonOptions | Mapping[str, Any]) -> None:
        self.options = options_of(JetsonOptions, options)
        self.mode = self.options.mode
        self._running = AccelState.ACTIVE
        self._lock = asyncio.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("runs", "failures", "reapplied", "refused_modes", "rail_cycles"), 0)

    async def async_open(self) -> None:
        return None

    async def async_close(self) -> None:
        return None

    def recovery_actions(self) -> frozenset[str]:
        o = self.options
        return frozenset({"rail_cycle"}) if o.power_on and o.power_off else frozenset()

    async def async_recover(self, action: str) -> None:
        o = self.options
        if action != "rail_cycle" or not (o.power_on and o.power_off):
            raise DriverError(f"jetson: cannot {action} (a module beside the gateway has no PCI rungs)")
        async with self._lock:
            await self._run(o.power_off)
            await self._run(o.power_on)
            self.counters["rail_cycles"] += 1

    async def async_set_state(self, target: AccelState) -> None:
        o = self.options
        async with self._lock:
            current = await self._status()
            if target in (AccelState.ACTIVE, AccelState.IDLE):
                if current is AccelState.OFF:
                    if o.power_on is None:
                        raise DriverError("jetson is off and no power_on command is configured")
                    await self._run(o.power_on)
                elif current not in (AccelState.ACTIVE, AccelState.IDLE):
                    await self._run(o.wake)
                await self._settle(lambda s: s in (AccelState.ACTIVE, AccelState.IDLE), "awake")
                self._running = target
                if current not in (AccelState.ACTIVE, AccelState.IDLE):
                    await self._reapply()
            elif target is AccelState.SLEEP:
                if current is not AccelState.SLEEP:
                    await self._run(o.suspend)
                await self._settle(lambda s: s is AccelState.SLEEP, "suspended (SC7)")
            elif target is AccelState.OFF:
                if o.power_off is None:
                    raise DriverError("state 'off' needs a power_off command")
                await self._run(o.power_off)
                await self._settle(lambda s: s is AccelState.OFF, "off")
            else:
                raise DriverError(f"cannot command transitional state {target.value!r}")

    async def async_read_state(self) -> AccelState:
        state = await self._status()
        return self._running if state in (AccelState.ACTIVE, AccelState.IDLE) else state

    async def async_set_power_mode(self, name: str) -> None:
        """Switch the live nvpmodel mode; a mode marked needs_reboot is refused, never tried."""
        mode = self.options.modes.get(name)
        if mode is None:
            raise DriverError(f"unknown power mode {name!r}")
        if mode.needs_reboot:
            self.counters["refused_modes"] += 1
            raise DriverError(f"power mode {name!r} needs a reboot (~90 s): not switched live")
        async with self._lock:
            await self._run([a.format(mode=mode.id) for a in self.options.nvpmodel])
            self.mode = name

    async def _reapply(self) -> None:
        """After a resume or boot the module may run defaults: set the live mode and settings."""
        if self.mode is not None:
            mode = self.options.modes[self.mode]
            await self._run([a.format(mode=mode.id) for a in self.options.nvpmodel])
        for argv in self.options.reapply:
            await self._run(argv)
        self.counters["reapplied"] += 1

    async def _status(self) -> AccelState:
        try:
            out = await self._run(self.options.status)
        except DriverError:
            return AccelState.UNKNOWN  # unreachable is not asleep: never assume
        words = out.split()
        word = words[0].lower() if words else ""
        mapped = self.options.status_words.get(word)
        return AccelState(mapped) if mapped else AccelState.UNKNOWN

    async def _settle(self, done: Callable[[AccelState], bool], what: str) -> None:
        try:
            await poll_until(self._status, done, timeout_s=self.options.settle_timeout_ms / 1000,
                             interval_s=self.options.poll_interval_ms / 1000, what=f"jetson {what}")
        except PollTimeout as exc:
            raise DriverError(f"jetson not {what} after {self.options.settle_timeout_ms} ms "
                              f"(reads {exc.last.value})") from None

    async def _run(self, argv: list[str]) -> str:
        self.counters["runs"] += 1
        try:
            done = await subprocess_run.run(argv, self.options.timeout_ms / 1000)
        except TimeoutError:  # (an OSError: first) its process group was killed: ssh and children too
            self.counters["failures"] += 1
            raise DriverError(f"{argv[0]!r} timed out (killed)") from None
        except OSError as exc:
            self.counters["failures"] += 1
            raise DriverError(f"cannot run {argv[0]!r}: {exc}") from exc
        if done.returncode != 0:
            self.counters["failures"] += 1
            tail = done.stderr_tail(_TAIL)
            raise DriverError(f"{argv[0]!r} exited with {done.returncode}" + (f": {tail}" if tail else ""))
        return done.stdout.decode(errors="replace")
