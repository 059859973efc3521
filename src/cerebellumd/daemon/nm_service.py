"""CAN network management in the daemon: follow the vehicle's CanNm (docs/network-management.md).

Wiring (all through the host interface and the peers the assembly passes; nothing is registered
before `async_start`, and `async_stop` undoes every registration):

- a `FrameTap` on the NM bus's `CanIngest` (passed in as a peer) feeds every frame to an `NmInputCollector` (no second
  socket); the tap's kernel filter lets the NM ID range through where the kernel filters;
- a tick hook steps the pure `CanNm` on each decision tick, and a timer (`call_later` at
  `CanNm.next_deadline`) steps it exactly when an NM timer fires (repeat message, NM timeout,
  wait bus sleep, remote sleep, the next NM PDU of an active node, wake validation);
- an actuator target filter clamps the accelerator to its deepest state (the policy's
  `deepest_state` floor) in prepare-bus-sleep and bus-sleep, and `set_quiet` tells the
  policy that signals going stale then are quiet, not failed (no fail-safe wake);
- in bus sleep the daemon pauses (tickers stopped); frames (the tap), inputs from other sources
  (`on_input_while_paused`: KL15 from the MCU), lease changes and the NM timer step NM instead.
  Leaving bus sleep resumes the daemon with the samples cleared and the policy state reset.

Passive by default: with `passive = false` an NM PDU is sent only when the state machine says so
(`NmDecision.transmit`, with its control bit vector and PN info), off the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import can

from ..accel import AccelState
from ..config.nm import NmConfig
from ..policies.nm import CanNm, NmDecision, NmMode, NmState
from ..policies.types import HoldMode
from .clock import Clock
from .host import AcceleratorHost, BusHost, Events, HoldsHost, Inputs, Undo
from .ingest import CanIngest, FrameTap
from .lease_service import LeaseService
from .metrics import Metrics
from .nm_frames import NmInputCollector, encode_nm_frame

log = logging.getLogger(__name__)

#: NM modes in which the accelerator is held in its deepest state and staleness is expected.
QUIET_MODES = frozenset({NmMode.PREPARE_BUS_SLEEP, NmMode.BUS_SLEEP})


class NmHost(Events, Inputs, HoldsHost, BusHost, Protocol):
    """What NM needs of the daemon: events, fresh signals, holds, and pause/resume/quiet."""


class NmService:
    """A part; registers its hooks at start (undone at stop)."""

    def __init__(self, cfg: NmConfig, *, ingest: CanIngest, host: NmHost, actuator: AcceleratorHost,
                 clock: Clock, metrics: Metrics, leases: LeaseService | None = None,
                 ignition: Callable[[float], bool | None] | None = None) -> None:
        self._host = host
        self._actuator = actuator
        self._clock = clock
        self._metrics = metrics
        self._ingest = ingest
        self._leases = leases
        # With [vehicle_power]: the fused ignition (daemon/vehicle_power.py) replaces ignition_signal.
        self._ignition = ignition
        self.local_requested = False
        self._undo: list[Undo] = []
        self.config = cfg
        self.nm = CanNm(cfg.params())
        self.layout = cfg.layout()
        self.collector = NmInputCollector(self.layout)
        self.bus = ingest.name
        self.state: NmState | None = None
        self.last: NmDecision | None = None
        self.transitions = 0
        self.sent = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tx: set[asyncio.Task[None]] = set()
        self._stepping = False
        self._quiet = False
        self.m_state = metrics.gauge("cerebellumd_nm_state", "1 for the current CAN NM state.", ["state"])
        self.m_transitions = metrics.counter("cerebellumd_nm_transitions",
                                             "CAN NM state changes, by state entered.", ["state"])
        self.m_pdus = metrics.counter("cerebellumd_nm_pdus", "NM PDUs received.")
        self.m_malformed = metrics.counter("cerebellumd_nm_malformed",
                                           "Frames with an NM ID too short for the layout.")
        self.m_tx = metrics.counter("cerebellumd_nm_tx", "NM PDUs sent (active nodes), by result.", ["result"])
        self.m_pn_filtered = metrics.counter(
            "cerebellumd_nm_pn_filtered", "NM PDUs ignored: their PN info matches none of our partial networks.")
        self.m_remote_sleep = metrics.gauge(
            "cerebellumd_nm_remote_sleep", "1 while remote sleep is indicated (every other NM node is ready to sleep).")
        self.m_remote_sleep.set(0)
        for mode in NmMode:
            self.m_state.labels(mode.value).set(0)
            self.m_transitions.labels(mode.value)
        for result in ("ok", "error"):
            self.m_tx.labels(result)
        extended = cfg.nm_id_base > 0x7FF
        self._tap = FrameTap(self._on_frame, ({"can_id": cfg.nm_id_base, "can_mask": cfg.nm_id_mask,
                                               "extended": extended},))

    # -- service ----------------------------------------------------------------------------

    async def async_start(self) -> None:
        # Registered before the bus opens, so the tap's kernel filter is installed with it.
        self._undo += [
            self._ingest.add_tap(self._tap),
            self._host.on_tick(self._on_tick),
            self._host.on_input_while_paused(self._on_input),
            self._actuator.add_target_filter("path:quiet_bus", self._clamp),
        ]
        if self._leases is not None:  # a lease may need the bus while it sleeps
            self._undo.append(self._leases.on_change(self._on_lease_change))
        now = self._clock.now()
        # SWS_CanNm_00141: start in bus sleep. A running bus validates itself within one NM
        # message cycle; until then the accelerator stays in its deepest state.
        self.state = self.nm.initial_state(now)
        self._show(self.state.mode)
        self._apply(self.state, None, now)

    async def async_stop(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._cancel_timer()
        tasks, self._tx = list(self._tx), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def state_extra(self) -> dict[str, Any]:
        """For MQTT `state`: the NM mode and why."""
        s = self.state
        return {"nm": {"state": s.mode.value if s else None, "reason": s.reason if s else None,
                       "transitions": self.transitions, "remote_sleep": s.remote_sleep if s else False}}

    @property
    def mode(self) -> NmMode | None:
        return self.state.mode if self.state is not None else None

    # -- inputs -----------------------------------------------------------------------------

    def _on_frame(self, msg: can.Message) -> bool:
        malformed = self.collector.malformed
        self.collector.add(msg)
        if self.collector.malformed != malformed:
            self.m_malformed.inc()
        if self._host.paused:
            self._step(self._clock.now())  # no ticks in bus sleep: frames step NM
        return not msg.is_error_frame and self.layout.is_nm_id(msg.arbitration_id)

    def _on_input(self, now: float) -> None:
        self._step(self._clock.now())  # e.g. KL15 from the MCU while paused

    def _on_lease_change(self) -> None:
        if self._host.paused:
            self._step(self._clock.now())

    def _on_timer(self) -> None:
        self._timer = None
        self._step(self._clock.now())

    def _on_tick(self, now: float) -> None:
        self._step(now)

    def local_request(self, now: float) -> bool:
        """The gateway needs the bus: an awake hold or lease, or a demand that is active on fresh
        signals. A demand woken only because its signals went stale does not count: the silence
        of a bus going to sleep must not hold that bus awake."""
        if any(h.mode is HoldMode.AWAKE for h in self._host.active_holds(now)):
            return True
        return self._host.demand_needs_bus(now)

    # -- the step ---------------------------------------------------------------------------

    def _step(self, now: float) -> None:
        if self.state is None or self._stepping:
            return
        self._stepping = True  # resume() below must not re-enter through the hooks
        try:
            fused: bool | None
            if self._ignition is not None:
                fused = self._ignition(now)
            else:
                ignition = self._host.signal_value(self.config.ignition_signal, now)
                fused = None if ignition is None else ignition != 0
            self.local_requested = self.local_request(now)
            inputs = self.collector.take(
                ignition=fused,
                battery_v=self._host.signal_value(self.config.battery_signal, now),
                local_request=self.local_requested,
            )
            self.m_pdus.inc(len(inputs.nm_pdus))
            for pdu in inputs.nm_pdus:
                if pdu.active_wakeup:
                    log.debug("NM PDU from node 0x%X with the active-wakeup bit", pdu.source_node)
            before = self.state
            self.state, decision = self.nm.step(self.state, inputs, now)
            self.last = decision
            self._apply(before, decision, now)
        finally:
            self._stepping = False

    def _apply(self, before: NmState, decision: NmDecision | None, now: float) -> None:
        assert self.state is not None
        host = self._host
        mode = self.state.mode
        if decision is not None:
            if decision.changed:
                self.transitions += 1
                self.m_transitions.labels(mode.value).inc()
                self._show(mode, before.mode)
                log.info("NM %s -> %s (%s)", before.mode.value, mode.value, decision.reason)
            if decision.wakeup_validated:
                self._metrics.wake_validations.labels("validated").inc()
            if decision.wakeup_expired:
                self._metrics.wake_validations.labels("expired").inc()
            if decision.pn_filtered:
                self.m_pn_filtered.inc(decision.pn_filtered)
            if decision.remote_sleep_indication:
                self.m_remote_sleep.set(1)
                log.info("NM remote sleep indication: no NM PDU for %s ms in normal operation",
                         self.config.remote_sleep_ind_ms)
            if decision.remote_sleep_cancellation or (not self.state.remote_sleep and decision.changed):
                if decision.remote_sleep_cancellation:
                    log.info("NM remote sleep cancelled (%s)", decision.reason)
                self.m_remote_sleep.set(1 if self.state.remote_sleep else 0)
            if decision.transmit:
                self._transmit(decision.tx_control, decision.tx_pn_info)
        quiet = mode in QUIET_MODES
        if quiet != self._quiet:
            self._quiet = quiet
            host.set_quiet(quiet)
            # Apply (or lift) the clamp now, not at the next decision (there is none in bus sleep).
            self._actuator.reapply(self._deepest())
        if mode is NmMode.BUS_SLEEP and not host.paused:
            host.pause()
        elif mode is not NmMode.BUS_SLEEP and host.paused:
            # A validated wake (NM PDU, KL15) or our own request: everything comes back, with
            # samples from before the sleep dropped and the policy started afresh.
            host.resume(reset=True)
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """The next NM deadline gets a timer, so every timer acts when it fires rather than at
        the next decision tick (and in bus sleep, where there are no ticks)."""
        self._cancel_timer()
        if self.state is None:
            return
        deadline = self.nm.next_deadline(self.state)
        if deadline is None:
            return
        delay = max(0.0, self._clock.wall_seconds(deadline - now))
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _show(self, mode: NmMode, old: NmMode | None = None) -> None:
        if old is not None:
            self.m_state.labels(old.value).set(0)
        self.m_state.labels(mode.value).set(1)

    # -- clamp and transmit -------------------------------------------------------------------

    def _deepest(self) -> AccelState:
        return self._host.deepest_state

    def _clamp(self) -> AccelState | None:
        if self.state is not None and self.state.mode in QUIET_MODES:
            return self._deepest()
        return None

    def _transmit(self, control: int, pn_info: bytes) -> None:
        msg = encode_nm_frame(self.config.node_id, self.layout, control, pn_info)
        task = asyncio.get_running_loop().create_task(self._send(self._ingest.send, msg), name="nm-tx")
        self._tx.add(task)
        task.add_done_callback(self._tx.discard)

    async def _send(self, send: Any, msg: can.Message) -> None:
        try:
            await asyncio.to_thread(send, msg)
            self.sent += 1
            self.m_tx.labels("ok").inc()
        except Exception as exc:  # a bus down or a full tx queue: counted; the next cycle retries
            self.m_tx.labels("error").inc()
            log.warning("NM PDU not sent on %s: %s", self.bus, exc)


__all__ = ["QUIET_MODES", "NmService"]
