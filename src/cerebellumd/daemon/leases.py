"""Leases: inference applications on the gateway ask for the accelerator over a Unix socket.

Protocol: newline-delimited JSON, one request per line, one reply per request.

    {"op": "acquire", "app": "lane_assist", "reason": "highway", "ttl_s": 30,
     "priority": "safety" | "normal" | "power_saver", "mode": "awake" | "sleep"}
        -> {"ok": true, "id": "L7", "expires_in_s": 30.0}
    {"op": "renew", "id": "L7", "ttl_s": 30}   -> {"ok": true, "id": "L7", "expires_in_s": 30.0}
    {"op": "release", "id": "L7"}              -> {"ok": true, "id": "L7"}
    {"op": "status"}                           -> {"ok": true, "leases": [...], "override_grace_s": 0}

Errors: {"ok": false, "error": KIND, "detail": "..."}, counted per KIND; a request's "seq"
is echoed in its reply. A lease lives until its ttl runs out, it is released, or its client
disconnects (a crashed app cannot pin the accelerator awake). Lines longer than
`max_line_bytes` get an error reply and the connection is closed (its rest cannot be framed).

Leases become `policies.types.Hold`s: safety > normal > power_saver, so a safety-critical
awake lease beats a power-saver sleep request; at equal priority awake wins (fail-safe).
After an operator's manual command (`manual_override`) non-safety leases are deferred for a
grace period, so the operator's choice is not undone at once; the grace is visible in every
reply, in `status` and in `snapshot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from ..config import LeaseConfig  # the `[leases]` section lives with the config (re-exported here)
from ..policies.types import Hold, HoldMode


class LeasePriority(StrEnum):
    SAFETY = "safety"
    NORMAL = "normal"
    POWER_SAVER = "power_saver"


#: Hold priorities: far apart so operator holds (MQTT/CLI) can sit between them if wanted.
HOLD_PRIORITY: dict[LeasePriority, int] = {
    LeasePriority.SAFETY: 300,
    LeasePriority.NORMAL: 200,
    LeasePriority.POWER_SAVER: 100,
}

_MAX_NAME = 64
_E = TypeVar("_E", bound=StrEnum)
_MAX_REASON = 200


class LeaseServerError(RuntimeError):
    """The server cannot start (path in use by a live server, or not a socket)."""


class RequestError(ValueError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    client: int
    app: str
    reason: str
    priority: LeasePriority
    mode: HoldMode
    ttl_s: float
    expires_at: float

    def hold(self) -> Hold:
        return Hold(
            id=self.id,
            owner=f"app:{self.app}",
            reason=self.reason or f"lease {self.priority.value}",
            mode=self.mode,
            expires_at=self.expires_at,
            priority=HOLD_PRIORITY[self.priority],
        )

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "app": self.app, "reason": self.reason,
            "priority": self.priority.value, "mode": self.mode.value,
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
        }


class LeaseServer:
    """Owns the socket and the lease table. All state is touched on the event loop only."""

    def __init__(self, config: LeaseConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._ids = itertools.count(1)
        self._client_ids = itertools.count(1)
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._server: asyncio.AbstractServer | None = None
        self._grace_until: float | None = None
        self._override_owner: str | None = None
        self._changed = asyncio.Event()
        self.errors: Counter[str] = Counter()  # bad requests by kind
        self.connections_total = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        path = self.config.path
        await self._remove_stale_socket(path)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(path), limit=self.config.max_line_bytes
        )
        await asyncio.to_thread(os.chmod, path, self.config.socket_mode)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers.values()):
            writer.close()  # clients see EOF; their handlers drop the leases
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self.config.path)

    async def __aenter__(self) -> LeaseServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    async def _remove_stale_socket(path: Path) -> None:
        try:
            mode = (await asyncio.to_thread(os.lstat, path)).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise LeaseServerError(f"{path} exists and is not a socket; not removing it")
        try:
            _, writer = await asyncio.open_unix_connection(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: left behind by a crashed run.
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, path)
            return
        writer.close()
        raise LeaseServerError(f"{path}: another server is listening")

    # -- what the daemon reads --------------------------------------------------------------

    def holds(self, now: float) -> tuple[Hold, ...]:
        """Current leases as holds, strongest first (priority, then awake before sleep). Inside
        an override grace only safety leases count."""
        self._expire(now)
        in_grace = self.override_grace_remaining(now) > 0
        leases = [
            lease for lease in self._leases.values()
            if not (in_grace and lease.priority is not LeasePriority.SAFETY)
        ]
        leases.sort(key=lambda x: (-HOLD_PRIORITY[x.priority], x.mode is not HoldMode.AWAKE, x.id))
        return tuple(lease.hold() for lease in leases)

    def leases(self, now: float) -> tuple[Lease, ...]:
        self._expire(now)
        return tuple(self._leases.values())

    def manual_override(self, now: float, owner: str = "operator") -> float:
        """An operator commanded the accelerator: automatic policy and non-safety leases wait
        `override_grace_s`. Returns the end of the grace."""
        self._grace_until = now + self.config.override_grace_s
        self._override_owner = owner
        self._notify()
        return self._grace_until

    def override_grace_remaining(self, now: float) -> float:
        if self._grace_until is None:
            return 0.0
        return max(0.0, self._grace_until - now)

    def automatic_allowed(self, now: float) -> bool:
        """May the automatic policy act? False during a manual override's grace."""
        return self.override_grace_remaining(now) <= 0

    def snapshot(self, now: float) -> dict[str, Any]:
        """For MQTT `state` / logs: leases, grace and error counts."""
        return {
            "leases": [lease.describe(now) for lease in self.leases(now)],
            "override_grace_s": round(self.override_grace_remaining(now), 3),
            "override_owner": self._override_owner if self.override_grace_remaining(now) else None,
            "clients": len(self._writers),
            "errors": dict(self.errors),
        }

    async def wait_changed(self) -> None:
        """Returns after the next change of the lease table (acquire, release, disconnect)."""
        await self._changed.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Waits (event-driven) until `predicate()` holds; bound it with `asyncio.timeout`."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _expire(self, now: float) -> None:
        gone = [lid for lid, lease in self._leases.items() if lease.expires_at <= now]
        for lid in gone:
            del self._leases[lid]
        if gone:
            self._notify()

    # -- connections ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.config.max_clients:
            self.errors["too_many_clients"] += 1
            await self._reply(writer, _error("too_many_clients", "connection limit reached"))
            writer.close()
            return
        client = next(self._client_ids)
        self._writers[client] = writer
        self.connections_total += 1
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # the line overran the stream limit
                    self.errors["line_too_long"] += 1
                    await self._reply(writer, _error(
                        "line_too_long", f"lines are limited to {self.config.max_line_bytes} bytes"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                if not await self._reply(writer, self._handle(client, line)):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._drop_client(client)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> bool:
        try:
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    def _drop_client(self, client: int) -> None:
        self._writers.pop(client, None)
        gone = [lid for lid, lease in self._leases.items() if lease.client == client]
        for lid in gone:
            del self._leases[lid]
        if gone:
            self._notify()

    # -- requests ---------------------------------------------------------------------------

    def _handle(self, client: int, line: bytes) -> dict[str, Any]:
        now = self._clock()
        self._expire(now)
        seq: Any = None
        try:
            try:
                request = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError("bad_json", f"not JSON: {exc}") from None
            if not isinstance(request, dict):
                raise RequestError("bad_request", "a request is a JSON object")
            seq = request.get("seq")
            op = request.get("op")
            if op == "acquire":
                reply = self._acquire(client, request, now)
            elif op == "renew":
                reply = self._renew(client, request, now)
            elif op == "release":
                lease = self._own(client, request)
                del self._leases[lease.id]
                self._notify()
                reply = {"ok": True, "id": lease.id}
            elif op == "status":
                reply = {"ok": True, "leases": [
                    lease.describe(now) for lease in self._leases.values() if lease.client == client
                ]}
            else:
                raise RequestError("unknown_op", f"unknown op {op!r}; known: acquire, renew, "
                                                 "release, status")
        except RequestError as exc:
            self.errors[exc.kind] += 1
            reply = _error(exc.kind, exc.detail)
        grace = self.override_grace_remaining(now)
        if grace > 0:
            reply["override_grace_s"] = round(grace, 3)
        if seq is not None:
            reply["seq"] = seq
        return reply

    def _acquire(self, client: int, request: dict[str, Any], now: float) -> dict[str, Any]:
        app = _text(request, "app", _MAX_NAME, required=True)
        reason = _text(request, "reason", _MAX_REASON, required=False)
        ttl = self._ttl(request.get("ttl_s"))
        priority = _choice(request, "priority", LeasePriority, LeasePriority.NORMAL)
        mode = _choice(request, "mode", HoldMode, HoldMode.AWAKE)
        held = sum(1 for lease in self._leases.values() if lease.client == client)
        if held >= self.config.max_leases_per_client:
            raise RequestError(
                "too_many_leases", f"at most {self.config.max_leases_per_client} per connection")
        lease = Lease(
            id=f"L{next(self._ids)}", client=client, app=app, reason=reason, priority=priority,
            mode=mode, ttl_s=ttl, expires_at=now + ttl,
        )
        self._leases[lease.id] = lease
        self._notify()
        reply: dict[str, Any] = {"ok": True, "id": lease.id, "expires_in_s": ttl}
        grace = self.override_grace_remaining(now)
        if grace > 0 and priority is not LeasePriority.SAFETY:
            reply["deferred_s"] = round(grace, 3)  # held, but counts only after the grace
        return reply

    def _renew(self, client: int, request: dict[str, Any], now: float) -> dict[str, Any]:
        lease = self._own(client, request)
        ttl = self._ttl(request.get("ttl_s", lease.ttl_s))
        renewed = replace(lease, ttl_s=ttl, expires_at=now + ttl)
        self._leases[lease.id] = renewed
        self._notify()
        return {"ok": True, "id": lease.id, "expires_in_s": ttl}

    def _own(self, client: int, request: dict[str, Any]) -> Lease:
        lid = request.get("id")
        lease = self._leases.get(lid) if isinstance(lid, str) else None
        if lease is None or lease.client != client:
            # Another client's lease is reported as unknown too: ids are not capabilities to
            # share, and a client must not release what it does not hold.
            raise RequestError("unknown_id", f"no lease {lid!r} on this connection")
        return lease

    def _ttl(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError("bad_ttl", "ttl_s must be a number of seconds")
        ttl = float(value)
        if not math.isfinite(ttl) or ttl <= 0 or ttl > self.config.max_ttl_s:
            raise RequestError("bad_ttl", f"ttl_s must be in (0, {self.config.max_ttl_s}]")
        return ttl


def _error(kind: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "error": kind, "detail": detail}


def _text(request: dict[str, Any], key: str, limit: int, *, required: bool) -> str:
    value = request.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > limit:
        raise RequestError("bad_field", f"{key} must be a string of 1..{limit} characters"
                           if required else f"{key} must be a string of at most {limit}")
    return value


def _choice(request: dict[str, Any], key: str, enum: type[_E], default: _E) -> _E:
    value = request.get(key, default.value)
    try:
        return enum(value)
    except ValueError:
        raise RequestError(
            "bad_field", f"{key} must be one of {', '.join(m.value for m in enum)}"
        ) from None

