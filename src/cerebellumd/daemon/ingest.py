"""CAN ingest for one bus: a supervised reader thread off the loop feeds a bounded queue; the
loop drains it, decodes with cantools (one cached lookup per frame) and hands samples on.

Why our own reader and not python-can's Notifier/AsyncBufferedReader: the Notifier's
add_reader path swallows `recv` errors into the loop's exception handler and can hang an
awaiting reader (python-can #1865), its buffer is unbounded, and it does not notice a silent
bus. Here every failure is counted, the queue is bounded (drops counted), silence is detected
and the bus is recreated with backoff.
"""

from __future__ import annotations

import asyncio
import collections
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
from .metrics import Metrics

log = logging.getLogger(__name__)

#: (signal name, value) pairs decoded from one frame, and the frame's policy time.
SampleSink = Callable[[Sequence[tuple[str, float]], float], None]
#: Sees every received frame (error frames included) on the loop before it is decoded; returns
#: True when the frame was its own (e.g. an NM PDU), so an ID missing from the DBC is not
#: counted as `unknown_id`. Keep it cheap: it runs once per frame.
FrameHook = Callable[[can.Message], bool]
_MAX_RECONNECT_BACKOFF_S = 30.0
#: Frames decoded per loop callback: ~2-5 ms of CPU on a small ARM core, well inside a tick.
DRAIN_BUDGET = 256
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
        self._routes = self._build_routes(db, wanted)
        self._tap = tap
        self._queue: collections.deque[can.Message] = collections.deque()
        self._maxlen = config.queue_size
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bus: can.BusABC | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bus_failed = threading.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self.last_frame_at: float | None = None
        self.silent = False
        self.connected = False
        self.frames = 0
        self.dropped = 0
        self.errors: collections.Counter[str] = collections.Counter()
        # Counter children resolved once: label lookups are a measurable share of per-frame cost.
        self._c_frames = metrics.can_frames.labels(self.name)
        self._c_dropped = metrics.ingest_dropped.labels(self.name)
        self._c_errors = {k: metrics.can_errors.labels(self.name, k) for k in
                          ("decode", "range", "unknown_id", "error_frame", "bus_error", "silent", "reconnect")}
        self._wall_to_mono = time.time() - time.monotonic()
        self._c_tx = {r: metrics.can_tx_frames.labels(self.name, r) for r in TX_RESULTS}
        self.sent = 0
        self.refused = 0

    @staticmethod
    def _build_routes(db: Database, wanted: Mapping[tuple[str, str], str]) -> dict[tuple[int, bool], _Route]:
        per_message: dict[str, list[tuple[str, str, float, float]]] = collections.defaultdict(list)
        for (message, signal), ours in wanted.items():
            try:
                sig = db.get_message_by_name(message).get_signal_by_name(signal)
                lo = -math.inf if sig.minimum is None else float(sig.minimum)
                hi = math.inf if sig.maximum is None else float(sig.maximum)
            except KeyError:  # not in this DBC: the route below simply never yields it
                lo, hi = -math.inf, math.inf
            per_message[message].append((signal, ours, lo, hi))
        routes: dict[tuple[int, bool], _Route] = {}
        for dbc_message in db.messages:
            routes[(dbc_message.frame_id, dbc_message.is_extended_frame)] = _Route(
                dbc_message, tuple(per_message.get(dbc_message.name, ())))
        return routes

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
        self._routes = self._build_routes(self._db, wanted)
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
        return filters + [dict(f) for f in self._tap.filters] if self._tap is not None else filters

    # -- lifecycle -------------------------------------------------------------------------

    async def async_start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        await self._async_connect()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"can-supervisor-{self.name}")

    async def async_stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._async_disconnect()

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
        self._bus = await asyncio.to_thread(
            lambda: factory(interface=cfg.interface, channel=cfg.channel, **kwargs))
        self._bus_failed.clear()
        self.connected = True
        self._thread = threading.Thread(target=self._read_forever, args=(self._bus,),
                                        name=f"can-reader-{self.name}", daemon=True)
        self._thread.start()

    async def _async_disconnect(self) -> None:
        self.connected = False
        bus, self._bus = self._bus, None
        thread, self._thread = self._thread, None
        stop = self._stop
        if thread is not None:
            stop.set()
            await asyncio.to_thread(thread.join, 2.0)
        if bus is not None:
            await asyncio.to_thread(bus.shutdown)

    # -- reader thread ---------------------------------------------------------------------

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

    def _count_error(self, kind: str) -> None:
        self.errors[kind] += 1
        self._c_errors[kind].inc()

    def drain(self, budget: int = DRAIN_BUDGET) -> None:
        """Decode up to `budget` queued frames (called by the reader's wake-up and before each
        tick); the rest are left to a follow-up callback so that a flood cannot hold the loop
        past the ticker's deadlines."""
        self._scheduled = False
        queue = self._queue
        if not queue:
            return
        routes = self._routes
        sink = self._sink
        hook = self._tap.hook if self._tap is not None else None
        now_mono = time.monotonic()
        n = 0
        while queue and n < budget:
            msg = queue.popleft()
            n += 1
            claimed = hook(msg) if hook is not None else False
            if msg.is_error_frame:
                self._count_error("error_frame")
                continue
            route = routes.get((msg.arbitration_id, msg.is_extended_id))
            if route is None:
                if not claimed:
                    self._count_error("unknown_id")
                continue
            if not route.wanted:
                continue
            try:
                # Plain decode (no multiplexer container) returns a dict of numbers.
                values = cast(Mapping[str, Any], route.message.decode(msg.data, decode_choices=False))  # type: ignore[arg-type]
            except Exception:  # cantools raises several types for bad frames; all are bad input
                self._count_error("decode")
                continue
            samples = []
            for signal, ours, lo, hi in route.wanted:
                value = values.get(signal)
                if isinstance(value, int | float):
                    if lo <= value <= hi:
                        samples.append((ours, float(value)))
                    else:  # out of the DBC range: not a measurement; counted, left to go stale
                        self._count_error("range")
            mono = msg.timestamp - self._wall_to_mono
            if not 0.0 <= now_mono - mono < 1.0:
                mono = now_mono  # interface clock disagrees: trust our own arrival time
            sink(samples, self._from_monotonic(mono))
        self.frames += n
        self._c_frames.inc(n)
        self.last_frame_at = self._now()
        if self.silent:
            self.silent = False
            log.info("bus %s: traffic again", self.name)
        if queue and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.drain)

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
        failed bus is recreated with exponential backoff."""
        timeout = self.config.silence_timeout_ms / 1000
        backoff = self.config.reconnect_backoff_ms / 1000
        started = self._now()
        while True:
            await asyncio.sleep(min(timeout / 4, 0.25))
            now = self._now()
            last = self.last_frame_at if self.last_frame_at is not None else started
            if not self.silent and now - last > timeout:
                self.silent = True
                self._count_error("silent")
                log.warning("bus %s: silent for %.1f s", self.name, now - last)
            if self._bus_failed.is_set():
                await self._async_disconnect()
                self._stop.clear()
                while True:
                    self._count_error("reconnect")
                    try:
                        await self._async_connect()
                        log.info("bus %s: reconnected", self.name)
                        backoff = self.config.reconnect_backoff_ms / 1000
                        break
                    except Exception as exc:  # adapter still gone: keep trying, slower
                        log.warning("bus %s: reconnect failed (%s); next in %.1f s", self.name, exc, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, _MAX_RECONNECT_BACKOFF_S)
