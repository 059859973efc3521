"""CAN network management in the daemon: follow the vehicle's CanNm (docs/network-management.md).

Wiring (all through the daemon's extension points, nothing runs before `async_start`):

- a `FrameTap` on the NM bus's `CanIngest` feeds every frame to an `NmInputCollector` (no second
  socket); the tap's kernel filter lets the NM ID range through where the kernel filters;
- a tick hook steps the pure `CanNm` on each decision tick;
- an actuator target filter clamps the accelerator to its deepest state (the policy's
  `deepest_state` floor) in prepare-bus-sleep and bus-sleep, and `Daemon.quiet_bus` tells the
  policy that signals going stale then are quiet, not failed (no fail-safe wake);
- in bus sleep the daemon pauses (tickers stopped); frames (the tap), inputs from other sources
  (`Daemon.wake_hooks`: KL15 from the MCU), lease changes and the NM timer (`call_later` at
  `CanNm.next_deadline`) step NM instead. Leaving bus sleep resumes the daemon with the samples
  cleared and the policy state reset.

Passive by default: with `passive = false` an NM PDU is sent only when the state machine says so
(`NmDecision.transmit`, never on a sleeping bus), off the loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import can
from prometheus_client import Counter, Gauge

from ..accel import AccelState
from ..policies.nm import CanNm, NmDecision, NmMode, NmState
from ..policies.types import HoldMode
from .ingest import FrameTap
from .lease_service import LeaseService
from .nm_frames import NmInputCollector, encode_nm_frame

if TYPE_CHECKING:
    from .runtime import Daemon

log = logging.getLogger(__name__)

#: NM modes in which the accelerator is held in its deepest state and staleness is expected.
QUIET_MODES = frozenset({NmMode.PREPARE_BUS_SLEEP, NmMode.BUS_SLEEP})


class NmService:
    """A daemon service; registers its hooks at construction."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        cfg = self.config = daemon.config.nm
        self.nm = CanNm(cfg.params())
        self.layout = cfg.layout()
        self.collector = NmInputCollector(self.layout)
        self.bus = cfg.bus or daemon.config.can[0].name
        self.state: NmState | None = None
        self.last: NmDecision | None = None
        self.transitions = 0
        self.sent = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tx: set[asyncio.Task[None]] = set()
        self._stepping = False
        r = daemon.metrics.registry
        self.m_state = Gauge("cerebellumd_nm_state", "1 for the current CAN NM state.", ["state"], registry=r)
        self.m_transitions = Counter("cerebellumd_nm_transitions", "CAN NM state changes, by state entered.",
                                     ["state"], registry=r)
        self.m_pdus = Counter("cerebellumd_nm_pdus", "NM PDUs received.", registry=r)
        self.m_malformed = Counter("cerebellumd_nm_malformed", "Frames with an NM ID too short for the layout.",
                                   registry=r)
        self.m_tx = Counter("cerebellumd_nm_tx", "NM PDUs sent (active nodes), by result.", ["result"], registry=r)
        for mode in NmMode:
            self.m_state.labels(mode.value).set(0)
            self.m_transitions.labels(mode.value)
        for result in ("ok", "error"):
            self.m_tx.labels(result)
        extended = cfg.nm_id_base > 0x7FF
        nm_filter = {"can_id": cfg.nm_id_base, "can_mask": cfg.nm_id_mask, "extended": extended}
        daemon.frame_taps[self.bus] = FrameTap(self._on_frame, (nm_filter,))
        daemon.tick_hooks.append(self._on_tick)
        daemon.wake_hooks.append(self._on_input)
        daemon.actuator.target_filters.append(self._clamp)

    # -- service ----------------------------------------------------------------------------

    async def async_start(self) -> None:
        now = self.daemon.clock.now()
        # SWS_CanNm_00141: start in bus sleep. A running bus validates itself within one NM
        # message cycle; until then the accelerator stays in its deepest state.
        self.state = self.nm.initial_state(now)
        self._show(self.state.mode)
        for service in self.daemon.services:
            if isinstance(service, LeaseService):  # a lease may need the bus while it sleeps
                service.listeners.append(self._on_lease_change)
        self._apply(self.state, None, now)

    async def async_stop(self) -> None:
        self._cancel_timer()
        tasks, self._tx = list(self._tx), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def state_extra(self) -> dict[str, Any]:
        """For MQTT `state`: the NM mode and why."""
        s = self.state
        return {"nm": {"state": s.mode.value if s else None, "reason": s.reason if s else None,
                       "transitions": self.transitions}}

    @property
    def mode(self) -> NmMode | None:
        return self.state.mode if self.state is not None else None

    # -- inputs -----------------------------------------------------------------------------

    def _on_frame(self, msg: can.Message) -> bool:
        malformed = self.collector.malformed
        self.collector.add(msg)
        if self.collector.malformed != malformed:
            self.m_malformed.inc()
        if self.daemon.paused:
            self._step(self.daemon.clock.now())  # no ticks in bus sleep: frames step NM
        return not msg.is_error_frame and self.layout.is_nm_id(msg.arbitration_id)

    def _on_input(self, now: float) -> None:
        self._step(self.daemon.clock.now())  # e.g. KL15 from the MCU while paused

    def _on_lease_change(self) -> None:
        if self.daemon.paused:
            self._step(self.daemon.clock.now())

    def _on_timer(self) -> None:
        self._timer = None
        self._step(self.daemon.clock.now())

    def _on_tick(self, now: float) -> None:
        self._step(now)

    def _signal(self, name: str | None, now: float) -> float | None:
        if name is None:
            return None
        sample = self.daemon.samples.get(name)
        spec = self.daemon.config.signals.get(name)
        if sample is None or spec is None or now - sample.time > spec.max_age_ms / 1000:
            return None  # unknown: no sample yet, or stale
        return sample.value

    def local_request(self, now: float) -> bool:
        """The gateway needs the bus: an awake hold or lease, or a demand that is active on fresh
        signals. A demand woken only because its signals went stale does not count: the silence
        of a bus going to sleep must not hold that bus awake."""
        d = self.daemon
        if any(h.mode is HoldMode.AWAKE for h in d.active_holds(now)):
            return True
        if d.paused or not d.params.demands:
            return False
        snap = d.snapshot()
        stale = set(snap.stale_signals)
        active = set(snap.active_demands)
        return any(spec.name in active and not (set(spec.expression.names) & stale)
                   for spec in d.params.demands)

    # -- the step ---------------------------------------------------------------------------

    def _step(self, now: float) -> None:
        if self.state is None or self._stepping:
            return
        self._stepping = True  # resume() below must not re-enter through the hooks
        try:
            ignition = self._signal(self.config.ignition_signal, now)
            inputs = self.collector.take(
                ignition=None if ignition is None else ignition != 0,
                battery_v=self._signal(self.config.battery_signal, now),
                local_request=self.local_request(now),
            )
            self.m_pdus.inc(len(inputs.nm_pdus))
            before = self.state
            self.state, decision = self.nm.step(self.state, inputs, now)
            self.last = decision
            self._apply(before, decision, now)
        finally:
            self._stepping = False

    def _apply(self, before: NmState, decision: NmDecision | None, now: float) -> None:
        assert self.state is not None
        d = self.daemon
        mode = self.state.mode
        if decision is not None:
            if decision.changed:
                self.transitions += 1
                self.m_transitions.labels(mode.value).inc()
                self._show(mode, before.mode)
                log.info("NM %s -> %s (%s)", before.mode.value, mode.value, decision.reason)
            if decision.wakeup_validated:
                d.metrics.wake_validations.labels("validated").inc()
            if decision.wakeup_expired:
                d.metrics.wake_validations.labels("expired").inc()
            if decision.transmit:
                self._transmit()
        quiet = mode in QUIET_MODES
        if quiet != d.quiet_bus:
            d.quiet_bus = quiet
            # Apply (or lift) the clamp now, not at the next decision (there is none in bus sleep).
            goal = d.actuator.goal if d.actuator.goal is not None else d.actuator.state
            if goal in (AccelState.UNKNOWN, AccelState.WAKING, AccelState.SUSPENDING):
                goal = self._deepest()
            d.actuator.goal = None  # re-evaluate through the filters even if the goal is the same
            d.actuator.request(goal)
        if mode is NmMode.BUS_SLEEP and not d.paused:
            d.pause()
        elif mode is not NmMode.BUS_SLEEP and d.paused:
            # A validated wake (NM PDU, KL15) or our own request: everything comes back, with
            # samples from before the sleep dropped and the policy started afresh.
            d.resume(reset=True)
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """In bus sleep no tick steps NM: its next deadline (wake validation) gets a timer."""
        self._cancel_timer()
        if not self.daemon.paused or self.state is None:
            return
        deadline = self.nm.next_deadline(self.state)
        if deadline is None:
            return
        delay = max(0.0, self.daemon.clock.wall_seconds(deadline - now))
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
        return self.daemon.params.deepest_state

    def _clamp(self, target: AccelState) -> AccelState:
        if self.state is not None and self.state.mode in QUIET_MODES:
            return self._deepest()
        return target

    def _transmit(self) -> None:
        ingest = next((i for i in self.daemon.ingests if i.name == self.bus), None)
        if ingest is None:
            return
        msg = encode_nm_frame(self.config.node_id, self.layout)
        task = asyncio.get_running_loop().create_task(self._send(ingest.send, msg), name="nm-tx")
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


def attach_nm(daemon: Daemon) -> NmService | None:
    """Called from Daemon._attach_services: only with `[nm] enabled = true` and a CAN bus."""
    if not daemon.config.nm.enabled or not daemon.config.can:
        return None
    service = NmService(daemon)
    daemon.services.append(service)
    return service


__all__ = ["QUIET_MODES", "NmService", "attach_nm"]
