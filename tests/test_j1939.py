"""J1939 (drivers/j1939.py, its use in sim/replay.py and daemon/ingest.py): PGN matching with
priority and source address masked, passive BAM/CMDT reassembly and its errors, address claims;
`replay` of two real CANedge recordings with their DBCs (tests/data/j1939/PROVENANCE.md); the
daemon decoding 29-bit J1939 traffic, single- and multi-packet, from python-can virtual buses."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import can
import cantools
import cantools.j1939
import pytest

from cerebellumd.config import parse_config
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.drivers import j1939 as j
from cerebellumd.sim.replay import replay

from .helpers import until

DATA = Path(__file__).parent / "data" / "j1939"
DEMO_LOG = DATA / "css_j1939_demo.log.gz"
DEMO_DBC = DATA / "CSS-Electronics-SAE-J1939-DEMO.dbc"
TP_LOG = DATA / "css_j1939_tp.log.gz"
TP_DBC = DATA / "tp_j1939.dbc"


# -- identifiers and routes ---------------------------------------------------------------------


def test_split_id_agrees_with_cantools_on_every_pf_and_ps() -> None:
    for pf, ps in itertools.product(range(256), range(0, 256, 17)):
        for priority, dp, sa in ((0, 0, 0x00), (3, 1, 0x55), (7, 0, 0xFE)):
            can_id = cantools.j1939.frame_id_pack(priority, 0, dp, pf, ps, sa)
            prio, pgn, source, dest = j.split_id(can_id)
            assert pgn == cantools.j1939.pgn_from_frame_id(can_id), hex(can_id)
            assert (prio, source) == (priority, sa)
            assert dest == (ps if pf < 240 else j.GLOBAL_ADDRESS)


def test_pgn_routes_mask_priority_and_source_pdu1_destination() -> None:
    db = cantools.database.load_file(str(DEMO_DBC))
    eec1, ccvs1 = db.get_message_by_name("EEC1"), db.get_message_by_name("CCVS1")
    pdu1 = 0x18EF00FE  # Proprietary A (PF 0xEF < 240: PS is the destination)
    routes = j.PgnRoutes([(eec1.frame_id, "EEC1"), (ccvs1.frame_id, "CCVS1"), (pdu1, "PropA")])
    rx = j.J1939Receiver(routes)
    assert rx.feed(0x0CF00400, b"\0" * 8, 0.0) == "EEC1"  # as on the bus: SA 0x00
    assert rx.feed(0x18F00417, b"\0" * 8, 0.0) == "EEC1"  # priority 6, SA 0x17
    assert rx.feed(0x0CFEF100, b"\0" * 8, 0.0) == "CCVS1"  # the recording's priority 3
    assert rx.feed(0x18EF2A17, b"\0" * 8, 0.0) == "PropA"  # any destination
    assert rx.feed(0x18EFFF03, b"\0" * 8, 0.0) == "PropA"
    assert rx.feed(0x18FEF000, b"\0" * 8, 0.0) is None and not rx.consumed  # another PGN: unknown
    assert j.acceptance_filter(0xF004) == (0xF00400, 0x03FFFF00)
    assert j.acceptance_filter(0xEF00) == (0xEF0000, 0x03FF0000)


def test_one_pgn_defined_per_source_address() -> None:
    routes = j.PgnRoutes([(0x18FF0003, "from3"), (0x18FF0005, "from5"), (0x18FF00FE, "any")])
    assert routes.lookup(0xFF00, 0x03) == "from3"
    assert routes.lookup(0xFF00, 0x05) == "from5"
    assert routes.lookup(0xFF00, 0x42) == "any"
    without_any = j.PgnRoutes([(0x18FF0003, "from3"), (0x18FF0005, "from5")])
    assert without_any.lookup(0xFF00, 0x42) is None
    assert j.PgnRoutes([(0x18FF0003, "a"), (0x1CFF0003, "b")]).conflicts == [(0xFF00, 0x03)]


def test_which_dbc_messages_are_j1939() -> None:
    demo = cantools.database.load_file(str(DEMO_DBC))
    tp = cantools.database.load_file(str(TP_DBC))
    assert all(m.protocol == "j1939" for m in demo.messages)  # VFrameFormat J1939PG
    assert j.dbc_protocol_type(demo) == "J1939"
    assert all(j.is_j1939_message(m, demo, "auto") for m in demo.messages)
    assert not any(j.is_j1939_message(m, demo, "off") for m in demo.messages)
    # tp_j1939.dbc marks its message ExtendedCAN and its ProtocolType empty: only "on" routes by PGN.
    assert [j.is_j1939_message(m, tp, mode) for m in tp.messages for mode in j.J1939_MODES] == [False, True, False]


# -- transport protocol -------------------------------------------------------------------------


def cm(src: int, dst: int, body: bytes) -> tuple[int, bytes]:
    return (7 << 26) | (0xEC << 16) | (dst << 8) | src, body


def dt(src: int, dst: int, seq: int, chunk: bytes) -> tuple[int, bytes]:
    return (7 << 26) | (0xEB << 16) | (dst << 8) | src, bytes([seq]) + chunk.ljust(7, b"\xff")


def bam(src: int, pgn: int, payload: bytes) -> list[tuple[int, bytes]]:
    packets = -(-len(payload) // 7)
    frames = [cm(src, 0xFF, bytes([32]) + len(payload).to_bytes(2, "little") + bytes([packets, 0xFF])
                 + pgn.to_bytes(3, "little"))]
    return frames + [dt(src, 0xFF, i + 1, payload[i * 7:i * 7 + 7]) for i in range(packets)]


def rts(src: int, dst: int, pgn: int, size: int, per_cts: int = 0xFF) -> tuple[int, bytes]:
    return cm(src, dst, bytes([16]) + size.to_bytes(2, "little") + bytes([-(-size // 7), per_cts])
              + pgn.to_bytes(3, "little"))


def cts(src: int, dst: int, pgn: int, count: int, first: int) -> tuple[int, bytes]:
    return cm(src, dst, bytes([17, count, first, 0xFF, 0xFF]) + pgn.to_bytes(3, "little"))


def eoma(src: int, dst: int, pgn: int, size: int) -> tuple[int, bytes]:
    return cm(src, dst, bytes([19]) + size.to_bytes(2, "little") + bytes([-(-size // 7), 0xFF])
              + pgn.to_bytes(3, "little"))


def abort(src: int, dst: int, pgn: int, reason: int) -> tuple[int, bytes]:
    return cm(src, dst, bytes([255, reason, 0xFF, 0xFF, 0xFF]) + pgn.to_bytes(3, "little"))


class Feed:
    """A receiver fed frames 50 ms apart (inside every J1939-21 timeout) unless told otherwise."""

    def __init__(self, routes: j.PgnRoutes[str] | None = None) -> None:
        self.rx: j.J1939Receiver[str] = j.J1939Receiver(routes or j.PgnRoutes([(0x18FECAFE, "DM1")]))
        self.t = 0.0
        self.messages: list[tuple[str | None, j.TpMessage]] = []
        self.errors: list[j.TpError] = []

    def __call__(self, *frames: tuple[int, bytes], gap: float = 0.05) -> None:
        for can_id, data in frames:
            self.t += gap
            assert self.rx.feed(can_id, data, self.t) is None and self.rx.consumed
            self.messages += self.rx.messages
            self.errors += self.rx.errors
            self.rx.messages.clear()
            self.rx.errors.clear()

    @property
    def kinds(self) -> Counter[str]:
        return Counter(e.kind for e in self.errors)


PAYLOAD = bytes(range(1, 21))  # 20 bytes: 3 packets


def test_bam_reassembled_whole_only_after_its_last_packet() -> None:
    f = Feed()
    frames = bam(0x00, 0xFECA, PAYLOAD)
    f(*frames[:-1])
    assert f.messages == [] and f.rx.tp.open_sessions == 1  # half a message: nothing delivered
    f(frames[-1])
    [(route, msg)] = f.messages
    assert (route, msg.pgn, msg.source, msg.destination, msg.data, msg.mode) == (
        "DM1", 0xFECA, 0x00, 0xFF, PAYLOAD, "bam")
    assert f.errors == [] and f.rx.tp.open_sessions == 0


def test_cmdt_reassembled_from_what_two_peers_exchange_delivered_on_end_of_msg_ack() -> None:
    f = Feed()
    size = len(PAYLOAD)
    f(rts(0x17, 0x00, 0xFECA, size, per_cts=2), cts(0x00, 0x17, 0xFECA, 2, 1),
      dt(0x17, 0x00, 1, PAYLOAD[0:7]), dt(0x17, 0x00, 2, PAYLOAD[7:14]),
      cts(0x00, 0x17, 0xFECA, 0, 0),  # hold
      cts(0x00, 0x17, 0xFECA, 1, 3), dt(0x17, 0x00, 3, PAYLOAD[14:]))
    assert f.messages == []  # all data seen, but not acknowledged yet
    f(eoma(0x00, 0x17, 0xFECA, size))
    [(route, msg)] = f.messages
    assert (route, msg.source, msg.destination, msg.data, msg.mode) == ("DM1", 0x17, 0x00, PAYLOAD, "cmdt")
    assert f.errors == []


def test_cmdt_retransmission_asked_by_cts_is_not_an_error() -> None:
    f = Feed()
    f(rts(0x17, 0x00, 0xFECA, 20), cts(0x00, 0x17, 0xFECA, 3, 1), dt(0x17, 0x00, 1, PAYLOAD[0:7]),
      dt(0x17, 0x00, 2, b"garbage"), dt(0x17, 0x00, 3, PAYLOAD[14:]),
      cts(0x00, 0x17, 0xFECA, 1, 2), dt(0x17, 0x00, 2, PAYLOAD[7:14]), eoma(0x00, 0x17, 0xFECA, 20))
    assert [m.data for _, m in f.messages] == [PAYLOAD] and f.errors == []


def test_out_of_order_drops_the_session_and_nothing_is_delivered() -> None:
    f = Feed()
    frames = bam(0x00, 0xFECA, PAYLOAD)
    f(frames[0], frames[1], frames[3], frames[2])
    assert f.messages == []
    assert f.kinds == {"out_of_order": 1}  # packet 3 breaks it; the rest of the session is ignored
    f(*frames)
    assert [m.data for _, m in f.messages] == [PAYLOAD]  # the next announce starts afresh
    assert "TP.DT 3 where 2 was expected" in f.errors[0].reason


def test_duplicate_packet_counted_and_ignored() -> None:
    f = Feed()
    frames = bam(0x00, 0xFECA, PAYLOAD)
    f(frames[0], frames[1], frames[1], frames[2], frames[3])
    assert [m.data for _, m in f.messages] == [PAYLOAD]
    assert f.kinds == {"duplicate": 1}


def test_bam_gap_longer_than_t1_times_out() -> None:
    f = Feed()
    frames = bam(0x00, 0xFECA, PAYLOAD)
    f(frames[0], frames[1])
    f(frames[2], frames[3], gap=j.T1 + 0.01)
    assert f.messages == []
    assert f.kinds["timeout"] == 1 and "T1 (750 ms)" in f.errors[0].reason


def test_cmdt_timeouts_t3_without_cts_and_t2_without_data() -> None:
    f = Feed()
    f(rts(0x17, 0x00, 0xFECA, 20))
    f(cts(0x00, 0x17, 0xFECA, 3, 1), gap=j.T3 + 0.01)
    assert f.kinds == {"timeout": 1, "unexpected": 1} and "T3" in f.errors[0].reason
    g = Feed()
    g(rts(0x17, 0x00, 0xFECA, 20), cts(0x00, 0x17, 0xFECA, 3, 1))
    g(dt(0x17, 0x00, 1, PAYLOAD[:7]), gap=j.T2 + 0.01)
    assert g.kinds == {"timeout": 1} and "T2" in g.errors[0].reason  # the late packet: part of it
    assert f.messages == g.messages == []


def test_timeout_noticed_on_any_later_frame() -> None:
    """A sender that stops mid-message is reported when the bus carries anything later."""
    f = Feed()
    f(*bam(0x00, 0xFECA, PAYLOAD)[:2])
    assert f.rx.feed(0x0CF00400, b"\0" * 8, f.t + 5.0) is None and not f.rx.consumed
    assert [e.kind for e in f.rx.errors] == ["timeout"] and f.rx.tp.open_sessions == 0


def test_abort_drops_the_session() -> None:
    f = Feed()
    f(rts(0x17, 0x00, 0xFECA, 20), cts(0x00, 0x17, 0xFECA, 3, 1), dt(0x17, 0x00, 1, PAYLOAD[:7]),
      abort(0x00, 0x17, 0xFECA, 3), eoma(0x00, 0x17, 0xFECA, 20))
    assert f.messages == []
    assert f.kinds == {"abort": 1, "unexpected": 1} and "reason 3" in f.errors[0].reason


def test_oversize_malformed_superseded_and_incomplete() -> None:
    f = Feed()
    f(cm(0x00, 0xFF, bytes([32]) + (2000).to_bytes(2, "little") + bytes([255, 0xFF, 0xCA, 0xFE, 0x00])))
    f(cm(0x00, 0xFF, bytes([32]) + (20).to_bytes(2, "little") + bytes([5, 0xFF, 0xCA, 0xFE, 0x00])))
    f(cm(0x00, 0xFF, b"\x20\x14"))  # short TP.CM
    first, second = bam(0x00, 0xFECA, PAYLOAD), bam(0x00, 0xFEE3, PAYLOAD[::-1])
    f(first[0], first[1], *second)
    f(*bam(0x03, 0xFECA, PAYLOAD)[:2])
    assert [m.data for _, m in f.messages] == [PAYLOAD[::-1]]
    f.rx.close()
    f.errors += f.rx.errors
    assert f.kinds == {"oversize": 1, "malformed": 2, "superseded": 1, "incomplete": 1}


def test_sessions_are_bounded() -> None:
    rx: j.J1939Receiver[str] = j.J1939Receiver(j.PgnRoutes([]), max_sessions=2)
    for sa in range(3):
        can_id, data = bam(sa, 0xFECA, PAYLOAD)[0]
        rx.feed(can_id, data, 0.0)
    assert rx.tp.open_sessions == 2 and [e.kind for e in rx.errors] == ["overflow"]


def test_address_claims_tracked_by_name() -> None:
    rx: j.J1939Receiver[str] = j.J1939Receiver(j.PgnRoutes([]))
    name = (1 << 63) | (0 << 60) | (25 << 40) | (0x123 << 21) | 0x4567  # self-configurable, function 25
    claim = (6 << 26) | (0xEE << 16) | (0xFF << 8)
    rx.feed(claim | 0x21, name.to_bytes(8, "little"), 0.0)
    rx.feed(claim | 0x21, name.to_bytes(8, "little"), 0.1)  # the same again: no change
    rx.feed(claim | 0x22, name.to_bytes(8, "little"), 0.2)  # the NAME moved
    rx.feed(claim | j.NULL_ADDRESS, (name + 1).to_bytes(8, "little"), 0.3)  # cannot claim
    assert rx.consumed
    assert rx.claimed == [(0x21, None, name), (0x22, None, name)]
    assert rx.addresses.names == {0x22: name}
    assert (rx.addresses.claims, rx.addresses.cannot_claim) == (4, 1)
    fields = j.name_fields(name)
    assert (fields["function"], fields["manufacturer_code"], fields["identity_number"],
            fields["arbitrary_address_capable"]) == (25, 0x123, 0x4567, 1)


# -- replay of the real recordings --------------------------------------------------------------


def _log_census(path: Path) -> tuple[int, Counter[int], int]:
    """Independent of drivers/j1939: frames, extended frames by PGN (cantools), BAM announces."""
    frames, bams, pgns = 0, 0, Counter[int]()
    for msg in can.LogReader(str(path)):
        frames += 1
        if msg.is_extended_id:
            pgn = cantools.j1939.pgn_from_frame_id(msg.arbitration_id)
            pgns[pgn] += 1
            bams += pgn == 0xEC00 and msg.data[0] == 32
    return frames, pgns, bams


def test_replay_real_recording_decodes_by_pgn() -> None:
    frames, pgns, bams = _log_census(DEMO_LOG)
    before = replay(DEMO_LOG, DEMO_DBC, j1939="off")  # exact IDs: what the issue saw
    assert before["frames"] == frames and before["decoded"] == 0 and before["unknown_ids"] == frames
    after = replay(DEMO_LOG, DEMO_DBC)
    assert after["frames"] == frames
    assert after["decoded"] == pgns[0xF004] + pgns[0xFEF1] > 10_000  # every EEC1 and CCVS1 frame
    assert after["decode_errors"] == 0 and after["signals"] == ["EngineSpeed", "WheelBasedVehicleSpeed"]
    assert after["transport_frames"] == pgns[0xEC00] + pgns[0xEB00] + pgns[0xEE00]
    assert after["decoded"] + after["unknown_ids"] + after["transport_frames"] == frames
    j1939 = after["j1939"]
    assert j1939["tp_messages"] == bams > 100 and j1939["tp_errors"] == {}
    assert j1939["tp_unknown_pgn"] == bams  # DM1 and EC1: not in this two-message DBC


def test_replay_real_bam_recording_decodes_reassembled_pgs() -> None:
    _, _, bams = _log_census(TP_LOG)
    assert replay(TP_LOG, TP_DBC)["decoded"] == 0  # auto: the DBC does not say J1939
    ec1_announces = sum(1 for m in can.LogReader(str(TP_LOG)) if m.is_extended_id
                        and cantools.j1939.pgn_from_frame_id(m.arbitration_id) == 0xEC00
                        and m.data[0] == 32 and int.from_bytes(m.data[5:8], "little") == 0xFEE3)
    out = subprocess.run([sys.executable, "-m", "cerebellumd", "replay", str(TP_LOG), "--dbc", str(TP_DBC),
                          "--j1939", "on", "--json"], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["j1939"]["tp_messages"] == bams and result["j1939"]["tp_decoded"] == ec1_announces > 0
    assert result["j1939"]["tp_errors"] == {} and result["signals"] == ["EngineSpeedAtPoint5"]


# -- the daemon on virtual buses ----------------------------------------------------------------

_channels = itertools.count()


def metric(daemon: Daemon, metric_name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(metric_name, labels)
    return -1.0 if value is None else value


async def test_run_decodes_j1939_single_and_multi_packet_from_virtual_buses() -> None:
    n = next(_channels)
    engine, tp_bus = f"j1939-engine-{n}", f"j1939-tp-{n}"
    text = f"""
[daemon]
initial_state = "idle"
[prometheus]
enabled = false
[[can]]
name = "engine"
interface = "virtual"
channel = "{engine}"
dbc = "{DEMO_DBC}"
[[can]]
name = "body"
interface = "virtual"
channel = "{tp_bus}"
dbc = "{TP_DBC}"
dbc_strict = false
j1939 = "on"
[signals.rpm]
can = "EEC1.EngineSpeed"
bus = "engine"
[signals.speed]
can = "CCVS1.WheelBasedVehicleSpeed"
bus = "engine"
[signals.rpm_point5]
can = "EC1.EngineSpeedAtPoint5"
bus = "body"
"""
    demo, tp = cantools.database.load_file(str(DEMO_DBC)), cantools.database.load_file(str(TP_DBC), strict=False)
    eec1, ccvs1 = demo.get_message_by_name("EEC1"), demo.get_message_by_name("CCVS1")
    ec1 = tp.get_message_by_name("EC1")
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await daemon.async_start()
    a = await asyncio.to_thread(can.Bus, interface="virtual", channel=engine)
    b = await asyncio.to_thread(can.Bus, interface="virtual", channel=tp_bus)

    def send(bus: can.BusABC, can_id: int, data: bytes) -> None:
        bus.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=True))

    try:
        # The DBC says 0x0CF004FE and 0x18FEF1FE; the bus carries SA 0x00 and another priority.
        send(a, 0x0CF00400, eec1.encode({"EngineSpeed": 1234.5}))
        send(a, 0x0CFEF100, ccvs1.encode({"WheelBasedVehicleSpeed": 88.0}))
        # A 40-byte EC1 by BAM from SA 0x00, then a second one that stops out of order.
        payload = ec1.encode({s.name: 0 for s in ec1.signals} | {"EngineSpeedAtPoint5": 1500.0})
        for can_id, data in bam(0x00, 0xFEE3, payload):
            send(b, can_id, data)
        await until(lambda: {"rpm", "speed", "rpm_point5"} <= set(daemon.samples), what="three J1939 signals")
        assert daemon.samples["rpm"].value == pytest.approx(1234.5)
        assert daemon.samples["speed"].value == pytest.approx(88.0)
        assert daemon.samples["rpm_point5"].value == pytest.approx(1500.0)
        half = bam(0x00, 0xFEE3, ec1.encode({s.name: 0 for s in ec1.signals} | {"EngineSpeedAtPoint5": 600.0}))
        for can_id, data in [*half[:3], half[4], *half[5:]]:  # packet 4 missing
            send(b, can_id, data)
        name = (1 << 63) | (0 << 40) | 0x1234
        send(b, (6 << 26) | (0xEE << 16) | (0xFF << 8) | 0x00, name.to_bytes(8, "little"))
        await until(lambda: metric(daemon, "cerebellumd_j1939_address_claims_total", bus="body") == 1,
                    what="the address claim, after the broken BAM")
        assert metric(daemon, "cerebellumd_j1939_tp_errors_total", bus="body", kind="out_of_order") == 1
        assert metric(daemon, "cerebellumd_j1939_tp_messages_total", bus="body") == 1
        assert metric(daemon, "cerebellumd_j1939_node_info", bus="body", address="0x00",
                      name=f"{name:016x}") == 1
        assert daemon.samples["rpm_point5"].value == pytest.approx(1500.0)  # the half message never arrived
        assert metric(daemon, "cerebellumd_can_errors_total", bus="body", kind="unknown_id") == 0
        assert metric(daemon, "cerebellumd_j1939_tp_errors_total", bus="body", kind="unexpected") == 0
    finally:
        await asyncio.to_thread(a.shutdown)
        await asyncio.to_thread(b.shutdown)
        await daemon.async_stop()


def test_kernel_filters_accept_a_wanted_pgn_from_any_source_and_its_transport() -> None:
    from cerebellumd.config import CanBusConfig
    from cerebellumd.daemon.ingest import CanIngest
    from cerebellumd.daemon.metrics import Metrics
    from cerebellumd.drivers.dbc import load_dbc

    config = CanBusConfig(name="engine", interface="virtual", channel="unused", dbc=str(DEMO_DBC))
    ingest = CanIngest(config, load_dbc(str(DEMO_DBC)), {("EEC1", "EngineSpeed"): "rpm"}, lambda s, t: None,
                       Metrics(buses=["engine"]))

    def accepted(can_id: int) -> bool:
        return any(f["extended"] and can_id & f["can_mask"] == f["can_id"] & f["can_mask"] for f in ingest.can_filters)

    assert accepted(0x0CF00400) and accepted(0x18F00417)  # EEC1, any priority and source
    assert accepted(0x1CECFF00) and accepted(0x1CEBFF00) and accepted(0x18EEFF21)  # TP.CM, TP.DT, claims
    assert not accepted(0x0CFEF100)  # CCVS1: no signal wants it
