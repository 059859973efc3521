"""The C reference of the MCU side (firmware/mcu-link/), built here with the system C compiler.

1. Shared test vectors: the frames and streams documented in docs/mcu-protocol.md are encoded and
   parsed by both the Python reference (drivers/mcu_protocol.py) and the C codec (its harness
   `mcu-vectors`), byte for byte, CRC and error counters included; then random and corrupted
   streams through both parsers must give the same messages and counters.
2. The C firmware's host build as the MCU on a real pty: against the Python codec directly (rail
   commands, ACK/NACK codes, the non-blocking power cycle), and against a real `cerebellumd run`
   (heartbeats keep the link up, rail readings arrive as domain power and energy, the wake line
   wakes the accelerator through the `mcu` driver, garbage on the line is counted and the link
   keeps working). The daemon is checked only through its /metrics endpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cerebellumd.drivers.mcu_protocol import (
    MAX_FRAME,
    MAX_PAYLOAD,
    SOF,
    Ack,
    Body,
    FrameParser,
    Heartbeat,
    Message,
    MsgType,
    Nack,
    NackCode,
    NextWake,
    PowerDownAllowed,
    RailAction,
    RailCommand,
    Readings,
    SleepRequest,
    WakeRequest,
    crc16,
    encode,
    message_type,
)

from .helpers import free_port
from .test_hil import scrape, total

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "mcu-link"
DOC = ROOT / "docs" / "mcu-protocol.md"
CORE = ("mcu_proto.c", "mcu_ring.c", "mcu_app.c")
# The flags of firmware/mcu-link/Makefile (the issue asks for at least -std=c99 -Wall -Wextra -Werror).
CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wshadow", "-Wconversion",
          "-Wstrict-prototypes", "-O2")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


CC = _compiler()
pytestmark = pytest.mark.skipif(
    CC is None, reason="no C compiler (cc, gcc or clang) on PATH to build firmware/mcu-link")


@dataclasses.dataclass(frozen=True)
class Build:
    host: Path  # mcu-link-host: the firmware on a pty
    vectors: Path  # mcu-vectors: the codec harness
    objects: tuple[Path, ...]  # the portable core, compiled alone


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    assert CC is not None
    out = tmp_path_factory.mktemp("firmware")

    def cc(*args: str | Path) -> None:
        proc = subprocess.run([CC, *CFLAGS, *map(str, args)], cwd=FIRMWARE, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{CC} {' '.join(map(str, args))}:\n{proc.stderr}"
        assert proc.stderr == "", proc.stderr  # no warnings either

    cc("-o", out / "mcu-link-host", "main_host.c", *CORE)
    cc("-o", out / "mcu-vectors", "vectors_host.c", "mcu_proto.c")
    objects = []
    for source in CORE:
        obj = out / source.replace(".c", ".o")
        cc("-c", "-o", obj, source)
        objects.append(obj)
    return Build(out / "mcu-link-host", out / "mcu-vectors", tuple(objects))


# -- the vectors in docs/mcu-protocol.md -------------------------------------------------------------

BODY_OF: dict[str, type] = {"HEARTBEAT": Heartbeat, "WAKE_REQUEST": WakeRequest, "SLEEP_REQUEST": SleepRequest,
                            "READINGS": Readings, "RAIL_COMMAND": RailCommand, "POWER_DOWN_ALLOWED": PowerDownAllowed,
                            "NEXT_WAKE": NextWake, "ACK": Ack, "NACK": Nack}


def doc_table(name: str) -> list[list[str]]:
    text = DOC.read_text("utf-8")
    start, end = f"<!-- mcu-vectors:{name} -->", f"<!-- /mcu-vectors:{name} -->"
    assert start in text and end in text, f"docs/mcu-protocol.md has no {name} vectors"
    lines = [line for line in text.split(start)[1].split(end)[0].splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]
    assert rows, f"empty {name} table"
    return rows


def doc_bytes(cell: str) -> bytes:
    out = bytearray()
    for token in cell.strip("`").split():
        byte, _, count = token.partition("*")
        out += bytes.fromhex(byte) * (int(count) if count else 1)
    return bytes(out)


def doc_fields(text: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in (item.split("=") for item in text.split())}


def make_body(name: str, fields: dict[str, int]) -> Body:
    cls = BODY_OF[name]
    names = [f.name for f in dataclasses.fields(cls)]
    assert sorted(fields) == sorted(names), f"{name}: the document names {sorted(fields)}, the payload {names}"
    values: dict[str, Any] = dict(fields)
    if cls is Readings:
        values["rail_on"] = bool(values["rail_on"])
    if cls is RailCommand:
        values["action"] = RailAction(values["action"])
    if cls is PowerDownAllowed:
        values["allow"] = bool(values["allow"])
    return cls(**values)  # type: ignore[no-any-return]


def body_values(body: Body) -> list[int]:
    return [int(getattr(body, f.name)) for f in dataclasses.fields(body)]  # type: ignore[arg-type]


def msg_line(message: Message) -> str:
    """A decoded message as the C harness prints it."""
    values = " ".join(str(v) for v in body_values(message.body))
    return f"msg {message.seq} 0x{message_type(message.body):02x} {values}"


COUNTER_ORDER = ("frames", "crc", "length", "version", "unknown_type", "bad_value", "garbage_bytes")


def py_parse(stream: bytes) -> list[str]:
    """The Python parser's view of a stream, in the C harness's output format."""
    parser = FrameParser()
    lines = [msg_line(m) for m in parser.feed(stream)]
    counters = " ".join(str(parser.counters[k]) for k in COUNTER_ORDER)
    return [*lines, f"counters {counters} {parser.buffered}"]


def run_harness(build: Build, commands: list[str]) -> list[str]:
    proc = subprocess.run([build.vectors], input="\n".join(commands) + "\n", capture_output=True, text=True,
                          timeout=60, check=True)
    return proc.stdout.splitlines()


def c_parse_many(build: Build, streams: list[bytes]) -> list[list[str]]:
    """Every stream through a fresh C parser; one list of output lines per stream."""
    out = run_harness(build, [f"parse {s.hex()}" for s in streams])
    results: list[list[str]] = [[]]
    for line in out:
        assert not line.startswith("error"), line
        results[-1].append(line)
        if line.startswith("counters "):
            results.append([])
    assert results[-1] == [] and len(results) == len(streams) + 1
    return results[:-1]


def c_encode_command(seq: int, body: Body) -> str:
    return f"encode 0x{message_type(body):02x} {seq} " + " ".join(str(v) for v in body_values(body))


FRAMES = doc_table("frames")
STREAMS = doc_table("streams")


def test_the_core_builds_warning_free_and_needs_no_heap_and_no_os(build: Build) -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to list the core's undefined symbols")

    def symbols(*flags: str) -> set[str]:
        out = subprocess.run([nm, *flags, *map(str, build.objects)], capture_output=True, text=True, check=True,
                             timeout=30).stdout
        return {line.split()[-1] for line in out.splitlines() if line.strip() and not line.endswith(":")}

    external = symbols("-u") - symbols("--defined-only")
    # Only the C library's string helpers (every embedded toolchain has them): no malloc, no stdio,
    # no syscalls, no floating-point runtime.
    assert external <= {"memset", "memmove", "memcpy"}, external
    assert "mcu_parser_push" in symbols("--defined-only")


def test_crc_matches_the_check_value_and_python_on_random_data(build: Build) -> None:
    rng = random.Random(16)
    data = [b"123456789", b"", *(rng.randbytes(rng.randint(1, 80)) for _ in range(200))]
    out = run_harness(build, [f"crc {d.hex()}" for d in data])
    assert out[0] == "crc 29b1"
    assert out == [f"crc {crc16(d):04x}" for d in data]


@pytest.mark.parametrize("row", FRAMES, ids=[f"{r[0]}-seq{r[1]}" for r in FRAMES])
def test_documented_frames_encode_and_decode_identically(build: Build, row: list[str]) -> None:
    name, seq_text, fields, frame_cell = row
    seq, body, frame = int(seq_text), make_body(name, doc_fields(fields)), doc_bytes(frame_cell)
    assert encode(body, seq) == frame, "Python encoding differs from the document"
    c_frame, c_parsed, c_counters = run_harness(build, [c_encode_command(seq, body), f"parse {frame.hex()}"])
    assert c_frame == f"frame {frame.hex()}", "C encoding differs from the document"
    assert FrameParser().feed(frame) == [Message(seq, body)]
    assert [c_parsed, c_counters] == py_parse(frame)
    assert c_counters == "counters 1 0 0 0 0 0 0 0"


@pytest.mark.parametrize("row", STREAMS, ids=[r[0] for r in STREAMS])
def test_documented_streams_decode_and_count_identically(build: Build, row: list[str]) -> None:
    _, stream_cell, decoded, counted = row
    stream = doc_bytes(stream_cell)
    expected_msgs = []
    if decoded:
        name, seq_field, *rest = decoded.split()
        seq = int(seq_field.removeprefix("seq="))
        expected_msgs.append(Message(seq, make_body(name, doc_fields(" ".join(rest)))))
    want = {k: 0 for k in (*COUNTER_ORDER, "buffered")} | doc_fields(counted)
    expected = [*(msg_line(m) for m in expected_msgs),
                "counters " + " ".join(str(want[k]) for k in (*COUNTER_ORDER, "buffered"))]
    parser = FrameParser()
    assert parser.feed(stream) == expected_msgs
    assert py_parse(stream) == expected, "the Python parser differs from the document"
    assert c_parse_many(build, [stream]) == [expected], "the C parser differs from the document"


def _random_stream(rng: random.Random) -> bytes:
    """Valid frames, corrupted frames, SOF-laden garbage and truncations, mixed."""
    bodies: list[Body] = [
        Heartbeat(rng.getrandbits(32), rng.getrandbits(16)), WakeRequest(rng.getrandbits(8)),
        SleepRequest(rng.getrandbits(8)),
        Readings(rng.getrandbits(16), rng.randint(-32768, 32767), rng.randint(-32768, 32767), rng.getrandbits(16),
                 rng.getrandbits(16), rng.getrandbits(32), rng.random() < 0.5),
        RailCommand(rng.choice(list(RailAction))), Ack(rng.getrandbits(8), rng.getrandbits(8)),
        PowerDownAllowed(rng.random() < 0.5, rng.getrandbits(16), rng.getrandbits(8)),
        NextWake(rng.choice([0, rng.randint(0, 2_000_000), rng.getrandbits(32)]), rng.getrandbits(8)),
        Nack(rng.getrandbits(8), rng.getrandbits(8), rng.getrandbits(8)),
    ]
    out = bytearray()
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        frame = bytearray(encode(rng.choice(bodies), rng.getrandbits(8)))
        if kind < 0.35:
            out += frame
        elif kind < 0.55:  # one corrupted byte anywhere
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            out += frame
        elif kind < 0.65:  # truncated
            out += frame[: rng.randrange(1, len(frame))]
        elif kind < 0.75:  # good CRC, content we do not understand
            payload = rng.randbytes(rng.randint(0, MAX_PAYLOAD))
            inner = bytes((1, rng.choice([0x01, 0x04, 0x10, 0x11, 0x12, 0x55, 0x7E]), rng.getrandbits(8),
                           len(payload))) + payload
            out += SOF + inner + crc16(inner).to_bytes(2, "big")
        elif kind < 0.85:  # a header claiming a long payload, swallowing what follows
            out += SOF + bytes((rng.choice([1, 1, 2]), 1, 0, rng.randint(0, 255)))
        else:  # garbage, rich in SOF bytes
            out += bytes(rng.choice([0xA5, 0x5A, 0x01, 0x00, rng.getrandbits(8)]) for _ in range(rng.randint(1, 90)))
    return bytes(out)


def test_random_and_corrupted_streams_give_the_same_messages_and_counters(build: Build) -> None:
    rng = random.Random(1616)
    streams = [_random_stream(rng) for _ in range(600)]
    c_results = c_parse_many(build, streams)
    decoded = 0
    for stream, c_lines in zip(streams, c_results, strict=True):
        assert c_lines == py_parse(stream), stream.hex()
        decoded += len(c_lines) - 1
    assert decoded > 300  # the streams did carry frames (not only noise)


def test_the_parser_is_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    assert CC is not None
    binary = tmp_path / "mcu-vectors-asan"
    proc = subprocess.run([CC, *CFLAGS, "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                           "-o", str(binary), "vectors_host.c", "mcu_proto.c"],
                          cwd=FIRMWARE, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "sanitize" in proc.stderr:
        pytest.skip(f"{CC} cannot build with -fsanitize=address,undefined: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    rng = random.Random(4242)
    streams = [_random_stream(rng) for _ in range(500)] + [rng.randbytes(rng.randint(0, 2000)) for _ in range(50)]
    run = subprocess.run([binary], input="".join(f"parse {s.hex()}\n" for s in streams), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-3000:]
    assert run.stdout.count("counters ") == len(streams)


def test_every_single_bit_error_is_rejected_by_both(build: Build) -> None:
    frames = [doc_bytes(row[3]) for row in FRAMES]
    streams = []
    for frame in frames:
        for i in range(len(frame) * 8):
            bad = bytearray(frame)
            bad[i // 8] ^= 1 << (i % 8)
            streams.append(bytes(bad))
    for stream, c_lines in zip(streams, c_parse_many(build, streams), strict=True):
        assert c_lines == py_parse(stream), stream.hex()
        assert not any(line.startswith("msg ") for line in c_lines), stream.hex()


# -- the firmware on a pty ---------------------------------------------------------------------------


class Firmware:
    """The host build as a subprocess: control lines on stdin, JSON events from stdout."""

    def __init__(self, binary: Path, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self.expect(lambda e: e["event"] == "ready", 10, "the firmware's ready line")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def command(self, line: str) -> None:
        self.send(line)
        word = line.split()[0]
        self.expect(lambda e: e["event"] in ("ok", "error") and e.get("command", word) == word, 5, line)
        assert self.events[-1]["event"] == "ok", self.events[-1]

    def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The next event (after those already seen) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"firmware: no {what} within {timeout} s; events: {self.events[-10:]}")
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                raise AssertionError(f"firmware exited ({self.proc.poll()}) waiting for {what}; "
                                     f"stderr: {self.stderr()}")
            self.events.append(event)
            if predicate(event):
                return event

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        return self.expect(lambda e: e["event"] == "stats", 5, "stats")

    def stderr(self) -> str:
        return "" if self.proc.stderr is None or self.proc.poll() is None else self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class GatewaySide:
    """The slave end of a pty, read with the Python reference parser (what McuLink does)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.parser = FrameParser()
        self.messages: list[Message] = []
        self.cursor = 0  # messages before this index were looked at by an earlier wait()
        self.seq = 0

    def send(self, body: Body, *, raw: bytes | None = None) -> int:
        self.seq = (self.seq + 1) & 0xFF
        os.write(self.fd, raw if raw is not None else encode(body, self.seq))
        return self.seq

    def wait(self, predicate: Callable[[Message], bool], timeout: float, what: str) -> Message:
        """The first message after the previous match that satisfies `predicate`; reads the pty
        (select() with a deadline) until it comes."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self.cursor, len(self.messages)):
                if predicate(self.messages[i]):
                    self.cursor = i + 1
                    return self.messages[i]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"gateway side: no {what} within {timeout} s; last: {self.messages[-5:]}")
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                self.messages += self.parser.feed(os.read(self.fd, 4096))


@pytest.fixture
def pty_firmware(build: Build) -> Iterator[tuple[Firmware, GatewaySide]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    fw = Firmware(build.host, "--fd", str(master), "--heartbeat-ms", "50", "--readings-ms", "100",
                  "--reset-ms", "300", pass_fds=(master,))
    os.close(master)  # the firmware has its own copy
    try:
        yield fw, GatewaySide(slave)
    finally:
        fw.stop()
        os.close(slave)


def _is(kind: type, **fields: Any) -> Callable[[Message], bool]:
    return lambda m: isinstance(m.body, kind) and all(getattr(m.body, k) == v for k, v in fields.items())


def test_firmware_speaks_the_protocol_to_the_python_codec(pty_firmware: tuple[Firmware, GatewaySide]) -> None:
    fw, gw = pty_firmware
    hb = gw.wait(_is(Heartbeat), 5, "HEARTBEAT")
    assert isinstance(hb.body, Heartbeat) and hb.body.status == 0x0001  # ignition on, rail off
    off = gw.wait(_is(Readings), 5, "READINGS")
    assert off.body == Readings(12_600, 350, 450, 0, 0, 0, rail_on=False)

    # ON: ACK with the command's seq, then READINGS with the rail on (5 V x 1.2 A = 6 W).
    seq = gw.send(RailCommand(RailAction.ON))
    gw.wait(_is(Ack, acked_seq=seq, acked_type=MsgType.RAIL_COMMAND), 5, "ACK of ON")
    on = gw.wait(_is(Readings, rail_on=True), 5, "READINGS with the rail on")
    assert (on.body.rail_mv, on.body.rail_ma, on.body.rail_mw) == (5_000, 1_200, 6_000)  # type: ignore[union-attr]
    gw.wait(_is(Heartbeat, status=0x0003), 5, "HEARTBEAT with RAIL_ON")
    seq = gw.send(RailCommand(RailAction.ON))  # idempotent: ACKed again
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK of a repeated ON")

    # RESET: off for --reset-ms, the ACK only when back on; a command meanwhile is BUSY.
    t0 = time.monotonic()
    reset = gw.send(RailCommand(RailAction.RESET))
    busy = gw.send(RailCommand(RailAction.OFF))
    gw.wait(_is(Nack, acked_seq=busy, code=NackCode.BUSY), 5, "NACK BUSY during the power cycle")
    gw.wait(_is(Readings, rail_on=False), 5, "READINGS during the power cycle")
    gw.wait(_is(Ack, acked_seq=reset), 5, "ACK of RESET")
    assert time.monotonic() - t0 >= 0.3 - 0.002  # the firmware counts whole milliseconds
    gw.wait(_is(Readings, rail_on=True), 5, "READINGS after the power cycle")

    # A good-CRC command with an out-of-range action: NACK BAD_ARGUMENT at once.
    inner = bytes((1, MsgType.RAIL_COMMAND, (gw.seq + 1) & 0xFF, 1, 7))
    seq = gw.send(RailCommand(RailAction.ON), raw=SOF + inner + crc16(inner).to_bytes(2, "big"))
    gw.wait(_is(Nack, acked_seq=seq, code=NackCode.BAD_ARGUMENT), 5, "NACK BAD_ARGUMENT")

    # The load switch fails: NACK FAULT, and READINGS tell the rail's real state.
    fw.command("fault 1")
    seq = gw.send(RailCommand(RailAction.OFF))
    gw.wait(_is(Nack, acked_seq=seq, code=NackCode.FAULT), 5, "NACK FAULT")
    gw.wait(_is(Readings, rail_on=True), 5, "READINGS still on after the fault")
    fw.command("fault 0")

    # A wake request is repeated with the same seq until it is ACKed.
    fw.command("wake 3")
    first = gw.wait(_is(WakeRequest, reason=3), 5, "WAKE_REQUEST")
    again = gw.wait(_is(WakeRequest, reason=3), 5, "the WAKE_REQUEST repeated")
    assert again.seq == first.seq
    gw.send(Ack(first.seq, MsgType.WAKE_REQUEST))
    acked = fw.expect(lambda e: e["event"] == "request_acked", 5, "request_acked")
    assert (acked["kind"], acked["seq"]) == ("wake", first.seq) and acked["tries"] >= 2

    # Garbage from the gateway side is counted by the firmware's parser, which then resyncs.
    before = fw.stats()
    os.write(gw.fd, bytes(range(0x10, 0x60)))  # 80 bytes, no SOF
    seq = gw.send(RailCommand(RailAction.OFF))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK after garbage")
    after = fw.stats()
    assert after["garbage_bytes"] - before["garbage_bytes"] == 80
    assert after["frames"] - before["frames"] == 1
    assert gw.parser.counters["garbage_bytes"] == 0 and gw.parser.counters["crc"] == 0


def test_firmware_power_down_and_next_wake(pty_firmware: tuple[Firmware, GatewaySide]) -> None:
    fw, gw = pty_firmware
    gw.wait(_is(Heartbeat), 5, "HEARTBEAT")
    fw.command("ignition 0")  # parked: the key would cancel a power-down

    # POWER_DOWN_ALLOWED: ACKed at once; a repeat (same seq, same payload: our ACK was "lost") is
    # ACKed again and does not restart the delay; the gateway's supply is cut after after_s.
    t0 = time.monotonic()
    body = PowerDownAllowed(True, 1, 8)
    seq = gw.send(body)
    gw.wait(_is(Ack, acked_seq=seq, acked_type=MsgType.POWER_DOWN_ALLOWED), 5, "ACK of POWER_DOWN_ALLOWED")
    event = fw.expect(lambda e: e["event"] == "power_down", 5, "power_down")
    assert (event["allow"], event["after_s"], event["reason"], event["seq"]) == (1, 1, 8, seq)
    os.write(gw.fd, encode(body, seq))
    gw.wait(_is(Ack, acked_seq=seq, acked_type=MsgType.POWER_DOWN_ALLOWED), 5, "ACK of the repeat")
    cut = fw.expect(lambda e: e["event"] == "gateway_power", 5, "the gateway's supply cut")
    assert (cut["on"], cut["reason"]) == (False, 8)
    assert 1.0 - 0.002 <= time.monotonic() - t0 < 1.5  # from the first frame, not the repeat
    stats = fw.stats()
    assert (stats["power_commands"], stats["command_repeats"], stats["gateway_cuts"]) == (2, 1, 1)
    assert stats["gateway_on"] is False and stats["unknown_type"] == 0

    # NEXT_WAKE: ACKed; at its time the MCU powers the gateway and asks for a wake (reason timer),
    # repeated until ACKed like any request.
    t0 = time.monotonic()
    seq = gw.send(NextWake(1, 4))
    gw.wait(_is(Ack, acked_seq=seq, acked_type=MsgType.NEXT_WAKE), 5, "ACK of NEXT_WAKE")
    event = fw.expect(lambda e: e["event"] == "next_wake", 5, "next_wake")
    assert (event["wake_in_s"], event["reason"]) == (1, 4)
    on = fw.expect(lambda e: e["event"] == "gateway_power", 5, "the gateway powered again")
    assert (on["on"], on["reason"]) == (True, 4) and time.monotonic() - t0 >= 1.0 - 0.002
    wake = gw.wait(_is(WakeRequest, reason=4), 5, "WAKE_REQUEST reason timer")
    gw.send(Ack(wake.seq, MsgType.WAKE_REQUEST))
    fw.expect(lambda e: e["event"] == "request_acked" and e["kind"] == "wake", 5, "request_acked")

    # A cancelled wake and a cancelled power-down change nothing.
    seq = gw.send(NextWake(1, 4))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK")
    seq = gw.send(NextWake(0, 0))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK of the cancel")
    seq = gw.send(PowerDownAllowed(True, 1, 9))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK")
    seq = gw.send(PowerDownAllowed(False, 0, 0))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK of the revoke")
    t_cancel = time.monotonic()
    # Ignition on powers a cut gateway and cancels a pending cut.
    seq = gw.send(PowerDownAllowed(True, 0, 8))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK")
    fw.expect(lambda e: e["event"] == "gateway_power" and e["on"] is False, 5, "an immediate cut")
    seq = gw.send(PowerDownAllowed(True, 1, 8))
    gw.wait(_is(Ack, acked_seq=seq), 5, "ACK")
    fw.command("ignition 1")
    back = fw.expect(lambda e: e["event"] == "gateway_power", 5, "the key powers the gateway")
    assert (back["on"], back["reason"]) == (True, 1)
    # Past every delay: nothing else happened (no cut, no timer wake).
    gw.wait(_is(Heartbeat, status=0x0001), 5, "HEARTBEAT with the key on")
    while time.monotonic() - t_cancel < 1.3:
        gw.wait(_is(Heartbeat), 5, "HEARTBEAT")
    stats = fw.stats()
    assert (stats["gateway_cuts"], stats["timer_wakes"], stats["gateway_on"]) == (2, 1, True)
    assert not [e for e in fw.events if e["event"] == "gateway_power"][4:]

    # Good CRC, bad field: NACK BAD_ARGUMENT at once (the gateway need not wait for its timeout).
    for mtype, payload in ((MsgType.POWER_DOWN_ALLOWED, bytes((2, 0, 30, 8))),
                           (MsgType.NEXT_WAKE, (2_000_001).to_bytes(4, "big") + b"\x04"),
                           (MsgType.NEXT_WAKE, b"\x00\x00\x01")):
        inner = bytes((1, mtype, (gw.seq + 1) & 0xFF, len(payload))) + payload
        seq = gw.send(Ack(0, 0), raw=SOF + inner + crc16(inner).to_bytes(2, "big"))
        gw.wait(_is(Nack, acked_seq=seq, acked_type=mtype, code=NackCode.BAD_ARGUMENT), 5, f"NACK of {mtype.name}")


# -- against `cerebellumd run` -----------------------------------------------------------------------

RUN_CONFIG = """
[daemon]
node = "fw"
tick_ms = 10
initial_state = "off"
safe_state = "off"

[accelerator]
profile = "orin_nano"
driver = "mcu"                          # the rail is the C firmware's load switch
options = {{ ack_timeout_ms = 1000, confirm_timeout_ms = 2000 }}
retry_backoff_ms = 200

[mcu]
port = "{port}"
heartbeat_timeout_ms = 800
reconnect_initial_ms = 50
reconnect_max_ms = 200

[signals.battery_v]
mcu = "battery_v"
max_age_ms = 1500

[signals.accel_temp_c]
mcu = "accel_temp_c"
max_age_ms = 1500

[signals.ignition]
mcu = "ignition"
max_age_ms = 1500

[signals.mcu_wake_request]
mcu = "wake_request"
max_age_ms = 1500

[[demands]]
name = "mcu_wake"
when = "mcu_wake_request == 1"
class = "normal"
confirm_ms = 0
deadline_ms = 1500

[policy]
release_ms = 500
min_dwell_ms = 0

[guards]
battery_signal = "battery_v"
battery_min_v = 11.6
temperature_signal = "accel_temp_c"
temperature_max_c = 95

[power]
rail_interval_ms = 100

[power.rails]
board = "mcu-bench"
independent = {{ VDD_ACCEL = "accelerator" }}

[power.rail_sensors.VDD_ACCEL]
driver = "mcu"                          # rail_mw of the firmware's READINGS

[[power.domains]]
name = "accelerator"
source = "mcu"

[[power.domains]]
name = "gateway"
source = "constant"
watts = 3.5

[prometheus]
address = "127.0.0.1"
port = {metrics_port}
"""


def poll(predicate: Callable[[], Any], timeout: float, what: str, daemon: subprocess.Popen[str], log: Path) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` s or if the daemon died."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.poll() is not None:
            raise AssertionError(f"cerebellumd exited with {daemon.returncode}\n{log.read_text()[-3000:]}")
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:]}")
        time.sleep(0.05)  # polling interval of a deadline loop, not a wait for an event


def _scrape(port: int) -> dict[Any, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_c_firmware_against_cerebellumd_run(build: Build, tmp_path: Path) -> None:
    link = tmp_path / "mcu"  # a symlink to the firmware's pty, as /dev/serial/by-id/... on a bench
    fw = Firmware(build.host, "--pty", str(link), "--heartbeat-ms", "100", "--readings-ms", "100",
                  "--retry-ms", "1000")  # the ACK comes long before a repeat
    daemon: subprocess.Popen[str] | None = None
    log = tmp_path / "run.log"
    try:
        assert link.is_symlink() and os.readlink(link) == fw.ready["path"]
        metrics_port = free_port()
        config = tmp_path / "run.toml"
        config.write_text(RUN_CONFIG.format(port=link, metrics_port=metrics_port))
        with log.open("w") as err:
            daemon = subprocess.Popen([sys.executable, "-m", "cerebellumd", "run", "--config", str(config)],
                                      stdout=subprocess.DEVNULL, stderr=err, text=True)

        def metrics() -> dict[Any, float]:
            return poll(lambda: _scrape(metrics_port), 30, "the metrics endpoint", daemon, log)

        def wait(what: str, check: Callable[[dict[Any, float]], bool], timeout: float = 15) -> dict[Any, float]:
            return poll(lambda: (m := _scrape(metrics_port)) is not None and check(m) and m, timeout, what,
                        daemon, log)

        def unpowered(m: dict[Any, float]) -> bool:
            # The rail is off; the driver labels it with the policy's resting state (sleep or off).
            return sum(total(m, "cerebellumd_accelerator_state", state=s) for s in ("off", "sleep")) == 1

        def errors(m: dict[Any, float], kind: str) -> float:
            return total(m, "cerebellumd_mcu_errors_total", kind=kind)

        # Heartbeats and readings: the link is up and the MCU-fed signals are fresh.
        metrics()
        m = wait("the link up with fresh MCU signals", lambda m: total(m, "cerebellumd_mcu_link_up") == 1
                 and all(total(m, "cerebellumd_signal_stale", signal=s) == 0
                         for s in ("battery_v", "accel_temp_c", "ignition", "mcu_wake_request")))
        rx = total(m, "cerebellumd_mcu_frames_total", direction="rx")
        # At start the accelerator may still be settling (read back unknown or mid-transition):
        # wait for the rail's resting state rather than catch the first scrape.
        m = wait("the accelerator resting, its rail off", unpowered)
        assert total(m, "cerebellumd_domain_power_watts", domain="accelerator", source="sensor") == 0
        assert all(errors(m, k) == 0 for k in ("crc", "length", "version", "unknown_type", "bad_value"))
        wait("more frames", lambda m: total(m, "cerebellumd_mcu_frames_total", direction="rx") >= rx + 10)

        # Garbage on the line: counted byte for byte, a bad CRC counted once, the link stays up.
        m = metrics()
        garbage, crc = errors(m, "garbage_bytes"), errors(m, "crc")
        fw.command("noise 500")  # no 0xA5 in it: exactly 500 garbage bytes, no frame lost
        m = wait("500 garbage bytes", lambda m: errors(m, "garbage_bytes") >= garbage + 500)
        assert errors(m, "garbage_bytes") == garbage + 500
        fw.command("badcrc")
        m = wait("a CRC error", lambda m: errors(m, "crc") == crc + 1)
        fw.command("garbage 700 7")  # any bytes, SOFs and fake headers included
        m = wait("random garbage counted", lambda m: errors(m, "garbage_bytes") >= garbage + 500 + 700)
        rx = total(m, "cerebellumd_mcu_frames_total", direction="rx")
        m = wait("frames flowing again", lambda m: total(m, "cerebellumd_mcu_frames_total", direction="rx") >= rx + 5)
        assert total(m, "cerebellumd_mcu_link_up") == 1
        assert errors(m, "stale") == 0 and errors(m, "connections_lost") == 0

        # The wake line: WAKE_REQUEST (ACKed by the daemon) -> demand -> RAIL_COMMAND ON -> 6 W measured.
        fw.command("wakeline 1")
        acked = fw.expect(lambda e: e["event"] == "request_acked", 5, "the daemon's ACK of the wake request")
        assert acked["kind"] == "wake" and acked["reason"] == 2  # CAN activity, the wake line's default
        rail = fw.expect(lambda e: e["event"] == "rail", 10, "RAIL_COMMAND from the daemon")
        assert (rail["action"], rail["result"], rail["rail_on"]) == ("on", "ack", True)
        m = wait("the accelerator active on 6 W", lambda m:
                 total(m, "cerebellumd_accelerator_state", state="active") == 1
                 and total(m, "cerebellumd_domain_power_watts", domain="accelerator", source="sensor") == 6.0)
        assert total(m, "cerebellumd_mcu_requests_total", kind="wake") == 1
        assert total(m, "cerebellumd_wakes_total", reason="demand:mcu_wake") == 1
        assert total(m, "cerebellumd_rail_power_watts", rail="VDD_ACCEL") == 6.0
        energy = total(m, "cerebellumd_domain_energy_joules_total", domain="accelerator")
        t_on = time.monotonic()
        m = wait("energy integrated from the rail", lambda m:
                 total(m, "cerebellumd_domain_energy_joules_total", domain="accelerator") >= energy + 3.0)
        # 6 W: about 6 J per second of wall time (the daemon integrates between its readings).
        joules = total(m, "cerebellumd_domain_energy_joules_total", domain="accelerator") - energy
        assert joules <= 6.0 * (time.monotonic() - t_on) + 1.5

        # Releasing the line: SLEEP_REQUEST -> after release_ms the daemon switches the rail off.
        fw.command("wakeline 0")
        acked = fw.expect(lambda e: e["event"] == "request_acked", 5, "the daemon's ACK of the sleep request")
        assert acked["kind"] == "sleep"
        rail = fw.expect(lambda e: e["event"] == "rail", 10, "RAIL_COMMAND OFF from the daemon")
        assert (rail["action"], rail["result"], rail["rail_on"]) == ("off", "ack", False)
        m = wait("the accelerator unpowered at 0 W", lambda m: unpowered(m)
                 and total(m, "cerebellumd_domain_power_watts", domain="accelerator", source="sensor") == 0)
        assert total(m, "cerebellumd_mcu_requests_total", kind="sleep") == 1
        assert total(m, "cerebellumd_actuation_failures_total") == 0

        # Silence: the link goes stale, and comes back with the heartbeats.
        fw.command("silent 1")
        wait("the link stale", lambda m: total(m, "cerebellumd_mcu_link_up") == 0 and errors(m, "stale") == 1)
        fw.command("silent 0")
        wait("the link up again", lambda m: total(m, "cerebellumd_mcu_link_up") == 1)
        stats = fw.stats()
        assert stats["crc"] == 0 and stats["garbage_bytes"] == 0  # the daemon's frames reached us clean
        assert stats["rail_commands"] >= 2 and stats["ring_overruns"] == 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        fw.stop()
    assert daemon.returncode == 0, log.read_text()[-3000:]
    assert not link.exists()  # the firmware removed its symlink


def test_makefile_flags_are_the_tested_ones() -> None:
    """The Makefile builds with the flags this test compiles with (so `make` is what CI checks)."""
    text = (FIRMWARE / "Makefile").read_text("utf-8")
    warn = re.search(r"^WARN = (.*)$", text, re.MULTILINE)
    assert warn is not None
    assert tuple(warn.group(1).split()) == tuple(f for f in CFLAGS if f != "-O2")
    assert MAX_FRAME == 72  # the C header's MCU_MAX_FRAME
    assert "#define MCU_MAX_PAYLOAD 64u" in (FIRMWARE / "mcu_proto.h").read_text("utf-8")
