"""Lease server over a real Unix socket: real clients (in-process connections and a separate
OS process) acquire, renew, release and vanish; bad requests are answered and counted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cerebellumd.accel import AcceleratorModel, AccelState
from cerebellumd.daemon.leases import (
    HOLD_PRIORITY,
    LeaseConfig,
    LeasePriority,
    LeaseServer,
    LeaseServerError,
)
from cerebellumd.policies.cerebellum import CerebellumFirst
from cerebellumd.policies.types import HoldMode, Inputs, PolicyParams
from cerebellumd.profiles import load_profile

WAIT_S = 10.0


class Clock:
    """Monotonic time under the test's control (the transport stays real)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="cbl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def server(sock_dir: Path, clock: Clock) -> AsyncIterator[LeaseServer]:
    cfg = LeaseConfig(enabled=True, path=sock_dir / "leases.sock", max_leases_per_client=3,
                      max_line_bytes=256, max_ttl_s=600, override_grace_s=20)
    async with LeaseServer(cfg, clock=clock) as srv:
        yield srv


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict[str, Any]] = []  # unsolicited lines (a lease ended), in order

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def raw(self, line: bytes) -> dict[str, Any]:
        self.writer.write(line)
        await self.writer.drain()
        return await self.next_reply()

    async def next_line(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            line = await self.reader.readline()
        assert line, "server closed the connection"
        body: dict[str, Any] = json.loads(line)
        return body

    async def next_reply(self) -> dict[str, Any]:
        """The next reply, keeping the unsolicited event lines met on the way."""
        while "event" in (body := await self.next_line()):
            self.events.append(body)
        return body

    async def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        body = await self.next_line()
        assert "event" in body, body
        return body

    async def send(self, **request: Any) -> dict[str, Any]:
        return await self.raw(json.dumps(request).encode() + b"\n")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def until(srv: LeaseServer, predicate: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        await srv.wait_until(predicate)


async def test_acquire_renew_release(server: LeaseServer, clock: Clock) -> None:
    c = await Client.connect(server.config.path)
    r = await c.send(op="acquire", max_duration_s=600, app="lane_assist", reason="highway", ttl_s=30,
                     priority="safety", mode="awake", seq=7)
    assert r["ok"] and r["seq"] == 7 and r["expires_in_s"] == 30
    (hold,) = server.holds(clock.t)
    assert (hold.id, hold.owner, hold.mode, hold.priority) == (
        r["id"], "app:lane_assist", HoldMode.AWAKE, HOLD_PRIORITY[LeasePriority.SAFETY])
    assert hold.expires_at == clock.t + 30

    clock.t += 20
    assert (await c.send(op="renew", id=r["id"], ttl_s=60))["ok"]
    clock.t += 50  # past the first expiry, inside the renewed one
    assert [h.id for h in server.holds(clock.t)] == [r["id"]]

    status = await c.send(op="status")
    assert [lease["id"] for lease in status["leases"]] == [r["id"]]
    assert (await c.send(op="release", id=r["id"]))["ok"]
    assert server.holds(clock.t) == ()
    await c.close()


async def test_lease_expires_after_ttl(server: LeaseServer, clock: Clock) -> None:
    c = await Client.connect(server.config.path)
    r = await c.send(op="acquire", max_duration_s=600, app="a", ttl_s=5)
    assert server.holds(clock.t + 4.999)
    assert server.holds(clock.t + 5.0) == ()
    # An expired lease cannot be renewed.
    clock.t += 6
    assert (await c.send(op="renew", id=r["id"]))["error"] == "unknown_id"
    await c.close()


async def test_disconnect_releases_the_clients_leases_only(server: LeaseServer, clock: Clock) -> None:
    stays, goes = await Client.connect(server.config.path), await Client.connect(server.config.path)
    kept = (await stays.send(op="acquire", max_duration_s=600, app="keeper", ttl_s=60))["id"]
    for _ in range(2):
        assert (await goes.send(op="acquire", max_duration_s=600, app="leaver", ttl_s=60))["ok"]
    assert len(server.holds(clock.t)) == 3
    await goes.close()
    await until(server, lambda: len(server.leases(clock.t)) == 1)
    assert [h.id for h in server.holds(clock.t)] == [kept]
    await stays.close()


CLIENT_PROCESS = textwrap.dedent(
    """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    req = {"op": "acquire", "app": "perception", "ttl_s": 300, "priority": "normal", "max_duration_s": 600}
    s.sendall(json.dumps(req).encode() + b"\\n")
    print(s.makefile().readline().strip(), flush=True)
    sys.stdin.read()  # hold the connection until killed
    """
)


async def test_killed_client_process_loses_its_lease(server: LeaseServer, clock: Clock) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT_PROCESS, str(server.config.path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT_S):
            reply = json.loads(await proc.stdout.readline())
        assert reply["ok"]
        (hold,) = server.holds(clock.t)
        assert hold.id == reply["id"] and hold.owner == "app:perception"
        proc.kill()  # no goodbye: the kernel closes the socket
        await until(server, lambda: not server.leases(clock.t))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert server.holds(clock.t) == ()


BAD = [
    (b"{not json\n", "bad_json"),
    (b"\xff\xfe\n", "bad_json"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"op": "grab"}\n', "unknown_op"),
    (b'{"app": "x"}\n', "unknown_op"),
    (b'{"op": "acquire", "app": "x", "ttl_s": 0}\n', "bad_ttl"),
    (b'{"op": "acquire", "app": "x", "ttl_s": -3}\n', "bad_ttl"),
    (b'{"op": "acquire", "app": "x", "ttl_s": "30"}\n', "bad_ttl"),
    (b'{"op": "acquire", "app": "x", "ttl_s": true}\n', "bad_ttl"),
    (b'{"op": "acquire", "app": "x", "ttl_s": 1e9}\n', "bad_ttl"),
    (b'{"op": "acquire", "app": "x", "ttl_s": NaN}\n', "bad_ttl"),
    (b'{"op": "acquire", "app": "x"}\n', "bad_ttl"),
    (b'{"op": "acquire", "ttl_s": 3}\n', "bad_field"),
    (b'{"op": "acquire", "app": "x", "ttl_s": 3, "priority": "urgent"}\n', "bad_field"),
    (b'{"op": "acquire", "app": "x", "ttl_s": 3, "mode": "turbo"}\n', "bad_field"),
    (b'{"op": "release", "id": "L999"}\n', "unknown_id"),
    (b'{"op": "renew"}\n', "unknown_id"),
]


async def test_bad_requests_get_error_replies_and_counters(server: LeaseServer) -> None:
    c = await Client.connect(server.config.path)
    for line, kind in BAD:
        reply = await c.raw(line)
        assert (reply["ok"], reply["error"]) == (False, kind), line
    expected: dict[str, int] = {}
    for _, kind in BAD:
        expected[kind] = expected.get(kind, 0) + 1
    assert dict(server.errors) == expected
    # The connection survives all of it.
    assert (await c.send(op="acquire", max_duration_s=600, app="x", ttl_s=3))["ok"]
    await c.close()


async def test_overlong_line_is_refused_and_the_connection_closed(server: LeaseServer) -> None:
    c = await Client.connect(server.config.path)
    assert (await c.send(op="acquire", max_duration_s=600, app="x", ttl_s=30))["ok"]
    reply = await c.raw(b'{"op": "acquire", "app": "' + b"x" * 1000 + b'"}\n')
    assert reply["error"] == "line_too_long"
    async with asyncio.timeout(WAIT_S):
        assert await c.reader.read() == b""  # closed by the server
    await until(server, lambda: not server.leases(0.0))
    assert server.errors["line_too_long"] == 1


async def test_leases_per_client_are_bounded(server: LeaseServer) -> None:
    a, b = await Client.connect(server.config.path), await Client.connect(server.config.path)
    for _ in range(3):
        assert (await a.send(op="acquire", max_duration_s=600, app="a", ttl_s=30))["ok"]
    assert (await a.send(op="acquire", max_duration_s=600, app="a", ttl_s=30))["error"] == "too_many_leases"
    assert (await b.send(op="acquire", max_duration_s=600, app="b", ttl_s=30))["ok"]  # the bound is per client
    await a.close()
    await b.close()


async def test_client_cannot_release_another_clients_lease(server: LeaseServer, clock: Clock) -> None:
    a, b = await Client.connect(server.config.path), await Client.connect(server.config.path)
    lid = (await a.send(op="acquire", max_duration_s=600, app="a", ttl_s=30))["id"]
    assert (await b.send(op="release", id=lid))["error"] == "unknown_id"
    assert [h.id for h in server.holds(clock.t)] == [lid]
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    ("leases", "top"),
    [
        ([("power_saver", "sleep"), ("safety", "awake")], ("safety", HoldMode.AWAKE)),
        ([("normal", "sleep"), ("power_saver", "awake")], ("normal", HoldMode.SLEEP)),
        ([("normal", "sleep"), ("normal", "awake")], ("normal", HoldMode.AWAKE)),  # tie: awake
        ([("safety", "sleep"), ("normal", "awake")], ("safety", HoldMode.SLEEP)),
    ],
)
async def test_priority_order_of_holds(
    server: LeaseServer, clock: Clock, leases: list[tuple[str, str]], top: tuple[str, HoldMode]
) -> None:
    c = await Client.connect(server.config.path)
    for priority, mode in leases:
        assert (await c.send(op="acquire", max_duration_s=600, app=priority, ttl_s=30, priority=priority,
                             mode=mode))["ok"]
    first = server.holds(clock.t)[0]
    assert (first.priority, first.mode) == (HOLD_PRIORITY[LeasePriority(top[0])], top[1])
    await c.close()


@pytest.fixture
def orin_model() -> AcceleratorModel:
    return load_profile("orin_nano")  # file I/O: loaded outside the event loop


async def test_safety_awake_lease_beats_power_saver_sleep_in_the_policy(
    server: LeaseServer, clock: Clock, orin_model: AcceleratorModel
) -> None:
    policy = CerebellumFirst(PolicyParams(signals=(), demands=(), min_dwell_s=0.0), orin_model)
    state = policy.initial_state(clock.t, AccelState.SLEEP)
    c = await Client.connect(server.config.path)
    await c.send(op="acquire", max_duration_s=600, app="saver", ttl_s=30, priority="power_saver", mode="sleep")
    await c.send(op="acquire", max_duration_s=600, app="pedestrian_guard", ttl_s=30, priority="safety", mode="awake")
    clock.t += 1
    _, decision = policy.step(state, Inputs(samples={}, holds=server.holds(clock.t)), clock.t)
    assert decision.target is AccelState.ACTIVE
    assert decision.reason == "hold:app:pedestrian_guard"
    await c.close()


async def test_manual_override_grace_defers_non_safety_leases(
    server: LeaseServer, clock: Clock
) -> None:
    c = await Client.connect(server.config.path)
    await c.send(op="acquire", max_duration_s=600, app="normal_app", ttl_s=100, priority="normal")
    assert server.automatic_allowed(clock.t)
    end = server.manual_override(clock.t, owner="bench")
    assert end == clock.t + 20
    assert not server.automatic_allowed(clock.t + 19.9)
    assert server.holds(clock.t) == ()  # deferred
    r = await c.send(op="acquire", max_duration_s=600, app="safety_app", ttl_s=100, priority="safety")
    assert r["override_grace_s"] == 20 and "deferred_s" not in r
    r = await c.send(op="acquire", max_duration_s=600, app="late_app", ttl_s=100, priority="power_saver")
    assert r["deferred_s"] == 20
    assert [h.owner for h in server.holds(clock.t)] == ["app:safety_app"]
    snap = server.snapshot(clock.t + 5)
    assert (snap["override_grace_s"], snap["override_owner"]) == (15, "bench")
    clock.t += 20
    assert server.automatic_allowed(clock.t)
    assert {h.owner for h in server.holds(clock.t)} == {
        "app:safety_app", "app:normal_app", "app:late_app"}
    assert "override_grace_s" not in await c.send(op="status")
    await c.close()


async def test_socket_mode_and_stale_socket_removed(sock_dir: Path) -> None:
    path = sock_dir / "leases.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
    stale.close()
    cfg = LeaseConfig(path=path)
    async with LeaseServer(cfg) as srv:
        mode = (await asyncio.to_thread(os.stat, path)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        # A second server must not steal a live socket.
        with pytest.raises(LeaseServerError, match="another server"):
            await LeaseServer(cfg).start()
        c = await Client.connect(path)
        assert (await c.send(op="status"))["ok"]
        await c.close()
        assert srv.connections_total == 2  # the second server's probe, then the client
    assert not await asyncio.to_thread(path.exists)


async def test_refuses_to_remove_a_regular_file(sock_dir: Path) -> None:
    path = sock_dir / "leases.sock"
    await asyncio.to_thread(path.write_text, "not a socket")
    with pytest.raises(LeaseServerError, match="not a socket"):
        await LeaseServer(LeaseConfig(path=path)).start()


async def test_connection_limit(sock_dir: Path) -> None:
    cfg = LeaseConfig(path=sock_dir / "l.sock", max_clients=1)
    async with LeaseServer(cfg) as srv:
        first = await Client.connect(cfg.path)
        assert (await first.send(op="status"))["ok"]
        second = await Client.connect(cfg.path)
        async with asyncio.timeout(WAIT_S):
            reply = json.loads(await second.reader.readline())
        assert reply["error"] == "too_many_clients" and srv.errors["too_many_clients"] == 1
        await first.close()
        await second.close()
