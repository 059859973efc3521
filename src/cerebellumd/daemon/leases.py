"""Leases: inference applications on the gateway ask for the accelerator over a Unix socket.

Protocol: newline-delimited JSON, one request per line, one reply per request.

    {"op": "acquire", "app": "lane_assist", "reason": "highway", "ttl_s": 30,
     "priority": "safety" | "normal" | "power_saver", "mode": "awake" | "sleep",
     "max_duration_s": 900, "max_energy_wh": 5, "min_budget_wh": 20}
        -> {"ok": true, "id": "L7", "expires_in_s": 30.0, "ends_in_s": 900.0}
    {"op": "renew", "id": "L7", "ttl_s": 30}   -> {"ok": true, "id": "L7", "expires_in_s": 30.0, ...}
    {"op": "release", "id": "L7"}              -> {"ok": true, "id": "L7"}
    {"op": "status"}                           -> {"ok": true, "leases": [...]}
    {"op": "wake_at", "app": "model_update", "at": "03:00"}   (or "in_s": 3600)
        -> {"ok": true, "wake_in_s": 21600.0, "earliest_in_s": 21600.0}
    {"op": "wake_cancel", "app": "model_update"}   -> {"ok": true, "earliest_in_s": null}

Errors: {"ok": false, "error": KIND, "detail": "..."}, counted per KIND; a request's "seq"
is echoed in its reply. Lines longer than `max_line_bytes` get an error reply and the
connection is closed (its rest cannot be framed).

Caps (garage-mode work: a model update, a log upload while parked):
- `max_duration_s`: a hard cap on the lease's whole life from its grant. Renewing does not
  extend it. Required for the modes in `[leases] cap_required_modes` (default: awake leases, which
  keep the accelerator and the car awake); a lease without one is refused (`no_cap`). At most
  `[leases] max_duration_s`, or the peer's rule's `max_duration_s`.
- `max_energy_wh`: the accelerator domain's energy while the lease is held (a narrow callable the
  assembly passes: the ledger's accelerator joules). Two leases held together are each charged
  all of it.
- `min_budget_wh`: awake leases are granted, and kept, only while the 12 V energy budget (a
  callable `budget_wh() -> float | None`, None = unknown = grant) is at least
  max(this, `[leases] min_budget_wh`).
The daemon ends a lease at its cap whatever the client does: the hold's expiry is the cap (the
policy drops it at that instant), a timer on the daemon's clock ends it, and energy and budget are
checked at every daemon tick. The client gets an unsolicited line
`{"event": "ended", "id": "L7", "reason": "duration_cap", "detail": "..."}` (reasons: expired,
duration_cap, energy_cap, budget); every end is counted by reason (`ended`, with `released` and
`disconnect` for the client's own ends). Unsolicited lines carry `event` and no `ok`: a client
skips them when it waits for a reply.

Who may ask for what: the peer's uid/gid (SO_PEERCRED) against `[leases] rules`
(`daemon/lease_access.py`); outside its rule a claim is refused (`not_permitted`).

A lease lives until its ttl runs out, its cap ends it, it is released, or its client
disconnects (a crashed app cannot pin the accelerator awake).

Next wake (`wake_at`): an app that wants to run while parked (nightly at 03:00) asks the MCU to
wake the gateway then; one request per app, kept after the app disconnects (the gateway may be
powered down in between) until its time has passed or it is cancelled. The earliest pending
time is handed to the MCU link (`WakeAt`); the reply comes after the MCU acknowledged it. One-shot:
an app that wants every night asks again when it runs.

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
import logging
import math
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from ..config import LeaseConfig  # the `[leases]` section lives with the config (re-exported here)
from ..policies.types import Hold, HoldMode
from .lease_access import AccessError, AccessPolicy, Peer, async_access_policy, peer_of

log = logging.getLogger(__name__)

#: The 12 V energy budget in Wh, None while unknown (then leases are granted).
BudgetSource = Callable[[], float | None]
#: The accelerator domain's cumulative energy in joules.
EnergySource = Callable[[], float]
#: Hands the MCU the earliest wall-clock time (time.time()) to wake the gateway; None cancels.
#: Raises when the MCU did not acknowledge it.
WakeAt = Callable[[float | None], Awaitable[None]]

MAX_WAKE_DELAY_S = 7 * 86400.0
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class LeasePriority(StrEnum):
    SAFETY = "safety"
    NORMAL = "normal"
    POWER_SAVER = "power_saver"


class EndReason(StrEnum):
    """Why a lease ended (`cerebellumd_lease_ended_total{reason}`)."""

    RELEASED = "released"
    DISCONNECT = "disconnect"
    EXPIRED = "expired"  # its ttl ran out (not renewed)
    DURATION_CAP = "duration_cap"
    ENERGY_CAP = "energy_cap"
    BUDGET = "budget"


#: Hold priorities: far apart so operator holds (MQTT/CLI) can sit between them if wanted.
HOLD_PRIORITY: dict[LeasePriority, int] = {
    LeasePriority.SAFETY: 300,
    LeasePriority.NORMAL: 200,
    LeasePriority.POWER_SAVER: 100,
}

_MAX_NAME = 64
#: The "client" of leases that came as MQTT commands (socket clients count from 1).
REMOTE_CLIENT = 0
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
    expires_at: float  # min(ttl expiry, cap_at): the hold's expiry
    granted_at: float = 0.0
    cap_at: float | None = None  # granted_at + max_duration_s
    max_energy_wh: float | None = None
    min_budget_wh: float = 0.0  # effective (the config's floor included); awake leases only
    energy_start_j: float = 0.0
    uid: int | None = None

    def hold(self) -> Hold:
        return Hold(
            id=self.id,
            owner=f"app:{self.app}",
            reason=self.reason or f"lease {self.priority.value}",
            mode=self.mode,
            expires_at=self.expires_at,
            priority=HOLD_PRIORITY[self.priority],
        )

    def describe(self, now: float, energy_wh: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "app": self.app, "reason": self.reason,
            "priority": self.priority.value, "mode": self.mode.value,
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
        }
        if self.cap_at is not None:
            out["ends_in_s"] = round(max(0.0, self.cap_at - now), 3)
        if self.max_energy_wh is not None:
            out["max_energy_wh"] = self.max_energy_wh
        if energy_wh is not None:
            out["energy_wh"] = round(energy_wh, 6)
        if self.min_budget_wh:
            out["min_budget_wh"] = self.min_budget_wh
        return out


class LeaseServer:
    """Owns the socket and the lease table. All state is touched on the event loop only."""

    def __init__(
        self,
        config: LeaseConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        budget_wh: BudgetSource | None = None,
        energy_j: EnergySource | None = None,
        wake_at: WakeAt | None = None,
        wall: Callable[[], float] = time.time,
        wall_seconds: Callable[[float], float] = lambda s: s,
    ) -> None:
        self.config = config
        self._clock = clock
        self._budget_wh = budget_wh
        self._energy_j = energy_j
        self._wake_at = wake_at
        self._wall = wall
        self._wall_seconds = wall_seconds  # policy seconds -> wall seconds (the demo's speed-up)
        self._leases: dict[str, Lease] = {}
        self._ids = itertools.count(1)
        self._client_ids = itertools.count(1)
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._peers: dict[int, Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._timer: asyncio.Task[None] | None = None
        self._grace_until: float | None = None
        self._override_owner: str | None = None
        self._changed = asyncio.Event()
        self._access: AccessPolicy | None = None
        self._wakes: dict[str, float] = {}  # app -> wall time
        self._wake_sent: float | None = None  # what the MCU was last told
        self._wake_lock = asyncio.Lock()
        self.errors: Counter[str] = Counter()  # bad requests by kind
        self.ended: Counter[str] = Counter()  # ended leases by EndReason
        self.connections_total = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._access = await async_access_policy(self.config.rules)
        except ValueError as exc:
            raise LeaseServerError(str(exc)) from None
        path = self.config.path
        await self._remove_stale_socket(path)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(path), limit=self.config.max_line_bytes
        )
        await asyncio.to_thread(os.chmod, path, self.config.socket_mode)
        self._timer = asyncio.create_task(self._cap_timer(), name="lease-caps")

    async def close(self) -> None:
        if self._server is None:
            return
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
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

    async def _cap_timer(self) -> None:
        """Ends leases at their time caps and ttls on the daemon's clock, without a request or a
        tick to trigger it (the daemon's ticks may pause while the bus sleeps)."""
        while True:
            changed = self._changed
            now = self._clock()
            self.enforce(now)
            deadlines = [lease.expires_at for lease in self._leases.values()]
            timeout = None if not deadlines else max(0.0, self._wall_seconds(min(deadlines) - now)) + 0.001
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()

    # -- what the daemon reads --------------------------------------------------------------

    def holds(self, now: float) -> tuple[Hold, ...]:
        """Current leases as holds, strongest first (priority, then awake before sleep). Inside
        an override grace only safety leases count."""
        self.enforce(now)
        in_grace = self.override_grace_remaining(now) > 0
        leases = [
            lease for lease in self._leases.values()
            if not (in_grace and lease.priority is not LeasePriority.SAFETY)
        ]
        leases.sort(key=lambda x: (-HOLD_PRIORITY[x.priority], x.mode is not HoldMode.AWAKE, x.id))
        return tuple(lease.hold() for lease in leases)

    def leases(self, now: float) -> tuple[Lease, ...]:
        self.enforce(now)
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
        """For MQTT `state` / logs: leases, grace, next wake and counts."""
        wall = self._wall()
        earliest = self._earliest_wake(wall)
        return {
            "leases": [lease.describe(now, self._used_wh(lease)) for lease in self.leases(now)],
            "override_grace_s": round(self.override_grace_remaining(now), 3),
            "override_owner": self._override_owner if self.override_grace_remaining(now) else None,
            "clients": len(self._writers),
            "errors": dict(self.errors),
            "ended": dict(self.ended),
            "next_wake_in_s": None if earliest is None else round(earliest - wall, 3),
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

    # -- caps -------------------------------------------------------------------------------

    def _used_wh(self, lease: Lease) -> float | None:
        if self._energy_j is None:
            return None
        return max(0.0, self._energy_j() - lease.energy_start_j) / 3600.0

    def _budget(self) -> float | None:
        if self._budget_wh is None:
            return None
        value = self._budget_wh()
        return value if value is None or math.isfinite(value) else None

    def enforce(self, now: float) -> None:
        """End every lease past its ttl or one of its caps. Called on every request, every read
        of the holds, every daemon tick and by the cap timer."""
        budget = self._budget()
        for lease in list(self._leases.values()):
            end = self._why_end(lease, now, budget)
            if end is not None:
                self._end(lease, *end)

    def _why_end(self, lease: Lease, now: float, budget: float | None) -> tuple[EndReason, str] | None:
        if lease.expires_at <= now:
            # expires_at is min(ttl expiry, cap): whichever came first ended it.
            if lease.cap_at is not None and lease.expires_at >= lease.cap_at:
                return EndReason.DURATION_CAP, f"max_duration_s {lease.cap_at - lease.granted_at:g} s reached"
            return EndReason.EXPIRED, f"ttl_s {lease.ttl_s:g} s ran out without a renew"
        if lease.max_energy_wh is not None:
            used = self._used_wh(lease)
            if used is not None and used >= lease.max_energy_wh:
                return EndReason.ENERGY_CAP, f"used {used:.4g} Wh of max_energy_wh {lease.max_energy_wh:g}"
        if lease.mode is HoldMode.AWAKE and budget is not None and budget < lease.min_budget_wh:
            return EndReason.BUDGET, f"12 V budget {budget:.4g} Wh below min_budget_wh {lease.min_budget_wh:g}"
        return None

    def _end(self, lease: Lease, reason: EndReason, detail: str) -> None:
        if self._leases.pop(lease.id, None) is None:
            return
        self.ended[reason.value] += 1
        if reason not in (EndReason.RELEASED, EndReason.DISCONNECT):
            log.info("lease %s of %s ended: %s (%s)", lease.id, lease.app, reason.value, detail)
            writer = self._writers.get(lease.client)
            if writer is not None and not writer.is_closing():
                event = {"event": "ended", "id": lease.id, "reason": reason.value, "detail": detail}
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
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
        self._peers[client] = peer_of(writer.get_extra_info("socket"))
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
                if not await self._reply(writer, await self._handle(client, line)):
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
        self._peers.pop(client, None)
        for lease in [lease for lease in self._leases.values() if lease.client == client]:
            self._end(lease, EndReason.DISCONNECT, "the client disconnected")

    # -- requests ---------------------------------------------------------------------------

    async def _handle(self, client: int, line: bytes) -> dict[str, Any]:
        now = self._clock()
        self.enforce(now)
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
                self._end(lease, EndReason.RELEASED, "released by the client")
                reply = {"ok": True, "id": lease.id}
            elif op == "status":
                reply = {"ok": True, "leases": [
                    lease.describe(now, self._used_wh(lease))
                    for lease in self._leases.values() if lease.client == client
                ]}
            elif op == "wake_at":
                reply = await self._wake_request(client, request)
            elif op == "wake_cancel":
                reply = await self._wake_cancel(client, request)
            else:
                raise RequestError("unknown_op", f"unknown op {op!r}; known: acquire, renew, "
                                                 "release, status, wake_at, wake_cancel")
        except RequestError as exc:
            self.errors[exc.kind] += 1
            reply = _error(exc.kind, exc.detail)
        grace = self.override_grace_remaining(now)
        if grace > 0:
            reply["override_grace_s"] = round(grace, 3)
        if seq is not None:
            reply["seq"] = seq
        return reply

    def _access_policy(self) -> AccessPolicy:
        if self._access is None:  # pragma: no cover - start() sets it before any connection
            raise RequestError("not_permitted", "the server has no access policy yet")
        return self._access

    def _acquire(self, client: int, request: dict[str, Any], now: float, *,
                 check_access: bool = True) -> dict[str, Any]:
        cfg = self.config
        app = _text(request, "app", _MAX_NAME, required=True)
        reason = _text(request, "reason", _MAX_REASON, required=False)
        ttl = self._ttl(request.get("ttl_s"))
        priority = _choice(request, "priority", LeasePriority, LeasePriority.NORMAL)
        mode = _choice(request, "mode", HoldMode, HoldMode.AWAKE)
        duration = _positive(request, "max_duration_s")
        energy = _positive(request, "max_energy_wh")
        min_budget = _positive(request, "min_budget_wh", allow_zero=True)
        peer = self._peers.get(client, Peer(None, None, None))
        rule_energy: float | None = None
        if check_access:
            try:
                rule = self._access_policy().check(peer, priority=priority.value, mode=mode.value,
                                                   max_duration_s=duration, max_energy_wh=energy)
            except AccessError as exc:
                raise RequestError("not_permitted", str(exc)) from None
            rule_energy = rule.max_energy_wh
        if duration is None and mode.value in cfg.cap_required_modes:
            raise RequestError("no_cap", f"a {mode.value} lease needs max_duration_s (a hard cap, at most "
                                         f"{cfg.max_duration_s:g} s): parked-time work must end")
        if duration is not None and duration > cfg.max_duration_s:
            raise RequestError("bad_cap", f"max_duration_s must be in (0, {cfg.max_duration_s:g}]")
        if energy is None and mode is HoldMode.AWAKE:
            energy = rule_energy
        if energy is not None and self._energy_j is None:
            raise RequestError("bad_cap", "max_energy_wh: the daemon measures no accelerator energy")
        floor = max(cfg.min_budget_wh, min_budget or 0.0) if mode is HoldMode.AWAKE else 0.0
        budget = self._budget()
        if mode is HoldMode.AWAKE and budget is not None and budget < floor:
            raise RequestError("budget", f"12 V budget {budget:.4g} Wh is below min_budget_wh {floor:g}")
        held = sum(1 for lease in self._leases.values() if lease.client == client)
        if held >= cfg.max_leases_per_client:
            raise RequestError("too_many_leases", f"at most {cfg.max_leases_per_client} per connection")
        cap_at = now + duration if duration is not None else None
        lease = Lease(
            id=f"L{next(self._ids)}", client=client, app=app, reason=reason, priority=priority,
            mode=mode, ttl_s=ttl, expires_at=min(now + ttl, cap_at if cap_at is not None else math.inf),
            granted_at=now, cap_at=cap_at, max_energy_wh=energy, min_budget_wh=floor,
            energy_start_j=self._energy_j() if self._energy_j is not None else 0.0, uid=peer.uid,
        )
        self._leases[lease.id] = lease
        self._notify()
        reply: dict[str, Any] = {"ok": True, "id": lease.id, "expires_in_s": round(lease.expires_at - now, 3)}
        if cap_at is not None:
            reply["ends_in_s"] = duration
        if energy is not None:
            reply["max_energy_wh"] = energy
        grace = self.override_grace_remaining(now)
        if grace > 0 and priority is not LeasePriority.SAFETY:
            reply["deferred_s"] = round(grace, 3)  # held, but counts only after the grace
        return reply

    def _renew(self, client: int, request: dict[str, Any], now: float) -> dict[str, Any]:
        lease = self._own(client, request)
        ttl = self._ttl(request.get("ttl_s", lease.ttl_s))
        # A renew never moves the hard cap.
        expires = min(now + ttl, lease.cap_at if lease.cap_at is not None else math.inf)
        renewed = replace(lease, ttl_s=ttl, expires_at=expires)
        self._leases[lease.id] = renewed
        self._notify()
        reply: dict[str, Any] = {"ok": True, "id": lease.id, "expires_in_s": round(expires - now, 3)}
        if lease.cap_at is not None:
            reply["ends_in_s"] = round(lease.cap_at - now, 3)
        return reply

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

    # -- remote tools (MQTT commands with caps) ----------------------------------------------

    def acquire_remote(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        """A capped command from a remote tool (MQTT `set`), as a lease of no connection: the same
        caps, checks and end reasons, no unsolicited lines (the MQTT state and the counters show
        the end). It replaces that app's previous remote lease of the same mode. Not subject to
        `rules`: MQTT commands are authorised by `[mqtt] operators` and the broker's ACL.
        Returns the reply; an error is counted as for a socket request."""
        self.enforce(now)
        try:
            app, mode = request.get("app"), request.get("mode", HoldMode.AWAKE.value)
            for old in [x for x in self._leases.values()
                        if x.client == REMOTE_CLIENT and x.app == app and x.mode.value == mode]:
                self._end(old, EndReason.RELEASED, "replaced by a newer command")
            return self._acquire(REMOTE_CLIENT, request, now, check_access=False)
        except RequestError as exc:
            self.errors[exc.kind] += 1
            return _error(exc.kind, exc.detail)

    def release_remote(self, app: str) -> int:
        gone = [x for x in self._leases.values() if x.client == REMOTE_CLIENT and x.app == app]
        for lease in gone:
            self._end(lease, EndReason.RELEASED, "released by the remote tool")
        return len(gone)

    # -- next wake --------------------------------------------------------------------------

    def _earliest_wake(self, wall: float) -> float | None:
        for app in [a for a, t in self._wakes.items() if t <= wall]:
            del self._wakes[app]  # its time has come and gone
        return min(self._wakes.values(), default=None)

    async def _wake_request(self, client: int, request: dict[str, Any]) -> dict[str, Any]:
        app = _text(request, "app", _MAX_NAME, required=True)
        try:
            self._access_policy().check_next_wake(self._peers.get(client, Peer(None, None, None)))
        except AccessError as exc:
            raise RequestError("not_permitted", str(exc)) from None
        wall = self._wall()
        when = _wake_time(request, wall)
        if app not in self._wakes and len(self._wakes) >= self.config.max_wake_requests:
            self._earliest_wake(wall)
            if len(self._wakes) >= self.config.max_wake_requests:
                raise RequestError("too_many_wakes", f"at most {self.config.max_wake_requests} pending wake requests")
        previous = self._wakes.get(app)
        self._wakes[app] = when
        try:
            earliest = await self._send_wake()
        except RequestError:
            if previous is None:
                self._wakes.pop(app, None)
            else:
                self._wakes[app] = previous
            raise
        return {"ok": True, "wake_in_s": round(when - wall, 3), "wake_at": when,
                "earliest_in_s": None if earliest is None else round(earliest - wall, 3)}

    async def _wake_cancel(self, client: int, request: dict[str, Any]) -> dict[str, Any]:
        app = _text(request, "app", _MAX_NAME, required=True)
        try:
            self._access_policy().check_next_wake(self._peers.get(client, Peer(None, None, None)))
        except AccessError as exc:
            raise RequestError("not_permitted", str(exc)) from None
        self._wakes.pop(app, None)
        earliest = await self._send_wake()
        wall = self._wall()
        return {"ok": True, "earliest_in_s": None if earliest is None else round(earliest - wall, 3)}

    async def _send_wake(self) -> float | None:
        """Tell the MCU the earliest pending wake (if it changed); RequestError if it did not ACK."""
        if self._wake_at is None:
            raise RequestError("no_wake_link", "no MCU link ([mcu]) to carry a next-wake request")
        async with self._wake_lock:
            earliest = self._earliest_wake(self._wall())
            if earliest == self._wake_sent:
                return earliest
            try:
                await self._wake_at(earliest)
            except Exception as exc:  # the link's error, whatever its type: an answer, not a crash
                raise RequestError("wake_failed", f"the MCU did not take the next wake: {exc}") from None
            self._wake_sent = earliest
            return earliest


def _wake_time(request: dict[str, Any], wall: float) -> float:
    """`in_s` (seconds from now) or `at` ("HH:MM", the next such local time) as a wall time."""
    if ("in_s" in request) == ("at" in request):
        raise RequestError("bad_field", "give in_s (seconds) or at (\"HH:MM\" local time), one of them")
    if "in_s" in request:
        value = request["in_s"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not 1 <= value <= MAX_WAKE_DELAY_S:
            raise RequestError("bad_field", f"in_s must be a number of seconds in [1, {MAX_WAKE_DELAY_S:g}]")
        return wall + float(value)
    text = request["at"]
    match = _HHMM.match(text) if isinstance(text, str) else None
    if match is None:
        raise RequestError("bad_field", "at must be \"HH:MM\" (24 h, local time)")
    now = datetime.fromtimestamp(wall)  # naive local time: .timestamp() maps it back through the zone
    target = now.replace(hour=int(match[1]), minute=int(match[2]), second=0, microsecond=0)
    if target <= now:
        target += timedelta(days=1)
    return target.timestamp()


def _positive(request: dict[str, Any], key: str, *, allow_zero: bool = False) -> float | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise RequestError("bad_cap", f"{key} must be a {'non-negative' if allow_zero else 'positive'} number")
    return float(value)


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

