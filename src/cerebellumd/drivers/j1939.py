"""SAE J1939 as a listening gateway sees it: identifiers, routes by PGN, transport-protocol
reassembly (BAM and RTS/CTS) and address claims. Pure: no I/O, no clock (the caller passes each
frame's time in seconds), no decision; `daemon/ingest.py` and `sim/replay.py` share it.

Identifiers (J1939-21 §5.2): a 29-bit ID is priority (3 bits), extended data page, data page,
PDU format (PF), PDU specific (PS) and source address (SA). The parameter group number (PGN) is
EDP, DP, PF and, for PDU2 (PF >= 240), PS; for PDU1 (PF < 240) PS is the destination address and
not part of the PGN. `split_id` computes this with bit operations on every frame;
tests/test_j1939.py checks it against `cantools.j1939.pgn_from_frame_id` (which goes through
bitstruct, several microseconds a call) on every PF/PS combination. The DBC side uses cantools'
helpers directly (`PgnRoutes`).

Matching (`PgnRoutes`): a J1939 DBC message matches every frame with its PGN, whatever the
priority and source address in the frame (real DBCs carry SA 0xFE, "any"; the bus carries the
sender's address). PDU1 messages match whatever the destination address: a listener observes
all destinations alike. Where a DBC defines one PGN several times with different source
addresses (proprietary PGNs differ per sender), a frame goes to the definition with its source
address, else to the definition with SA 0xFE if there is one, else nowhere (unknown).

Transport protocol (J1939-21 §5.10): multi-packet PGs of 9..1785 bytes travel as a TP.CM
(PGN 0xEC00) announcing size, packet count and PGN, followed by TP.DT packets (PGN 0xEB00,
sequence number 1..255 and 7 data bytes). BAM (TP.CM to the global address 0xFF) has no
handshake; CMDT is RTS, CTS (the receiver's window: how many packets, from which), DT, and
EndOfMsgAck; either side may Abort. We are a listener: we never send a CTS, we reassemble what
the two peers exchange. A (source, destination) pair carries one session at a time (a TP.DT has
no PGN: it belongs to the pair's open session). A message is delivered only whole: for BAM after
its last packet, for CMDT on the receiver's EndOfMsgAck (the originator itself counts a transfer
without one as failed, T3). Anything else is a `TpError` with a kind and a reason, and the
partial data is dropped.

Timeouts (J1939-21 §5.12.3): T1 = 750 ms (receiver: between two TP.DT, and BAM to first TP.DT),
T2 = 1250 ms (receiver: from its CTS to the next TP.DT), T3 = 1250 ms (originator: from the last
TP.DT of a window, or from the RTS, to the CTS or EndOfMsgAck), T4 = 1050 ms (originator: from a
hold CTS, 0 packets, to the next CTS). The listener applies to each session the timeout the peer
waiting at that step would apply.

Address claim (J1939-81 §4.2): PGN 0xEE00 carries the claimant's 64-bit NAME (little-endian);
from the null address 0xFE it is "cannot claim". `AddressTable` keeps the NAME per address.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import cantools.j1939
from cantools.database.can import Database, Message

PGN_REQUEST = 0xEA00
PGN_TP_DT = 0xEB00
PGN_TP_CM = 0xEC00
PGN_ADDRESS_CLAIMED = 0xEE00
GLOBAL_ADDRESS = 0xFF
NULL_ADDRESS = 0xFE
#: PGNs a `J1939Receiver` consumes itself (transport and network management).
PROTOCOL_PGNS = frozenset({PGN_TP_CM, PGN_TP_DT, PGN_ADDRESS_CLAIMED})

TP_MIN_SIZE = 9
TP_MAX_SIZE = 1785  # 255 packets of 7 bytes (J1939-21 §5.10.1)

# J1939-21 §5.12.3, seconds.
T1 = 0.750
T2 = 1.250
T3 = 1.250
T4 = 1.050

CM_RTS = 16
CM_CTS = 17
CM_END_OF_MSG_ACK = 19
CM_BAM = 32
CM_ABORT = 255

#: Every `TpError.kind` (a metric's label set is fixed up front).
TP_ERROR_KINDS = ("out_of_order", "duplicate", "timeout", "oversize", "malformed", "abort", "superseded",
                  "unexpected", "incomplete", "overflow")

T = TypeVar("T")


def split_id(can_id: int) -> tuple[int, int, int, int]:
    """(priority, PGN, source address, destination address) of a 29-bit ID; the destination of a
    PDU2 (broadcast) PG is the global address 0xFF."""
    pf = (can_id >> 16) & 0xFF
    if pf < 240:
        return (can_id >> 26) & 7, (can_id >> 8) & 0x3FF00, can_id & 0xFF, (can_id >> 8) & 0xFF
    return (can_id >> 26) & 7, (can_id >> 8) & 0x3FFFF, can_id & 0xFF, GLOBAL_ADDRESS


def pgn_of_dbc_id(frame_id: int) -> tuple[int, int]:
    """(PGN, source address) of a DBC message's ID, by cantools' J1939 helpers."""
    unpacked = cantools.j1939.frame_id_unpack(frame_id & 0x1FFFFFFF)  # type: ignore[no-untyped-call]
    pgn = cantools.j1939.pgn_from_frame_id(frame_id & 0x1FFFFFFF)  # type: ignore[no-untyped-call]
    return int(pgn), int(unpacked.source_address)


def acceptance_filter(pgn: int) -> tuple[int, int]:
    """(can_id, can_mask) accepting every frame of a PGN: priority and source address (and, for
    PDU1, the destination) masked."""
    if (pgn >> 8) & 0xFF < 240:
        return pgn << 8, 0x03FF0000
    return pgn << 8, 0x03FFFF00


class PgnRoutes(Generic[T]):
    """Route values (one per J1939 DBC message) by PGN, as the module docstring says."""

    def __init__(self, entries: Iterable[tuple[int, T]]) -> None:
        """`entries`: (DBC frame ID, route value)."""
        per_pgn: dict[int, list[tuple[int, T]]] = {}
        for frame_id, value in entries:
            pgn, source = pgn_of_dbc_id(frame_id)
            per_pgn.setdefault(pgn, []).append((source, value))
        self.by_pgn: dict[int, T] = {}
        self.by_source: dict[tuple[int, int], T] = {}
        #: (PGN, source) defined twice: the first definition is used.
        self.conflicts: list[tuple[int, int]] = []
        for pgn, defs in per_pgn.items():
            if len(defs) == 1:
                self.by_pgn[pgn] = defs[0][1]
                continue
            for source, value in defs:
                if (pgn, source) in self.by_source:
                    self.conflicts.append((pgn, source))
                    continue
                self.by_source[(pgn, source)] = value
                if source == NULL_ADDRESS:
                    self.by_pgn[pgn] = value

    def lookup(self, pgn: int, source: int) -> T | None:
        if self.by_source:
            value = self.by_source.get((pgn, source))
            if value is not None:
                return value
        return self.by_pgn.get(pgn)

    def pgns(self) -> frozenset[int]:
        return frozenset(self.by_pgn) | frozenset(pgn for pgn, _ in self.by_source)

    def __len__(self) -> int:
        return len(self.by_pgn) + sum(1 for key in self.by_source if key[0] not in self.by_pgn)


# -- transport protocol -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TpMessage:
    """A whole multi-packet PG."""

    pgn: int
    source: int
    destination: int
    data: bytes
    time: float  # of the packet (BAM) or EndOfMsgAck (CMDT) that completed it
    mode: str  # "bam" | "cmdt"


@dataclass(frozen=True, slots=True)
class TpError:
    kind: str  # one of TP_ERROR_KINDS
    source: int
    destination: int
    pgn: int | None
    reason: str


@dataclass(slots=True)
class _Session:
    mode: str
    pgn: int
    source: int
    destination: int
    size: int
    packets: int
    data: bytearray
    got: bytearray  # 1 per packet received
    n_got: int = 0
    next_seq: int = 1
    window_end: int = 0  # CMDT: last sequence number of the current CTS window; 0 = no window
    deadline: float = math.inf
    waiting: str = ""  # what the deadline waits for (the timeout's reason)


def _le16(data: bytes | bytearray, i: int) -> int:
    return data[i] | data[i + 1] << 8


def _le24(data: bytes | bytearray, i: int) -> int:
    return data[i] | data[i + 1] << 8 | data[i + 2] << 16


@dataclass(slots=True)
class TpReassembler:
    """Passive BAM and CMDT reassembly for one bus. `feed` takes TP.CM and TP.DT frames and
    returns what they complete or break; `expire` reports sessions past their deadline."""

    max_sessions: int = 64
    _sessions: dict[tuple[int, int], _Session] = field(default_factory=dict)
    #: Pairs whose TP.DT are ignored silently until their next TP.CM: the rest of a session
    #: already reported broken (one error per broken session, not one per packet).
    _discard: set[tuple[int, int]] = field(default_factory=set)
    next_deadline: float = math.inf

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def feed(self, pgn: int, source: int, destination: int, data: bytes | bytearray,
             now: float) -> list[TpMessage | TpError]:
        out: list[TpMessage | TpError] = []
        if now >= self.next_deadline:
            out.extend(self.expire(now))
        if pgn == PGN_TP_DT:
            self._data(source, destination, data, now, out)
        elif pgn == PGN_TP_CM:
            self._control(source, destination, data, now, out)
        return out

    def expire(self, now: float) -> list[TpError]:
        errors: list[TpError] = []
        for key, s in list(self._sessions.items()):
            if now > s.deadline:
                del self._sessions[key]
                self._drop(key)
                errors.append(TpError("timeout", s.source, s.destination, s.pgn,
                                      f"{s.mode.upper()} of PGN {s.pgn:#06x}: {s.waiting}; "
                                      f"{s.n_got} of {s.packets} packets received"))
        self.next_deadline = min((s.deadline for s in self._sessions.values()), default=math.inf)
        return errors

    def close(self) -> list[TpError]:
        """End of the recording: the sessions still open are incomplete."""
        errors = [TpError("incomplete", s.source, s.destination, s.pgn,
                          f"{s.mode.upper()} of PGN {s.pgn:#06x}: recording ended after {s.n_got} of "
                          f"{s.packets} packets") for s in self._sessions.values()]
        self._sessions.clear()
        self._discard.clear()
        self.next_deadline = math.inf
        return errors

    def _drop(self, key: tuple[int, int]) -> None:
        if len(self._discard) >= 1024:  # bounded; forgetting only costs one more "unexpected"
            self._discard.clear()
        self._discard.add(key)

    def _arm(self, s: _Session, deadline: float, waiting: str) -> None:
        s.deadline = deadline
        s.waiting = waiting
        if deadline < self.next_deadline:
            self.next_deadline = deadline

    # TP.CM ---------------------------------------------------------------------------------

    def _control(self, source: int, destination: int, data: bytes | bytearray, now: float,
                 out: list[TpMessage | TpError]) -> None:
        if len(data) < 8:
            out.append(TpError("malformed", source, destination, None, f"TP.CM of {len(data)} bytes (8 expected)"))
            return
        control = data[0]
        pgn = _le24(data, 5)
        if control in (CM_BAM, CM_RTS):
            self._open(control, source, destination, data, pgn, now, out)
        elif control == CM_CTS:
            self._cts(source, destination, data, pgn, now, out)
        elif control == CM_END_OF_MSG_ACK:
            self._end_ack(source, destination, pgn, now, out)
        elif control == CM_ABORT:
            key = (source, destination) if (source, destination) in self._sessions else (destination, source)
            s = self._sessions.pop(key, None)
            self._drop(key)
            out.append(TpError("abort", key[0], key[1], pgn,
                               f"TP.CM_Abort from {source:#04x}, reason {data[1]}"
                               + ("" if s is not None else " (no session seen)")))
        else:
            out.append(TpError("malformed", source, destination, pgn, f"TP.CM control byte {control}"))

    def _open(self, control: int, source: int, destination: int, data: bytes | bytearray, pgn: int, now: float,
              out: list[TpMessage | TpError]) -> None:
        mode = "bam" if control == CM_BAM else "cmdt"
        if (control == CM_BAM) != (destination == GLOBAL_ADDRESS):
            out.append(TpError("malformed", source, destination, pgn,
                               f"{mode.upper()} to {'a specific' if control == CM_BAM else 'the global'} address"))
            return
        size, packets = _le16(data, 1), data[3]
        if size > TP_MAX_SIZE:
            out.append(TpError("oversize", source, destination, pgn,
                               f"{mode.upper()} announces {size} bytes (at most {TP_MAX_SIZE})"))
            return
        if size < TP_MIN_SIZE or packets != -(-size // 7):
            out.append(TpError("malformed", source, destination, pgn,
                               f"{mode.upper()} announces {size} bytes in {packets} packets"))
            return
        key = (source, destination)
        self._discard.discard(key)
        old = self._sessions.pop(key, None)
        if old is not None:
            out.append(TpError("superseded", source, destination, old.pgn,
                               f"new {mode.upper()} for PGN {pgn:#06x} while {old.mode.upper()} of PGN "
                               f"{old.pgn:#06x} had {old.n_got} of {old.packets} packets"))
        if len(self._sessions) >= self.max_sessions:
            out.append(TpError("overflow", source, destination, pgn,
                               f"{self.max_sessions} sessions open already; this one is not followed"))
            return
        s = _Session(mode, pgn, source, destination, size, packets, bytearray(packets * 7), bytearray(packets))
        self._sessions[key] = s
        if mode == "bam":
            self._arm(s, now + T1, "no TP.DT within T1 (750 ms)")
        else:
            self._arm(s, now + T3, "no CTS within T3 (1250 ms) after the RTS")

    def _cts(self, source: int, destination: int, data: bytes | bytearray, pgn: int, now: float,
             out: list[TpMessage | TpError]) -> None:
        s = self._sessions.get((destination, source))  # the receiver answers the originator
        if s is None or s.mode != "cmdt" or s.pgn != pgn:
            out.append(TpError("unexpected", destination, source, pgn, "CTS without an open RTS session"))
            return
        count, first = data[1], data[2]
        if count == 0:
            s.window_end = 0
            self._arm(s, now + T4, "no CTS within T4 (1050 ms) after a hold CTS")
            return
        if not 1 <= first <= s.packets or first + count - 1 > s.packets:
            del self._sessions[(destination, source)]
            out.append(TpError("malformed", s.source, s.destination, pgn,
                               f"CTS for packets {first}..{first + count - 1} of {s.packets}"))
            return
        s.next_seq, s.window_end = first, first + count - 1
        self._arm(s, now + T2, "no TP.DT within T2 (1250 ms) after the CTS")

    def _end_ack(self, source: int, destination: int, pgn: int, now: float,
                 out: list[TpMessage | TpError]) -> None:
        key = (destination, source)  # the receiver acknowledges to the originator
        s = self._sessions.get(key)
        if s is None or s.mode != "cmdt" or s.pgn != pgn:
            out.append(TpError("unexpected", destination, source, pgn, "EndOfMsgAck without an open RTS session"))
            return
        del self._sessions[key]
        if s.n_got < s.packets:
            out.append(TpError("incomplete", s.source, s.destination, pgn,
                               f"EndOfMsgAck after {s.n_got} of {s.packets} packets seen"))
            return
        out.append(TpMessage(pgn, s.source, s.destination, bytes(s.data[:s.size]), now, "cmdt"))

    # TP.DT ---------------------------------------------------------------------------------

    def _data(self, source: int, destination: int, data: bytes | bytearray, now: float,
              out: list[TpMessage | TpError]) -> None:
        key = (source, destination)
        s = self._sessions.get(key)
        if s is None:
            if key not in self._discard:
                self._drop(key)
                out.append(TpError("unexpected", source, destination, None, "TP.DT without an open session"))
            return
        if len(data) < 2:
            out.append(TpError("malformed", source, destination, s.pgn, f"TP.DT of {len(data)} bytes"))
            return
        seq = data[0]
        if seq == s.next_seq - 1 and seq >= 1:
            out.append(TpError("duplicate", source, destination, s.pgn, f"TP.DT {seq} repeated (ignored)"))
            return
        if s.mode == "cmdt" and s.window_end == 0:
            del self._sessions[key]
            self._drop(key)
            out.append(TpError("out_of_order", source, destination, s.pgn,
                               f"TP.DT {seq} outside a CTS window"))
            return
        if seq != s.next_seq:
            del self._sessions[key]
            self._drop(key)
            out.append(TpError("out_of_order", source, destination, s.pgn,
                               f"TP.DT {seq} where {s.next_seq} was expected"))
            return
        i = (seq - 1) * 7
        chunk = data[1:8]
        s.data[i:i + len(chunk)] = chunk
        if not s.got[seq - 1]:
            s.got[seq - 1] = 1
            s.n_got += 1
        s.next_seq = seq + 1
        if s.mode == "bam":
            if s.n_got == s.packets:
                del self._sessions[key]
                out.append(TpMessage(s.pgn, source, destination, bytes(s.data[:s.size]), now, "bam"))
            else:
                self._arm(s, now + T1, f"no TP.DT within T1 (750 ms) after packet {seq}")
        elif seq == s.window_end:
            s.window_end = 0
            self._arm(s, now + T3, "no CTS or EndOfMsgAck within T3 (1250 ms) after the window")
        else:
            self._arm(s, now + T1, f"no TP.DT within T1 (750 ms) after packet {seq}")


# -- address claim ------------------------------------------------------------------------------


def name_fields(name: int) -> dict[str, int]:
    """The fields of a 64-bit J1939 NAME (J1939-81 §4.1.1), least significant first."""
    return {
        "identity_number": name & 0x1FFFFF,
        "manufacturer_code": (name >> 21) & 0x7FF,
        "ecu_instance": (name >> 32) & 0x7,
        "function_instance": (name >> 35) & 0x1F,
        "function": (name >> 40) & 0xFF,
        "vehicle_system": (name >> 49) & 0x7F,
        "vehicle_system_instance": (name >> 56) & 0xF,
        "industry_group": (name >> 60) & 0x7,
        "arbitrary_address_capable": (name >> 63) & 0x1,
    }


@dataclass(slots=True)
class AddressTable:
    """The NAME last claimed at each address (at most 254 entries: bounded)."""

    names: dict[int, int] = field(default_factory=dict)
    claims: int = 0
    cannot_claim: int = 0

    def claim(self, source: int, data: bytes | bytearray) -> tuple[int, int | None, int] | None:
        """An Address Claimed PG. Returns (address, previous NAME or None, NAME) when the table
        changed, else None. A claim from the null address is "cannot claim": counted only."""
        if len(data) < 8:
            return None
        name = int.from_bytes(data[:8], "little")
        self.claims += 1
        if source == NULL_ADDRESS:
            self.cannot_claim += 1
            return None
        previous = self.names.get(source)
        if previous == name:
            return None
        # A NAME moving to another address leaves its old one.
        for address, other in list(self.names.items()):
            if other == name and address != source:
                del self.names[address]
        self.names[source] = name
        return source, previous, name


# -- one bus ------------------------------------------------------------------------------------


class J1939Receiver(Generic[T]):
    """Per bus: routes single-frame PGs, reassembles transport sessions, follows address claims.

    `feed` returns the route of a single-frame PG (decode the frame's data with it) or None. With
    None, `consumed` says whether the frame was protocol (TP.CM, TP.DT, Address Claimed) rather
    than unknown; what it completed is in `messages` (reassembled PGs with their route, None when
    no DBC message has their PGN), `errors` and `claimed` (address, old NAME, new NAME), which the
    caller empties after each frame or batch.
    """

    def __init__(self, routes: PgnRoutes[T], *, max_sessions: int = 64) -> None:
        self.routes = routes
        self.tp = TpReassembler(max_sessions)
        self.addresses = AddressTable()
        self.consumed = False
        self.messages: list[tuple[T | None, TpMessage]] = []
        self.errors: list[TpError] = []
        self.claimed: list[tuple[int, int | None, int]] = []

    def feed(self, can_id: int, data: bytes | bytearray, now: float) -> T | None:
        if now >= self.tp.next_deadline:
            self.errors.extend(self.tp.expire(now))
        _, pgn, source, destination = split_id(can_id)
        if pgn not in PROTOCOL_PGNS:
            self.consumed = False
            return self.routes.lookup(pgn, source)
        self.consumed = True
        if pgn == PGN_ADDRESS_CLAIMED:
            change = self.addresses.claim(source, data)
            if change is not None:
                self.claimed.append(change)
            return None
        for event in self.tp.feed(pgn, source, destination, data, now):
            if isinstance(event, TpMessage):
                self.messages.append((self.routes.lookup(event.pgn, event.source), event))
            else:
                self.errors.append(event)
        return None

    def expire(self, now: float) -> None:
        self.errors.extend(self.tp.expire(now))

    def close(self) -> None:
        self.errors.extend(self.tp.close())


# -- which DBC messages are J1939 ---------------------------------------------------------------

#: `auto`: the messages cantools marks `protocol == "j1939"` (the DBC's `VFrameFormat` is
#: `J1939PG`), and every extended message when the DBC's `ProtocolType` attribute says J1939;
#: `on`: every extended message; `off`: none (exact IDs only, as before).
J1939_MODES = ("auto", "on", "off")


def dbc_protocol_type(db: Database) -> str:
    """The DBC's `ProtocolType` database attribute (its value, else its definition's default)."""
    dbc = db.dbc
    if dbc is None:
        return ""
    attribute = dbc.attributes.get("ProtocolType")
    if attribute is not None:
        return str(attribute.value or "")
    definition = dbc.attribute_definitions.get("ProtocolType")
    return str(definition.default_value or "") if definition is not None else ""


def is_j1939_message(message: Message, db: Database, mode: str) -> bool:
    if mode == "off" or not message.is_extended_frame:
        return False
    if mode == "on" or message.protocol == "j1939":
        return True
    return dbc_protocol_type(db).upper().startswith("J1939")
