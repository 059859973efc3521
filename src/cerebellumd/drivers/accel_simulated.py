"""A simulated accelerator with real state transitions: `waking` and `suspending` take the
latencies of the power model, and the state is only `active` once the wake has finished. It
moves by the same legs as the evaluator's accelerator (`AcceleratorModel.next_leg`).
Failure injection (a resume that fails, a command that hangs) serves the fault tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..accel import RESTING_STATES, AcceleratorModel, AccelState
from .base import DriverError


class SimulatedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wake_failure_probability: float = Field(0.0, ge=0, le=1, description="Chance a wake ends in `unknown`.")
    hang_commands: bool = Field(False, description="Every command hangs (timeout tests).")
    fail_commands: bool = Field(False, description="Every command raises (failure tests).")
    seed: int = Field(0, description="Seed of the failure draws.")


class SimulatedAccelerator:
    kind: ClassVar[str] = "simulated"

    def __init__(
        self,
        model: AcceleratorModel,
        *,
        initial: AccelState = AccelState.IDLE,
        time_scale: float = 1.0,
        options: SimulatedOptions | None = None,
    ) -> None:
        self.model = model
        self.time_scale = time_scale
        self.options = options or SimulatedOptions()
        self._state = initial
        self._rng = random.Random(self.options.seed)
        self._pending: asyncio.TimerHandle | None = None
        self._from: AccelState = initial
        self._to: AccelState = initial
        self._desired: AccelState = initial
        self.commands: list[AccelState] = []  # what was commanded, in order (for tests)
        self.state_changed = asyncio.Event()

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], *, model: AcceleratorModel, time_scale: float = 1.0,
        initial: AccelState = AccelState.IDLE, **_: Any,
    ) -> SimulatedAccelerator:
        return cls(model, initial=initial, time_scale=time_scale, options=SimulatedOptions(**options))

    async def async_open(self) -> None:
        return None

    async def async_close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    async def async_read_state(self) -> AccelState:
        return self._state

    def power_w(self) -> float:
        """Instantaneous draw: the steady state's power, or the transition's mean power."""
        if self._state is AccelState.WAKING:
            return self.model.exit[self._from].mean_power_w if self._from in RESTING_STATES else 0.0
        if self._state is AccelState.SUSPENDING:
            return self.model.enter[self._to].mean_power_w
        if self._state is AccelState.UNKNOWN:
            return self.model.power_w[AccelState.IDLE]
        return self.model.power_w[self._state]

    async def async_set_state(self, target: AccelState) -> None:
        self.commands.append(target)
        if self.options.fail_commands:
            raise DriverError("simulated failure")
        if self.options.hang_commands:
            await asyncio.Event().wait()
        if target not in (*RESTING_STATES, AccelState.ACTIVE):
            raise DriverError(f"cannot command {target.value}")
        self._desired = target
        if self._pending is None:
            self._start()

    def _start(self) -> None:
        """The next leg toward the commanded state (`AcceleratorModel.next_leg`, the evaluator's
        rules): a transition under way runs to its end, resting -> resting goes through `active`."""
        while True:
            leg = self.model.next_leg(self._state, self._desired)
            if leg is None:
                return
            kind, to, cost = leg
            self._from, self._to = self._state, to
            if cost.latency_s > 0:
                self._set(kind)
                self._pending = asyncio.get_running_loop().call_later(cost.latency_s / self.time_scale, self._finish)
                return
            if not self._arrive(to):
                return

    def _finish(self) -> None:
        self._pending = None
        if self._arrive(self._to):
            self._start()

    def _arrive(self, state: AccelState) -> bool:
        """False when the wake failed (the accelerator is `unknown` until commanded again)."""
        if state is AccelState.ACTIVE and self._rng.random() < self.options.wake_failure_probability:
            self._set(AccelState.UNKNOWN)
            return False
        self._set(state)
        return True

    def _set(self, state: AccelState) -> None:
        self._state = state
        self.state_changed.set()
        self.state_changed = asyncio.Event()
