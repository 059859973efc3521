"""NM PDUs from CAN frames, and the CanNm state machine run over a recorded log.

AUTOSAR CanNm PDU layout (defaults): byte 0 = source node id, byte 1 = control bit vector
(bit 0 repeat-message request, bit 4 active wakeup, ...); user data follows. Both positions are
configurable (`NmConfig.source_byte` / `control_byte`), and the node id may instead come from
the CAN ID bits outside `nm_id_mask` (OEMs that put it there).

The replay runs *the same* pure `CanNm.step` as the live daemon, stepping at every frame and
at every timer deadline in between, so a log yields the exact timeline the daemon would have
followed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from os import PathLike

import can

from ..policies.nm import (
    CanNm,
    NmConfig,
    NmDecision,
    NmInputs,
    NmMode,
    NmParams,
    NmPdu,
    NmState,
)

_MAX_TIMER_STEPS = 100_000  # a bound on timer steps between two frames (never reached)


class NmFrameError(ValueError):
    """A frame with an NM ID that is not a valid NM PDU (too short for the layout)."""


@dataclass(frozen=True, slots=True)
class NmFrameLayout:
    id_base: int = 0x500
    id_mask: int = 0x700
    source_byte: int | None = 0
    control_byte: int | None = 1

    @classmethod
    def from_config(cls, config: NmConfig) -> NmFrameLayout:
        return cls(config.nm_id_base, config.nm_id_mask, config.source_byte, config.control_byte)

    def is_nm_id(self, arbitration_id: int) -> bool:
        return (arbitration_id & self.id_mask) == (self.id_base & self.id_mask)

    @property
    def min_length(self) -> int:
        used = [b for b in (self.source_byte, self.control_byte) if b is not None]
        return max(used) + 1 if used else 0


def encode_nm_frame(node_id: int, layout: NmFrameLayout, control: int = 0) -> can.Message:
    """Our own NM PDU (active nodes only): CAN ID nm_id_base + node id, the node id and the
    control bit vector at their bytes, the rest 0xFF (AUTOSAR's default for unused user data)."""
    data = bytearray(b"\xff" * max(8, layout.min_length))
    if layout.source_byte is not None:
        data[layout.source_byte] = node_id
    if layout.control_byte is not None:
        data[layout.control_byte] = control
    arbitration_id = layout.id_base + node_id
    return can.Message(arbitration_id=arbitration_id, data=bytes(data),
                       is_extended_id=arbitration_id > 0x7FF)


def decode_nm_frame(msg: can.Message, layout: NmFrameLayout) -> NmPdu | None:
    """The NM PDU in `msg`, or None when it is no NM frame (other ID, error or remote frame).

    Raises NmFrameError for an NM ID with too few bytes: the caller counts it."""
    if msg.is_error_frame or msg.is_remote_frame or not layout.is_nm_id(msg.arbitration_id):
        return None
    data = msg.data
    if len(data) < layout.min_length:
        raise NmFrameError(
            f"NM frame 0x{msg.arbitration_id:X} has {len(data)} bytes, layout needs "
            f"{layout.min_length}"
        )
    if layout.source_byte is None:
        source = msg.arbitration_id & ~layout.id_mask & 0x1FFFFFFF
    else:
        source = data[layout.source_byte]
    control = data[layout.control_byte] if layout.control_byte is not None else 0
    return NmPdu(source_node=source, control=control)


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
        self._activity = True
        try:
            pdu = decode_nm_frame(msg, self.layout)
        except NmFrameError:
            self.malformed += 1
            return
        if pdu is not None:
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


@dataclass(frozen=True, slots=True)
class NmEvent:
    """One line of the replayed timeline: a mode change or a wake validation result."""

    time: float
    mode: NmMode
    reason: str
    wakeup_validated: bool = False
    wakeup_expired: bool = False
    wakeup_pending: bool = False
    nodes: tuple[int, ...] = ()  # NM nodes heard in this step


@dataclass(slots=True)
class NmReplay:
    events: list[NmEvent] = field(default_factory=list)
    frames: int = 0
    nm_pdus: int = 0
    malformed: int = 0
    time_reversals: int = 0  # frames stamped earlier than the previous one (clamped)
    nodes: set[int] = field(default_factory=set)
    final: NmState | None = None

    def mode_at(self, t: float) -> NmMode | None:
        """The mode in force at time `t` (None before the first event)."""
        mode = None
        for event in self.events:
            if event.time > t:
                break
            mode = event.mode
        return mode

    def first(self, mode: NmMode) -> float | None:
        return next((e.time for e in self.events if e.mode is mode), None)


def replay_nm(
    messages: Iterable[can.Message],
    params: NmParams,
    layout: NmFrameLayout,
    *,
    ignition: bool | None = None,
    local_request: bool = False,
    until: float | None = None,
) -> NmReplay:
    """Run CanNm over `messages` (in log order). Timestamps are the log's; only their
    differences matter. After the last frame the timers keep running until `until` or, when
    None, until no timer is pending (the network is asleep)."""
    nm = CanNm(params)
    out = NmReplay()
    state: NmState | None = None
    last_t = 0.0

    def record(t: float, new: NmState, d: NmDecision, nodes: tuple[int, ...] = ()) -> None:
        if d.changed or d.wakeup_validated or d.wakeup_expired or d.wakeup_pending:
            out.events.append(NmEvent(t, new.mode, new.reason, d.wakeup_validated,
                                      d.wakeup_expired, d.wakeup_pending, nodes))

    def run_timers(s: NmState, upto: float) -> NmState:
        for _ in range(_MAX_TIMER_STEPS):
            deadline = nm.next_deadline(s)
            if deadline is None or deadline > upto:
                return s
            s, d = nm.step(s, NmInputs(ignition=ignition, local_request=local_request), deadline)
            record(deadline, s, d)
        raise RuntimeError("NM timers did not settle")  # a bug in CanNm.next_deadline

    for msg in messages:
        if msg.is_error_frame:
            continue
        t = float(msg.timestamp)
        if state is None:
            state = nm.initial_state(t)
            out.events.append(NmEvent(t, state.mode, "log_start"))
            last_t = t
        if t < last_t:
            out.time_reversals += 1
            t = last_t
        state = run_timers(state, t)
        out.frames += 1
        try:
            pdu = decode_nm_frame(msg, layout)
        except NmFrameError:
            out.malformed += 1
            pdu = None
        pdus: tuple[NmPdu, ...] = (pdu,) if pdu is not None else ()
        if pdu is not None:
            out.nm_pdus += 1
            out.nodes.add(pdu.source_node)
        inputs = NmInputs(
            nm_pdus=pdus, can_activity=True, ignition=ignition, local_request=local_request
        )
        state, d = nm.step(state, inputs, t)
        record(t, state, d, tuple(p.source_node for p in pdus))
        last_t = t

    if state is not None:
        state = run_timers(state, until if until is not None else float("inf"))
    out.final = state
    return out


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
        NmFrameLayout.from_config(config),
        ignition=ignition,
        local_request=local_request,
        until=until,
    )
