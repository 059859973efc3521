"""CAN ingest for one bus: frames are read, routed, decoded and handed on, on the event loop.

Reading. A bus with a file descriptor (socketcan, udp_multicast, the serial port under slcan:
python-can's `bus.fileno()`; `_LOOP_READ_INTERFACES`) is read on the loop: `loop.add_reader(fd)`
and a non-blocking drain (`drivers/can_read.py`: the backend's read without the select that
`recv(0)` adds, else `recv(0)`) until the socket is empty, or until the callback has
spent `DRAIN_BUDGET_S`; the rest stays in the kernel's buffer and, the fd still being readable,
is read on the next loop iteration (after timers such as the tick). Any other bus (virtual,
vendor adapters) keeps a reader thread that feeds a bounded queue (drops counted), drained on
the loop within the same time budget.

Why our own reader and not python-can's Notifier/AsyncBufferedReader: the Notifier's
add_reader path swallows `recv` errors into the loop's exception handler and can hang an
awaiting reader (python-can #1865), its buffer is unbounded, and it does not notice a silent
bus. Here every failure is counted, the reader is removed before its fd closes, silence is
detected and the bus is recreated with backoff.

Decoding. Each DBC message the configuration wants signals from gets an extractor compiled once
(`drivers/can_extract.py`) for exactly those signals; messages it cannot compile (multiplexed,
overlapping signals, ...) are decoded by cantools as before. Both give the same values and
refuse the same frames (tests/test_can_extract.py).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import can
from cantools.database.can import Database, Message

from ..config import CanBusConfig
from ..drivers.can_extract import Extractor, try_compile
from ..drivers.can_read import FrameReader, bus_socket, device_gone, frame_reader, socket_drops
from ..drivers.j1939 import (
    PGN_ADDRESS_CLAIMED,
    PGN_TP_CM,
    PGN_TP_DT,
    TP_ERROR_KINDS,
    J1939Receiver,
    PgnRoutes,
    acceptance_filter,
    is_j1939_message,
)
from .metrics import CAN_ERROR_KINDS, Metrics

log = logging.getLogger(__name__)

#: (signal name, value) pairs decoded from one frame, and the frame's policy time.
SampleSink = Callable[[Sequence[tuple[str, float]], float], None]
#: Sees every received frame (error frames included) on the loop before it is decoded; returns
#: True when the frame was its own (e.g. an NM PDU), so an ID missing from the DBC is not
#: counted as `unknown_id`. Keep it cheap: it runs once per frame.
FrameHook = Callable[[can.Message], bool]
_MAX_RECONNECT_BACKOFF_S = 30.0
#: CPU time one loop callback may spend reading and decoding frames before it yields to the loop
#: (the tick, the fast path's wake, other buses); what is left is read on the next iteration.
DRAIN_BUDGET_S = 0.001
#: A frame the kernel stamped less than this ago woke the callback: nothing queued behind it.
_FRESH_S = 0.0002
_KERNEL_FILTER_INTERFACES = frozenset({"socketcan", "socketcand", "kvaser", "pcan", "vector", "ixxat"})
#: How each python-can interface (4.x) is opened in its listen-only mode, where it has one. socketcan
#: has none in python-can: listen-only is a property of the netdev (`ip link set can0 type can
#: listen-only on`); virtual and udp_multicast are software buses with no controller.
LISTEN_ONLY_OPTIONS: Mapping[str, Callable[[], dict[str, Any]]] = {
    "slcan": lambda: {"listen_only": True},
    "vector": lambda: {"listen_only": True},
    "nixnet": lambda: {"listen_only": True},
    "cantact": lambda: {"monitor": True},
    "pcan": lambda: {"state": can.BusState.PASSIVE},
    "kvaser": lambda: {"driver_mode": False},  # can.interfaces.kvaser.canlib.DRIVER_MODE_SILENT
}
#: Results of `send`, the label of cerebellumd_can_tx_frames_total.
TX_RESULTS = ("ok", "error", "refused")
#: Read on the loop: interfaces with a read that never waits (`drivers/can_read.py`).
#: Others that expose `fileno()` (python-can's `serial`, `seeedstudio`, `robotell`) read with the
#: serial port's own timeout whatever `recv` is given, so they keep the reader thread.
_LOOP_READ_INTERFACES = frozenset({"socketcan", "udp_multicast", "slcan"})


@dataclass(frozen=True, slots=True)
class FrameTap:
    """A per-frame hook and the kernel acceptance filters its frames need (where the kernel or
    adapter filters, frames outside the DBC's wanted IDs never reach us otherwise)."""

    hook: FrameHook
    filters: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class _Route:
    message: Message
    # (DBC signal, our signal name, DBC minimum, DBC maximum): real DBCs declare ranges
    # narrower than the bits, and the values outside (0xFFFF "signal not available", a
    # sender's bug) must not reach the policy as if they were measurements.
    wanted: tuple[tuple[str, str, float, float], ...]
    #: The wanted signals' values in `wanted` order, compiled from the DBC; None = cantools decodes.
    extract: Extractor | None = None


class CanIngest:
    def __init__(
        self,
        config: CanBusConfig,
        db: Database,
        wanted: Mapping[tuple[str, str], str],
        sink: SampleSink,
        metrics: Metrics,
        *,
        now: Callable[[], float] = time.monotonic,
        from_monotonic: Callable[[float], float] = lambda t: t,
        bus_factory: Callable[..., can.BusABC] | None = None,
        tap: FrameTap | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._sink = sink
        self._metrics = metrics
        self._now = now
        self._from_monotonic = from_monotonic
        self._bus_factory = bus_factory or can.Bus
        self._db = db
        self._j1939_mode = config.j1939
        self._compiled: dict[tuple[str, tuple[str, ...]], Extractor | None] = {}
        self._routes = self._build_routes(db, wanted)
        self._j1939: J1939Receiver[_Route] | None = None
        self._routes, j1939_routes = self._split_j1939(self._routes)
        if j1939_routes is not None:
            self._j1939 = J1939Receiver(j1939_routes)
            self._c_tp_errors = {k: metrics.counter(
                "cerebellumd_j1939_tp_errors", "J1939 transport sessions broken, by kind (out_of_order, "
                "duplicate, timeout, oversize, malformed, abort, superseded, unexpected, incomplete, overflow).",
                ["bus", "kind"]).labels(self.name, k) for k in TP_ERROR_KINDS}
            self._c_tp_messages = metrics.counter(
                "cerebellumd_j1939_tp_messages", "J1939 multi-packet PGs reassembled whole (BAM and CMDT).",
                ["bus"]).labels(self.name)
            self._c_claims = metrics.counter(
                "cerebellumd_j1939_address_claims", "J1939 Address Claimed PGs seen (cannot-claim included).",
                ["bus"]).labels(self.name)
            self._g_nodes = metrics.gauge(
                "cerebellumd_j1939_node_info", "1 per J1939 address with the NAME last claimed there (hex).",
                ["bus", "address", "name"])
            self._node_labels: set[tuple[str, str]] = set()
            self._claims_seen = 0
        self._tap = tap
        self._queue: collections.deque[can.Message] = collections.deque()
        self._maxlen = config.queue_size
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bus: can.BusABC | None = None
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._read: FrameReader = lambda: None
        self._fresh_s: float | None = None
        self._kernel_drops: Callable[[], int | None] = lambda: None
        self._kernel_drops_seen = 0
        self._stop = threading.Event()
        self._bus_failed = threading.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self.last_frame_at: float | None = None
        self.silent = False
        self._g_connected = metrics.can_connected.labels(self.name)
        self._set_connected(False)
        self.frames = 0
        self._frames_published = 0
        self.dropped = 0
        self.errors: collections.Counter[str] = collections.Counter()
        # Counter children resolved once: label lookups are a measurable share of per-frame cost.
        self._c_frames = metrics.can_frames.labels(self.name)
        self._c_dropped = metrics.ingest_dropped.labels(self.name)
        self._c_errors = {k: metrics.can_errors.labels(self.name, k) for k in CAN_ERROR_KINDS}
        self._wall_to_mono = time.time() - time.monotonic()
        self._c_tx = {r: metrics.can_tx_frames.labels(self.name, r) for r in TX_RESULTS}
        self.sent = 0
        self.refused = 0

    def _build_routes(self, db: Database, wanted: Mapping[tuple[str, str], str]) -> dict[tuple[int, bool], _Route]:
        per_message: dict[str, list[tuple[str, str, float, float]]] = collections.defaultdict(list)
        for (message, signal), ours in wanted.items():
            try:
                sig = db.get_message_by_name(message).get_signal_by_name(signal)
            except KeyError:  # not in this DBC: it could never yield a value
                continue
            lo = -math.inf if sig.minimum is None else float(sig.minimum)
            hi = math.inf if sig.maximum is None else float(sig.maximum)
            per_message[message].append((signal, ours, lo, hi))
        routes: dict[tuple[int, bool], _Route] = {}
        for dbc_message in db.messages:
            signals = tuple(per_message.get(dbc_message.name, ()))
            extract = self._extractor(dbc_message, tuple(s[0] for s in signals)) if signals else None
            routes[(dbc_message.frame_id, dbc_message.is_extended_frame)] = _Route(dbc_message, signals, extract)
        return routes

    def _extractor(self, message: Message, signals: tuple[str, ...]) -> Extractor | None:
        """Compiled once per (message, signal set): a reload that keeps them reuses it."""
        key = (message.name, signals)
        if key not in self._compiled:
            self._compiled[key] = try_compile(message, signals)
            if self._compiled[key] is None:
                log.debug("bus %s: %s decoded by cantools (not compilable)", self.name, message.name)
        return self._compiled[key]

    @property
    def db(self) -> Database:
        """The bus's DBC, as loaded at start (a reload checks new signals against it)."""
        return self._db

    def _split_j1939(self, routes: dict[tuple[int, bool], _Route]
                     ) -> tuple[dict[tuple[int, bool], _Route], PgnRoutes[_Route] | None]:
        """The DBC's J1939 messages (`drivers/j1939.is_j1939_message`) leave the exact-ID table
        for a table by PGN (priority and source address masked)."""
        db, mode = self._db, self._j1939_mode
        by_pgn = {key: r for key, r in routes.items() if is_j1939_message(r.message, db, mode)}
        if not by_pgn:
            return routes, None
        pgn_routes = PgnRoutes((r.message.frame_id, r) for r in by_pgn.values())
        for pgn, source in pgn_routes.conflicts:
            log.warning("bus %s: PGN %#06x from %#04x defined twice in the DBC; the first is used",
                        self.name, pgn, source)
        return {key: r for key, r in routes.items() if key not in by_pgn}, pgn_routes

    @property
    def j1939(self) -> J1939Receiver[Any] | None:
        """The bus's J1939 receiver (address table, open transport sessions), if its DBC has J1939."""
        return self._j1939

    def add_tap(self, tap: FrameTap) -> Callable[[], None]:
        """One per-frame hook per bus (NM). Add it before `async_start` for its kernel filter
        to be installed with the bus; returns the undo."""
        if self._tap is not None and self._tap is not tap:
            raise ValueError(f"bus {self.name} already has a frame tap")
        self._tap = tap

        def undo() -> None:
            if self._tap is tap:
                self._tap = None

        return undo

    def set_wanted(self, wanted: Mapping[tuple[str, str], str]) -> bool:
        """Route a reloaded config's signals (new ones decoded from the next frame on). Returns
        whether the acceptance filters changed: where the kernel filters, `async_apply_filters`
        must follow."""
        before = self.can_filters
        routes, j1939_routes = self._split_j1939(self._build_routes(self._db, wanted))
        self._routes = routes
        if self._j1939 is not None and j1939_routes is not None:
            self._j1939.routes = j1939_routes  # open transport sessions carry on
        return self.can_filters != before

    async def async_apply_filters(self) -> None:
        bus = self._bus
        if bus is not None and self.config.filters and self.config.interface in _KERNEL_FILTER_INTERFACES:
            await asyncio.to_thread(bus.set_filters, cast(Any, self.can_filters))

    @property
    def can_filters(self) -> list[dict[str, Any]]:
        filters = [
            {"can_id": m.message.frame_id, "can_mask": 0x1FFFFFFF if m.message.is_extended_frame else 0x7FF,
             "extended": m.message.is_extended_frame}
            for m in self._routes.values() if m.wanted
        ]
        if self._j1939 is not None:
            routes = self._j1939.routes
            wanted = [pgn for pgn, r in routes.by_pgn.items() if r.wanted]
            wanted += [pgn for (pgn, _), r in routes.by_source.items() if r.wanted and pgn not in wanted]
            if wanted:  # transport and address claims come along: a wanted PG may be multi-packet
                wanted += [PGN_TP_CM, PGN_TP_DT, PGN_ADDRESS_CLAIMED]
            for pgn in wanted:
                can_id, mask = acceptance_filter(pgn)
                filters.append({"can_id": can_id, "can_mask": mask, "extended": True})
        return filters + [dict(f) for f in self._tap.filters] if self._tap is not None else filters

    # -- lifecycle -------------------------------------------------------------------------

    async def async_start(self) -> None:
        """Open the bus and start its supervisor. A bus that cannot be opened yet (an adapter
        that enumerates after the daemon starts, a netdev not created yet) does not stop the
        start: the failure is counted (`bus_error`) and logged, and the supervisor opens it with
        the counted backoff (`reconnect`) while the daemon decides without its signals, which go
        stale. Only a backend python-can cannot load at all is raised."""
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        try:
            await self._async_connect()
        except can.CanInterfaceNotImplementedError:
            raise
        except (OSError, can.CanError) as exc:
            self._count_error("bus_error")
            log.error("bus %s: cannot open %s channel %r (%s); retrying from %d ms, doubling up to %.0f s",
                      self.name, self.config.interface, self.config.channel, exc, self.config.reconnect_backoff_ms,
                      _MAX_RECONNECT_BACKOFF_S)
            self._bus_failed.set()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"can-supervisor-{self.name}")

    async def async_stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._async_disconnect()
        self.publish_frames()

    async def _async_connect(self) -> None:
        cfg = self.config
        kwargs: dict[str, Any] = dict(cfg.options)
        if cfg.bitrate:
            kwargs.setdefault("bitrate", cfg.bitrate)
        if cfg.fd:
            kwargs.setdefault("fd", True)
            if cfg.data_bitrate:
                kwargs.setdefault("data_bitrate", cfg.data_bitrate)
        if cfg.filters and cfg.interface in _KERNEL_FILTER_INTERFACES:
            # Only where the kernel or adapter filters: elsewhere python-can would filter in
            # Python, and we would lose the count of unknown IDs for no CPU gain.
            kwargs["can_filters"] = self.can_filters
        kwargs["receive_own_messages"] = cfg.receive_own_messages
        if cfg.listen_only:
            for key, value in LISTEN_ONLY_OPTIONS.get(cfg.interface, dict)().items():
                kwargs.setdefault(key, value)
        factory = self._bus_factory
        bus = await asyncio.to_thread(lambda: factory(interface=cfg.interface, channel=cfg.channel, **kwargs))
        self._bus = bus
        self._bus_failed.clear()
        self._set_connected(True)
        fd = _readable_fd(bus) if cfg.interface in _LOOP_READ_INTERFACES else None
        if fd is not None:
            assert self._loop is not None
            self._read, stamped = frame_reader(cfg.interface, bus)
            self._fresh_s = _FRESH_S if stamped else None
            sock = bus_socket(bus)
            if sock is not None:
                self._kernel_drops = functools.partial(socket_drops, sock)
                self._kernel_drops_seen = self._kernel_drops() or 0
            self._loop.add_reader(fd, self._read_fd, DRAIN_BUDGET_S)
            self._fd = fd
            return
        self._thread = threading.Thread(target=self._read_forever, args=(bus,),
                                        name=f"can-reader-{self.name}", daemon=True)
        self._thread.start()

    async def _async_disconnect(self) -> None:
        self._set_connected(False)
        self._remove_reader()  # before the fd closes (uvloop keeps watching a closed fd otherwise)
        bus, self._bus = self._bus, None
        thread, self._thread = self._thread, None
        stop = self._stop
        if thread is not None:
            stop.set()
            await asyncio.to_thread(thread.join, 2.0)
        if bus is not None:
            await asyncio.to_thread(bus.shutdown)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._g_connected.set(1 if connected else 0)

    def _remove_reader(self) -> None:
        self._count_kernel_drops()
        self._kernel_drops = lambda: None
        fd, self._fd = self._fd, None
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)

    @property
    def reads_on_loop(self) -> bool:
        """Whether the bus is read on the loop (an fd) rather than by a reader thread."""
        return self._fd is not None

    # -- reader thread (buses without a file descriptor) -----------------------------------

    def _read_forever(self, bus: can.BusABC) -> None:
        queue, maxlen = self._queue, self._maxlen
        loop = self._loop
        assert loop is not None
        while not self._stop.is_set():
            try:
                msg = bus.recv(timeout=0.1)
            except Exception as exc:  # any backend error: count, report, let the supervisor recreate
                log.warning("bus %s: receive failed: %s", self.name, exc)
                self._bus_failed.set()
                loop.call_soon_threadsafe(self._count_error, "bus_error")
                return
            if msg is None:
                continue
            if len(queue) >= maxlen:
                self.dropped += 1
                # prometheus-client counters are thread-safe: counting here keeps the metric
                # equal to `dropped` (a callback scheduled on a busy loop would lag behind).
                self._c_dropped.inc()
                continue
            queue.append(msg)
            if not self._scheduled:
                self._scheduled = True
                try:
                    loop.call_soon_threadsafe(self.drain)
                except RuntimeError:  # loop closed during shutdown
                    return

    # -- loop side -------------------------------------------------------------------------

    def _count_kernel_drops(self) -> None:
        """A bus read on the loop has no queue of ours: when the loop falls behind, the kernel's
        socket buffer overflows and the kernel drops the frames. Those are counted with the
        queue's drops (`cerebellumd_ingest_dropped_total`), read from the socket each check."""
        drops = self._kernel_drops()
        if drops is None or drops <= self._kernel_drops_seen:
            return
        new, self._kernel_drops_seen = drops - self._kernel_drops_seen, drops
        self.dropped += new
        self._c_dropped.inc(new)
        log.warning("bus %s: the kernel dropped %d frames (socket receive buffer full)", self.name, new)

    def _count_error(self, kind: str) -> None:
        self.errors[kind] += 1
        self._c_errors[kind].inc()

    def drain(self, budget_s: float = DRAIN_BUDGET_S) -> None:
        """Read and decode what has arrived, for at most `budget_s` (called when the bus is
        readable or the reader thread has queued frames, and before each tick); the rest is left
        to a follow-up callback so that a flood cannot hold the loop past the ticker's deadlines."""
        if self._fd is not None:
            self._read_fd(budget_s)
        else:
            self._drain_queue(budget_s)
        self.publish_frames()

    def _read_fd(self, budget_s: float) -> None:
        """The fd is readable: read until the socket is empty or the budget is spent. What is
        left stays in the socket, which stays readable: the loop calls again on its next
        iteration. A frame the kernel received less than `_FRESH_S` ago is the one that woke us
        (frames do not queue behind it while the loop keeps up): the callback ends after it
        without a read that would find the socket empty, one system call per frame less; if
        another frame did arrive, the socket is still readable and the loop calls again."""
        bus = self._bus
        if bus is None or self._fd is None:
            return
        read = self._read
        process = self._process
        fresh_s = self._fresh_s
        wall = time.time
        clock = time.monotonic
        now_mono = clock()
        deadline = now_mono + budget_s
        n = 0
        failed = False
        try:
            while True:
                try:
                    msg = read()
                except Exception as exc:  # any backend error (malformed datagram, link down, unplugged)
                    if self._recv_failed(exc, again=failed):
                        return
                    failed = True
                    continue
                failed = False
                if msg is None:
                    return
                n += 1
                process(msg, now_mono)
                if clock() >= deadline:
                    return
                if fresh_s is not None and wall() - msg.timestamp < fresh_s:
                    return
        finally:
            if n:
                self._account(n)

    def _recv_failed(self, exc: Exception, *, again: bool) -> bool:
        """A receive error is counted once (`bus_error`). If the very next read works, the bus
        reads on: one bad datagram on udp_multicast consumed only itself, and recreating the
        socket would throw away the frames queued behind it. If it fails again, or the error says
        the device is gone (`drivers/can_read.device_gone`: an unplugged socketcan adapter leaves
        its socket unbound, so later reads find nothing and fail no more), the reader goes (a
        broken fd would spin the loop) and the supervisor recreates the bus with backoff, as for
        the reader thread. Returns whether the bus is given up."""
        gone = device_gone(exc)
        if not again:
            self._count_error("bus_error")
            log.warning("bus %s: receive failed: %s", self.name, exc)
            if not gone:
                return False
        log.warning("bus %s: receive failed %s (%s): recreating the bus", self.name,
                    "with the device gone" if gone else "again", exc)
        self._remove_reader()
        self._bus_failed.set()
        return True

    def _drain_queue(self, budget_s: float) -> None:
        self._scheduled = False
        queue = self._queue
        if not queue:
            return
        process = self._process
        clock = time.monotonic
        now_mono = clock()
        deadline = now_mono + budget_s
        n = 0
        while queue:
            msg = queue.popleft()
            n += 1
            process(msg, now_mono)
            if clock() >= deadline:
                break
        self._account(n)
        if queue and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.drain)

    def _account(self, n: int) -> None:
        self.frames += n
        self.last_frame_at = self._now()
        if self.silent:
            self.silent = False
            log.info("bus %s: traffic again", self.name)

    def publish_frames(self) -> None:
        """Bring `cerebellumd_can_frames_total` up to `frames`. A prometheus-client counter
        takes a lock at each `inc`; counting in `frames` on the hot path and publishing here
        (before each tick, at each silence check and at stop) keeps that off the per-frame cost,
        and the metric is at most one tick behind."""
        new = self.frames - self._frames_published
        if new:
            self._frames_published = self.frames
            self._c_frames.inc(new)

    def _process(self, msg: can.Message, now_mono: float) -> None:
        """One frame: the tap, error frames, routing (exact ID, then J1939 by PGN), decoding of
        the wanted signals, DBC range checks, the sink."""
        tap = self._tap
        claimed = tap.hook(msg) if tap is not None else False
        if msg.is_error_frame:
            self._count_error("error_frame")
            return
        route = self._routes.get((msg.arbitration_id, msg.is_extended_id))
        if route is None:
            j1939 = self._j1939
            if j1939 is not None and msg.is_extended_id:
                route = j1939.feed(msg.arbitration_id, msg.data, self._frame_time(msg, now_mono))
                if j1939.errors or j1939.claimed:
                    self._j1939_events(j1939)
                if route is None and j1939.consumed:
                    if j1939.messages:
                        self._j1939_messages(j1939)
                    if j1939.addresses.claims != self._claims_seen:
                        self._c_claims.inc(j1939.addresses.claims - self._claims_seen)
                        self._claims_seen = j1939.addresses.claims
                    return
            if route is None:
                if not claimed:
                    self._count_error("unknown_id")
                return
        wanted = route.wanted
        if not wanted:
            return
        extract = route.extract
        samples: list[tuple[str, float]]
        try:
            if extract is not None:
                # Compiled: every wanted signal has a number; the range check inline is the
                # largest share of this function's cost.
                values = extract(msg.data)
                samples = [(w[1], float(v)) for w, v in zip(wanted, values, strict=True) if w[2] <= v <= w[3]]
                if len(samples) != len(wanted):
                    self._count_range(len(wanted) - len(samples))
            else:  # Plain decode (no multiplexer container) returns a dict of numbers.
                decoded = cast(Mapping[str, Any], route.message.decode(msg.data, decode_choices=False))  # type: ignore[arg-type]
                samples = self._in_range(wanted, [decoded.get(w[0]) for w in wanted])
        except Exception:  # cantools raises several types for bad frames; all are bad input
            self._count_error("decode")
            return
        self._sink(samples, self._from_monotonic(self._frame_time(msg, now_mono)))

    def _count_range(self, n: int) -> None:
        """Values out of the DBC range: not measurements; counted, left to go stale."""
        self.errors["range"] += n
        self._c_errors["range"].inc(n)

    def _in_range(self, wanted: Sequence[tuple[str, str, float, float]],
                  values: Sequence[Any]) -> list[tuple[str, float]]:
        """(our signal, value) for each wanted value inside its DBC range; the others counted."""
        samples = []
        for (_, ours, lo, hi), value in zip(wanted, values, strict=True):
            if isinstance(value, int | float):  # None: a multiplexed signal absent from this frame
                if lo <= value <= hi:
                    samples.append((ours, float(value)))
                else:
                    self._count_range(1)
        return samples

    def _frame_time(self, msg: can.Message, now_mono: float) -> float:
        """The frame's receive time on our monotonic clock."""
        mono = msg.timestamp - self._wall_to_mono
        if not 0.0 <= now_mono - mono < 1.0:
            mono = now_mono  # interface clock disagrees: trust our own arrival time
        return mono

    def _j1939_messages(self, j1939: J1939Receiver[_Route]) -> None:
        """Reassembled multi-packet PGs: decoded whole and handed on like a frame. A PG shorter
        than its DBC message yields the signals it holds (J1939 PG lengths vary, e.g. DM1)."""
        for route, pg in j1939.messages:
            self._c_tp_messages.inc()
            if route is None or not route.wanted:
                continue
            try:
                values = cast(Mapping[str, Any], route.message.decode(
                    pg.data, decode_choices=False, allow_truncated=True))
            except Exception:  # cantools raises several types for bad data; all are bad input
                self._count_error("decode")
                continue
            self._sink(self._in_range(route.wanted, [values.get(w[0]) for w in route.wanted]),
                       self._from_monotonic(pg.time))
        j1939.messages.clear()

    def _j1939_events(self, j1939: J1939Receiver[_Route]) -> None:
        for error in j1939.errors:
            self._c_tp_errors[error.kind].inc()
            log.warning("bus %s: J1939 transport %s from %#04x to %#04x: %s", self.name, error.kind,
                        error.source, error.destination, error.reason)
        j1939.errors.clear()
        if j1939.claimed:
            for address, old, new in j1939.claimed:
                log.info("bus %s: J1939 address %#04x claimed by NAME %016x%s", self.name, address, new,
                         f" (was {old:016x})" if old is not None else "")
            j1939.claimed.clear()
            wanted = {(f"{a:#04x}", f"{n:016x}") for a, n in j1939.addresses.names.items()}
            for labels in self._node_labels - wanted:
                self._g_nodes.remove(self.name, *labels)
            for labels in wanted - self._node_labels:
                self._g_nodes.labels(self.name, *labels).set(1)
            self._node_labels = wanted

    def send(self, msg: can.Message) -> None:
        """Transmit one frame (NM PDUs of an active node). Blocking: call it off the loop.
        Raises CanOperationError while the bus is down; the caller counts it."""
        if self.config.listen_only:
            self.refused += 1
            self._c_tx["refused"].inc()
            raise can.CanOperationError(f"bus {self.name} is listen_only: frame 0x{msg.arbitration_id:x} not sent")
        bus = self._bus
        if bus is None or not self.connected:
            self._c_tx["error"].inc()
            raise can.CanOperationError(f"bus {self.name} is not connected")
        try:
            bus.send(msg, timeout=0.1)
        except Exception:
            self._c_tx["error"].inc()
            raise
        self.sent += 1
        self._c_tx["ok"].inc()

    async def _supervise(self) -> None:
        """Silence and failure watch: a silent bus is flagged and counted once per episode; a
        failed bus is recreated with exponential backoff. Both watches run every period, so a
        bus that stays unopenable still goes silent (and is counted so) while it is retried."""
        timeout = self.config.silence_timeout_ms / 1000
        backoff = self.config.reconnect_backoff_ms / 1000
        started = self._now()
        period = min(timeout / 4, 0.25)
        retry_at: float | None = None  # while the bus is down: when to try opening it again
        while True:
            wait = period if retry_at is None else min(period, max(0.0, retry_at - self._now()))
            await asyncio.sleep(wait)
            self._count_kernel_drops()
            self.publish_frames()
            now = self._now()
            last = self.last_frame_at if self.last_frame_at is not None else started
            if not self.silent and now - last > timeout:
                self.silent = True
                self._count_error("silent")
                log.warning("bus %s: silent for %.1f s", self.name, now - last)
            if retry_at is None and self._bus_failed.is_set():
                await self._async_disconnect()
                self._stop.clear()
                retry_at = now
            if retry_at is None or now < retry_at:
                continue
            self._count_error("reconnect")
            try:
                await self._async_connect()
            except Exception as exc:  # adapter still gone: keep trying, slower
                log.warning("bus %s: reconnect failed (%s); next in %.1f s", self.name, exc, backoff)
                retry_at = self._now() + backoff
                backoff = min(backoff * 2, _MAX_RECONNECT_BACKOFF_S)
                continue
            log.info("bus %s: reconnected", self.name)
            retry_at, backoff = None, self.config.reconnect_backoff_ms / 1000


def _readable_fd(bus: can.BusABC) -> int | None:
    """The bus's file descriptor for `add_reader`, or None (virtual and other thread-only
    backends raise NotImplementedError; slcan over a URL without fd raises CanOperationError)."""
    try:
        fd = bus.fileno()
    except (NotImplementedError, can.CanError, OSError, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None
