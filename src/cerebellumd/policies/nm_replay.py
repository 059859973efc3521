"""CanNm over a sequence of recorded frames: NM PDU decoding and the log replayer.

Pure (no I/O, no clock, no python-can): a frame is anything with the few attributes of
`NmFrame` (a `can.Message` has them), time is the frames' own timestamps. The daemon
(`daemon/nm_frames.py`: live collector, log files) and `cerebellumd replay` (`sim/replay.py`)
both use this one implementation, so a log yields the exact timeline the daemon would have
followed.

AUTOSAR CanNm PDU layout (defaults): byte 0 = source node id, byte 1 = control bit vector
(bit 0 repeat-message request, bit 4 active wakeup, bit 6 partial network information, ...);
user data follows. Both positions are configurable (`[nm] source_byte` / `control_byte`), and
the node id may instead come from the CAN ID bits outside `nm_id_mask` (OEMs that put it
there). With partial networking the PN info is `pn_info_length` bytes from `pn_info_offset`
(CanNmPnInfoOffset / CanNmPnInfoLength), read when the CBV's PNI bit is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .nm import CBV_PARTIAL_NETWORK_INFORMATION, CanNm, NmDecision, NmInputs, NmMode, NmParams, NmPdu, NmState

_MAX_TIMER_STEPS = 100_000  # a bound on timer steps between two frames (never reached)


class NmFrame(Protocol):
    """What NM needs of a CAN frame. Read-only properties so that `can.Message` (mutable
    attributes, `bytearray` data) satisfies it structurally."""

    @property
    def timestamp(self) -> float: ...
    @property
    def arbitration_id(self) -> int: ...
    @property
    def data(self) -> Sequence[int]: ...
    @property
    def is_error_frame(self) -> bool: ...
    @property
    def is_remote_frame(self) -> bool: ...


class NmFrameError(ValueError):
    """A frame with an NM ID that is not a valid NM PDU (too short for the layout)."""


@dataclass(frozen=True, slots=True)
class NmFrameLayout:
    id_base: int = 0x500
    id_mask: int = 0x700
    source_byte: int | None = 0
    control_byte: int | None = 1
    pn_info_offset: int = 0  # CanNmPnInfoOffset (used when pn_info_length > 0)
    pn_info_length: int = 0  # CanNmPnInfoLength; 0 = no partial networking

    def is_nm_id(self, arbitration_id: int) -> bool:
        return (arbitration_id & self.id_mask) == (self.id_base & self.id_mask)

    @property
    def min_length(self) -> int:
        used = [b for b in (self.source_byte, self.control_byte) if b is not None]
        return max(used) + 1 if used else 0

    @property
    def pn_end(self) -> int:
        return self.pn_info_offset + self.pn_info_length if self.pn_info_length else 0


def decode_nm_frame(msg: NmFrame, layout: NmFrameLayout) -> NmPdu | None:
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
    pn_info = b""
    if layout.pn_info_length and control & CBV_PARTIAL_NETWORK_INFORMATION:
        if len(data) < layout.pn_end:
            raise NmFrameError(
                f"NM frame 0x{msg.arbitration_id:X} sets the PNI bit but has {len(data)} bytes, "
                f"its PN info needs {layout.pn_end}"
            )
        pn_info = bytes(data[layout.pn_info_offset:layout.pn_end])
    return NmPdu(source_node=source, control=control, pn_info=pn_info)


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
    remote_sleep_indication: bool = False
    remote_sleep_cancellation: bool = False


@dataclass(slots=True)
class NmReplay:
    events: list[NmEvent] = field(default_factory=list)
    frames: int = 0
    nm_pdus: int = 0
    malformed: int = 0
    pn_filtered: int = 0  # NM PDUs ignored by the partial-networking filter
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


class NmReplayer:
    """Steps CanNm at every frame fed and at every timer deadline in between.

    `ignition` and `local_request` are the inputs besides the frames; a shell may change them
    between feeds (e.g. KL15 decoded from the same log) and they hold until changed, as a
    sampled signal does in the daemon."""

    def __init__(
        self,
        params: NmParams,
        layout: NmFrameLayout,
        *,
        ignition: bool | None = None,
        local_request: bool = False,
    ) -> None:
        self.nm = CanNm(params)
        self.layout = layout
        self.ignition = ignition
        self.local_request = local_request
        self.out = NmReplay()
        self.state: NmState | None = None
        self._last_t = 0.0

    def feed(self, msg: NmFrame) -> None:
        if msg.is_error_frame:
            return  # error frames say the bus has trouble, not that an ECU is awake
        t = float(msg.timestamp)
        if self.state is None:
            self.state = self.nm.initial_state(t)
            self.out.events.append(NmEvent(t, self.state.mode, "log_start"))
            self._last_t = t
        if t < self._last_t:
            self.out.time_reversals += 1
            t = self._last_t
        self.state = self._run_timers(self.state, t)
        self.out.frames += 1
        try:
            pdu = decode_nm_frame(msg, self.layout)
        except NmFrameError:
            self.out.malformed += 1
            pdu = None
        pdus: tuple[NmPdu, ...] = (pdu,) if pdu is not None else ()
        if pdu is not None:
            self.out.nm_pdus += 1
            self.out.nodes.add(pdu.source_node)
        # An NM PDU is activity only once it passes the PN filter (CanNm.step decides).
        inputs = NmInputs(
            nm_pdus=pdus, can_activity=pdu is None, ignition=self.ignition,
            local_request=self.local_request,
        )
        self.state, d = self.nm.step(self.state, inputs, t)
        self._record(t, self.state, d, tuple(p.source_node for p in pdus))
        self._last_t = t

    def finish(self, until: float | None = None) -> NmReplay:
        """Run the timers on after the last frame until `until` or, when None, until no timer
        is pending (the network is asleep). Idempotent."""
        if self.state is not None:
            self.state = self._run_timers(self.state, until if until is not None else float("inf"))
        self.out.final = self.state
        return self.out

    def _record(self, t: float, new: NmState, d: NmDecision, nodes: tuple[int, ...] = ()) -> None:
        self.out.pn_filtered += d.pn_filtered
        if (d.changed or d.wakeup_validated or d.wakeup_expired or d.wakeup_pending
                or d.remote_sleep_indication or d.remote_sleep_cancellation):
            self.out.events.append(NmEvent(t, new.mode, new.reason, d.wakeup_validated,
                                           d.wakeup_expired, d.wakeup_pending, nodes,
                                           d.remote_sleep_indication, d.remote_sleep_cancellation))

    def _run_timers(self, s: NmState, upto: float) -> NmState:
        for _ in range(_MAX_TIMER_STEPS):
            deadline = self.nm.next_deadline(s)
            if deadline is None or deadline > upto:
                return s
            inputs = NmInputs(ignition=self.ignition, local_request=self.local_request)
            s, d = self.nm.step(s, inputs, deadline)
            self._record(deadline, s, d)
        raise RuntimeError("NM timers did not settle")  # a bug in CanNm.next_deadline


def replay_nm(
    messages: Iterable[NmFrame],
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
    replayer = NmReplayer(params, layout, ignition=ignition, local_request=local_request)
    for msg in messages:
        replayer.feed(msg)
    return replayer.finish(until)


__all__ = [
    "NmEvent",
    "NmFrame",
    "NmFrameError",
    "NmFrameLayout",
    "NmReplay",
    "NmReplayer",
    "decode_nm_frame",
    "replay_nm",
]
