"""`[nm]`: the CAN network-management section; builds the pure `NmParams`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..policies.nm import NmParams
from ..policies.nm_replay import NmFrameLayout


class NmConfig(BaseModel):
    """`[nm]`: follow the vehicle's CAN network management."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False, description="Follow CAN NM: bus sleep puts the accelerator to its deepest state.")
    bus: str | None = Field(None, description="CAN bus carrying NM PDUs (default: the first bus).")
    nm_id_base: int = Field(
        0x500, ge=0, le=0x1FFFFFFF, description="NM PDU CAN ID base (CanNmRxPdu range).")
    nm_id_mask: int = Field(
        0x700, ge=0, le=0x1FFFFFFF, description="Bits of the CAN ID compared with nm_id_base.")
    source_byte: int | None = Field(
        0, ge=0, le=63,
        description="Payload byte with the source node id; none = the ID bits outside the mask.")
    control_byte: int | None = Field(
        1, ge=0, le=63, description="Payload byte with the control bit vector; none = no CBV.")
    timeout_ms: int = Field(
        2000, gt=0, description="CanNmTimeoutTime: NM PDU silence that ends ready sleep.")
    repeat_message_ms: int = Field(1500, ge=0, description="CanNmRepeatMessageTime.")
    wait_bus_sleep_ms: int = Field(2000, ge=0, description="CanNmWaitBusSleepTime.")
    msg_cycle_ms: int = Field(500, gt=0, description="CanNmMsgCycleTime (only when not passive).")
    wake_validation_ms: int = Field(
        1000, gt=0, description="A wake event must be confirmed by an NM PDU or KL15 within this.")
    idle_timeout_ms: int = Field(
        2000, ge=0,
        description="Ready sleep also waits for this much silence of any CAN traffic "
                    "(0 = pure AUTOSAR).")
    passive: bool = Field(
        True, description="Never transmit NM PDUs (even active, never on a sleeping bus).")
    node_id: int = Field(
        0x7E, ge=0, le=255,
        description="Our NM node id when not passive: source byte, and added to nm_id_base for the CAN ID.")
    ignition_signal: str | None = Field(
        None, description="Signal with KL15 (non-zero = on); it requests the network.")
    battery_signal: str | None = Field(None, description="Signal with battery voltage (V).")
    battery_min_v: float = Field(
        11.8, ge=0, description="Below this the gateway's own request does not hold the bus awake.")

    @model_validator(mode="after")
    def _bytes_differ(self) -> NmConfig:
        if self.source_byte is not None and self.source_byte == self.control_byte:
            raise ValueError("source_byte and control_byte must differ")
        if self.nm_id_base & ~self.nm_id_mask & 0x1FFFFFFF:
            raise ValueError("nm_id_base has bits outside nm_id_mask")
        if not self.passive and (self.nm_id_base + self.node_id) & self.nm_id_mask != self.nm_id_base:
            raise ValueError("nm_id_base + node_id leaves the NM ID range (nm_id_mask)")
        return self

    def params(self) -> NmParams:
        return NmParams(
            timeout_s=self.timeout_ms / 1000,
            repeat_message_s=self.repeat_message_ms / 1000,
            wait_bus_sleep_s=self.wait_bus_sleep_ms / 1000,
            msg_cycle_s=self.msg_cycle_ms / 1000,
            wake_validation_s=self.wake_validation_ms / 1000,
            idle_timeout_s=self.idle_timeout_ms / 1000,
            passive=self.passive,
            battery_min_v=self.battery_min_v,
        )

    def layout(self) -> NmFrameLayout:
        return NmFrameLayout(self.nm_id_base, self.nm_id_mask, self.source_byte, self.control_byte)
