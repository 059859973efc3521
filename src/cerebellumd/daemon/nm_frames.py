"""NM PDUs from CAN frames in the daemon, and the CanNm state machine run over a log file.

The pure part — PDU decoding, the frame layout and the replayer that steps `CanNm` at every
frame and timer deadline — lives in `policies/nm_replay.py`, shared with `cerebellumd replay`
(`sim/` may not import `daemon/`). Here: python-can specifics (our own NM PDU as a
`can.Message`, the per-tick collector of the live daemon, reading log files).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike

import can

from ..config.nm import NmConfig
from ..policies.nm import NmInputs, NmPdu
from ..policies.nm_replay import (
    NmEvent,
    NmFrameError,
    NmFrameLayout,
    NmReplay,
    decode_nm_frame,
    replay_nm,
)


def encode_nm_frame(node_id: int, layout: NmFrameLayout, control: int = 0,
                    pn_info: bytes = b"") -> can.Message:
    """Our own NM PDU (active nodes only): CAN ID nm_id_base + node id, the node id and the
    control bit vector at their bytes, the PN info (if any) at `pn_info_offset`, the rest 0xFF
    (AUTOSAR's default for unused user data, SWS_CanNm_00025)."""
    data = bytearray(b"\xff" * max(8, layout.min_length, layout.pn_end))
    if layout.source_byte is not None:
        data[layout.source_byte] = node_id
    if layout.control_byte is not None:
        data[layout.control_byte] = control
    if pn_info:
        data[layout.pn_info_offset:layout.pn_info_offset + len(pn_info)] = pn_info
    arbitration_id = layout.id_base + node_id
    return can.Message(arbitration_id=arbitration_id, data=bytes(data),
                       is_extended_id=arbitration_id > 0x7FF)


@dataclass(slots=True)
class NmInputCollector:
    """Gathers frames between two ticks of the live daemon into one `NmInputs`."""

    layout: NmFrameLayout
    malformed: int = 0
    _pdus: list[NmPdu] = field(default_factory=list)
    _activity: bool = False

    def add(self, msg: can.Message) -> None:
        if msg.is_error_frame:
            return  # error frames say the bus has trouble, not that an ECU is awake
        try:
            pdu = decode_nm_frame(msg, self.layout)
        except NmFrameError:
            self.malformed += 1
            pdu = None
        if pdu is None:
            self._activity = True  # NM PDUs are activity once they pass the PN filter (CanNm.step)
        else:
            self._pdus.append(pdu)

    def take(
        self,
        *,
        ignition: bool | None = None,
        battery_v: float | None = None,
        local_request: bool = False,
    ) -> NmInputs:
        inputs = NmInputs(
            nm_pdus=tuple(self._pdus),
            can_activity=self._activity,
            ignition=ignition,
            battery_v=battery_v,
            local_request=local_request,
        )
        self._pdus.clear()
        self._activity = False
        return inputs


def read_log(path: str | PathLike[str]) -> Iterator[can.Message]:
    """Frames of a candump .log (or any format python-can's LogReader knows by suffix).

    Blocking file I/O: call it (and `replay_nm_log`) off the event loop."""
    with can.LogReader(path) as reader:
        yield from reader


def replay_nm_log(
    path: str | PathLike[str],
    config: NmConfig,
    *,
    ignition: bool | None = None,
    local_request: bool = False,
    until: float | None = None,
) -> NmReplay:
    """`replay_nm` over a log file with the parameters and frame layout of `config`."""
    return replay_nm(
        read_log(path),
        config.params(),
        config.layout(),
        ignition=ignition,
        local_request=local_request,
        until=until,
    )


__all__ = [
    "NmEvent",
    "NmFrameError",
    "NmFrameLayout",
    "NmInputCollector",
    "NmReplay",
    "decode_nm_frame",
    "encode_nm_frame",
    "read_log",
    "replay_nm",
    "replay_nm_log",
]
