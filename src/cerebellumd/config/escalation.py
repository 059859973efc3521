"""`[accelerator.escalation]`: the wake-watchdog section; builds the pure `LadderSpec`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..accel import AccelState
from ..policies.escalation import DEFAULT_LADDERS, LadderSpec, Rung, RungSpec


class RungConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rung: Rung = Field(..., description="retry | rebind | pci_rescan | rail_cycle.")
    timeout_ms: int = Field(..., gt=0, description="Time for `active` after this rung's action.")


class EscalationConfig(BaseModel):
    """`[accelerator.escalation]`: the wake watchdog ladder of the configured backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Watch wakes and escalate when they time out.")
    backend: str = Field(
        "simulated", description=f"Default ladder: {', '.join(sorted(DEFAULT_LADDERS))}.")
    wake_timeout_ms: int | None = Field(
        None, gt=0, description="Deadline of the wake itself (default: the backend's).")
    rungs: list[RungConfig] | None = Field(
        None, description="Rungs in escalating order (default: the backend's ladder).")
    safe_state: AccelState | None = Field(
        None, description="State to leave the accelerator in after giving up (default: backend's).")

    @model_validator(mode="after")
    def _valid(self) -> EscalationConfig:
        if self.backend not in DEFAULT_LADDERS:
            raise ValueError(f"unknown backend {self.backend!r}")
        if self.safe_state is not None and self.safe_state in (
            AccelState.WAKING, AccelState.SUSPENDING, AccelState.UNKNOWN
        ):
            raise ValueError("safe_state must be off, sleep, idle or active")
        self.spec()  # order and timeouts
        return self

    def spec(self) -> LadderSpec:
        base = DEFAULT_LADDERS[self.backend]
        rungs = base.rungs if self.rungs is None else tuple(
            RungSpec(r.rung, r.timeout_ms / 1000) for r in self.rungs
        )
        return LadderSpec(
            backend=self.backend,
            wake_timeout_s=(self.wake_timeout_ms / 1000) if self.wake_timeout_ms else base.wake_timeout_s,
            rungs=rungs,
            safe_state=self.safe_state or base.safe_state,
        )
