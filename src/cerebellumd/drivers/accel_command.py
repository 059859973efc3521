"""Accelerator control by external commands (argv lists, never a shell).

Each commandable state has an argv; `{state}` and `{device}` in any argument are replaced.
A command that exits non-zero is a DriverError carrying the tail of its stderr; one that runs
past `timeout_ms` is killed (its whole process group, `subprocess_run`) and is a DriverError too. The state is
read back by running `status`, whose stdout's first word names the state (`off`, `sleep`,
`idle`, `active`, or a word mapped by `status_words`); anything else reads as unknown and is
counted. Without a `status` command the state reads as unknown: this driver never assumes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..accel import AccelState
from . import subprocess_run
from .base import DriverError, options_of
from .preflight_checks import Problem, program

_LOG = logging.getLogger(__name__)
_STDERR_TAIL = 400

Commandable = Literal["off", "sleep", "idle", "active"]


class CommandOptions(BaseModel):
    """External programs that switch and report the accelerator's power state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commands: dict[Commandable, list[str]] = Field(
        ..., description="argv per target state; {state} and {device} are substituted.")
    status: list[str] | None = Field(
        None, description="argv printing the current state word on stdout.")
    status_words: dict[str, Literal["off", "sleep", "idle", "active", "waking", "suspending"]] = (
        Field(default_factory=dict,
              description="Extra status words mapped to states (e.g. D3cold = off)."))
    device: str = Field("", description="Value of {device}.")
    timeout_ms: int = Field(5000, gt=0, description="Kill a command running longer than this.")


class CommandAccelerator:
    """AcceleratorDriver running one program per transition."""

    kind: ClassVar[str] = "command"

    @staticmethod
    def preflight(options: CommandOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: every program it would run is there to run."""
        opts = options_of(CommandOptions, options)
        argvs = [(f"commands.{state}", argv) for state, argv in opts.commands.items()] + [("status", opts.status)]
        return [p for what, argv in argvs if (p := program(argv, what)) is not None]

    def __init__(self, options: CommandOptions | Mapping[str, Any]) -> None:
        self.options = options_of(CommandOptions, options)
        for state, argv in self.options.commands.items():
            if not argv:
                raise ValueError(f"empty argv for state {state!r}")
        self._argv = {AccelState(s): argv for s, argv in self.options.commands.items()}
        self._words = {w.lower(): AccelState(s) for w, s in self.options.status_words.items()}
        self.counters: dict[str, int] = dict.fromkeys(
            ("runs", "failures", "timeouts", "unparsed_status"), 0)

    async def async_open(self) -> None:
        return None

    async def async_close(self) -> None:
        return None

    async def async_set_state(self, target: AccelState) -> None:
        argv = self._argv.get(target)
        if argv is None:
            raise DriverError(f"no command configured for state {target.value!r}")
        await self._run(self._expand(argv, target))

    async def async_read_state(self) -> AccelState:
        if self.options.status is None:
            return AccelState.UNKNOWN
        stdout = await self._run(self._expand(self.options.status, None))
        words = stdout.split()
        word = words[0].lower() if words else ""
        if word in self._words:
            return self._words[word]
        try:
            state = AccelState(word)
        except ValueError:
            self.counters["unparsed_status"] += 1
            _LOG.warning("status command printed %r: not a state word", stdout[:80])
            return AccelState.UNKNOWN
        return state

    def _expand(self, argv: Sequence[str], state: AccelState | None) -> list[str]:
        values = {"state": state.value if state else "", "device": self.options.device}
        try:
            return [arg.format_map(values) for arg in argv]
        except (KeyError, ValueError, IndexError) as exc:
            raise DriverError(f"bad placeholder in {list(argv)!r}: {exc}") from exc

    async def _run(self, argv: list[str]) -> str:
        self.counters["runs"] += 1
        timeout = self.options.timeout_ms / 1000
        try:
            done = await subprocess_run.run(argv, timeout)
        except TimeoutError:  # before OSError: TimeoutError is one
            self.counters["timeouts"] += 1
            raise DriverError(f"{argv[0]!r} timed out after {timeout:.3f} s (killed)") from None
        except OSError as exc:
            self.counters["failures"] += 1
            raise DriverError(f"cannot run {argv[0]!r}: {exc}") from exc
        if done.returncode != 0:
            self.counters["failures"] += 1
            tail = done.stderr_tail(_STDERR_TAIL)
            raise DriverError(
                f"{argv[0]!r} exited with status {done.returncode}" + (f": {tail}" if tail else ""))
        return done.stdout.decode(errors="replace")
