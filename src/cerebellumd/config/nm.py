"""`[nm]`: the CAN network-management section; builds the pure `NmParams`."""

from __future__ import annotations

from typing import Annotated

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
    msg_cycle_offset_ms: int = Field(
        0, ge=0,
        description="CanNmMsgCycleOffset: delay of our first NM PDU after entering repeat message or "
                    "normal operation (only when not passive).")
    immediate_nm_transmissions: int = Field(
        0, ge=0, le=255,
        description="CanNmImmediateNmTransmissions: NM PDUs sent at once, CanNmImmediateNmCycleTime "
                    "apart, when our network request leaves (prepare) bus sleep; needs passive = false.")
    immediate_nm_cycle_ms: int = Field(
        20, gt=0, description="CanNmImmediateNmCycleTime: period of the immediate NM PDUs.")
    remote_sleep_ind_ms: int | None = Field(
        None, gt=0,
        description="CanNmRemoteSleepIndTime: in normal operation, no NM PDU for this long = remote sleep "
                    "indication (every other node is ready to sleep); none = CanNmRemoteSleepIndEnabled off.")
    node_detection: bool = Field(
        True, description="CanNmNodeDetectionEnabled: a received repeat-message bit sends the network back "
                          "to repeat message.")
    active_wakeup_bit: bool = Field(
        False, description="CanNmActiveWakeupBitEnabled: our NM PDUs carry the active-wakeup bit when our "
                           "request woke the network; needs passive = false.")
    may_wake_bus: bool = Field(
        False, description="Not AUTOSAR's limit: with passive = false, our own network request may wake a "
                           "sleeping bus and keep it awake (a full AUTOSAR active node). False = we transmit "
                           "only while other frames show the bus awake.")
    pn_enabled: bool = Field(
        False, description="CanNmPnEnabled: partial networking; NM PDUs are filtered by their PN info "
                           "(docs/network-management.md).")
    pn_info_offset: int = Field(
        2, ge=0, le=63, description="CanNmPnInfoOffset: payload byte where the PN info starts.")
    pn_filter_mask: tuple[Annotated[int, Field(ge=0, le=255)], ...] = Field(
        (), max_length=64,
        description="CanNmPnFilterMaskByte, one per PN info byte (their count is CanNmPnInfoLength): "
                    "the PNs this gateway belongs to.")
    all_nm_messages_keep_awake: bool = Field(
        False, description="CanNmAllNmMessagesKeepAwake: with pn_enabled, NM PDUs without the PNI bit or "
                           "with PN info outside our mask still keep the network awake.")
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
        if self.passive:
            for key in ("immediate_nm_transmissions", "active_wakeup_bit", "may_wake_bus"):
                if getattr(self, key):
                    raise ValueError(f"{key} needs passive = false (a passive node never transmits)")
        if self.pn_enabled:
            if not self.pn_filter_mask:
                raise ValueError("pn_enabled needs pn_filter_mask (one byte per PN info byte)")
            if self.control_byte is None:
                raise ValueError("pn_enabled needs control_byte (the PNI bit is in the control bit vector)")
            end = self.pn_info_offset + len(self.pn_filter_mask)
            if end > 64:
                raise ValueError("pn_info_offset + len(pn_filter_mask) exceeds 64 bytes")
            taken = {b for b in (self.source_byte, self.control_byte) if b is not None}
            if taken & set(range(self.pn_info_offset, end)):
                raise ValueError("the PN info bytes overlap source_byte or control_byte")
        elif self.pn_filter_mask:
            raise ValueError("pn_filter_mask is set but pn_enabled = false")
        return self

    def params(self) -> NmParams:
        return NmParams(
            timeout_s=self.timeout_ms / 1000,
            repeat_message_s=self.repeat_message_ms / 1000,
            wait_bus_sleep_s=self.wait_bus_sleep_ms / 1000,
            msg_cycle_s=self.msg_cycle_ms / 1000,
            msg_cycle_offset_s=self.msg_cycle_offset_ms / 1000,
            immediate_transmissions=self.immediate_nm_transmissions,
            immediate_cycle_s=self.immediate_nm_cycle_ms / 1000,
            remote_sleep_ind_s=None if self.remote_sleep_ind_ms is None else self.remote_sleep_ind_ms / 1000,
            node_detection=self.node_detection,
            active_wakeup_bit=self.active_wakeup_bit,
            may_wake_bus=self.may_wake_bus,
            pn_enabled=self.pn_enabled,
            pn_filter_mask=tuple(self.pn_filter_mask),
            all_nm_messages_keep_awake=self.all_nm_messages_keep_awake,
            wake_validation_s=self.wake_validation_ms / 1000,
            idle_timeout_s=self.idle_timeout_ms / 1000,
            passive=self.passive,
            battery_min_v=self.battery_min_v,
        )

    def layout(self) -> NmFrameLayout:
        pn_length = len(self.pn_filter_mask) if self.pn_enabled else 0
        return NmFrameLayout(self.nm_id_base, self.nm_id_mask, self.source_byte, self.control_byte,
                             self.pn_info_offset, pn_length)
