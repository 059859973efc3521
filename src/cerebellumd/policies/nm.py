"""CAN network management as a pure state machine, modelled on AUTOSAR CanNm (SWS CanNm).

The gateway follows the vehicle's NM so that the accelerator sleeps when the vehicle bus sleeps
and comes back when it wakes. States and the transitions cite the CanNm SWS requirement they
follow (SWS_CanNm_00xxx, the numbering of AUTOSAR CP 4.x / R19-11); where we deviate it is said
why (see docs/network-management.md, which also says how the IDs were checked).

    BUS_SLEEP --NM PDU / network request / KL15--> REPEAT_MESSAGE
    REPEAT_MESSAGE --repeat timer, requested--> NORMAL_OPERATION
    REPEAT_MESSAGE --repeat timer, released--> READY_SLEEP
    NORMAL_OPERATION --released--> READY_SLEEP
    NORMAL_OPERATION / READY_SLEEP --NM PDU with repeat-message bit--> REPEAT_MESSAGE
    READY_SLEEP --requested--> NORMAL_OPERATION
    READY_SLEEP --NM timeout--> PREPARE_BUS_SLEEP
    PREPARE_BUS_SLEEP --NM PDU / requested--> REPEAT_MESSAGE
    PREPARE_BUS_SLEEP --wait-bus-sleep timer--> BUS_SLEEP

Besides the states: immediate NM transmissions on a network request, the message cycle offset,
remote sleep indication (and its cancellation), the control bit vector we send (active wakeup,
partial network information) and the partial-networking filter on received NM PDUs.

Pure: no I/O, no clock. Time (monotonic seconds) is passed in; every timer is an absolute
deadline kept in `NmState`, and `CanNm.next_deadline` tells a shell (live or log replay) when
the next timer fires so it can step exactly then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

# Control bit vector (byte 1 of the NM PDU by default), AUTOSAR CanNm bit positions.
CBV_REPEAT_MESSAGE_REQUEST = 0x01  # bit 0
CBV_PN_SHUTDOWN_REQUEST = 0x02  # bit 1
CBV_NM_COORDINATOR_SLEEP_READY = 0x08  # bit 3
CBV_ACTIVE_WAKEUP = 0x10  # bit 4
CBV_PARTIAL_NETWORK_LEARNING = 0x20  # bit 5
CBV_PARTIAL_NETWORK_INFORMATION = 0x40  # bit 6


class NmMode(StrEnum):
    BUS_SLEEP = "bus_sleep"
    PREPARE_BUS_SLEEP = "prepare_bus_sleep"
    REPEAT_MESSAGE = "repeat_message"
    NORMAL_OPERATION = "normal_operation"
    READY_SLEEP = "ready_sleep"


#: States of the Network Mode (the bus is awake) where a node may transmit NM PDUs.
TRANSMIT_MODES = frozenset({NmMode.REPEAT_MESSAGE, NmMode.NORMAL_OPERATION})
NETWORK_MODES = frozenset({NmMode.REPEAT_MESSAGE, NmMode.NORMAL_OPERATION, NmMode.READY_SLEEP})


@dataclass(frozen=True, slots=True)
class NmPdu:
    """One received NM PDU: the sender's node id, its control bit vector and, when the CBV's
    partial network information bit is set, the PN info bytes (CanNmPnInfoOffset/Length)."""

    source_node: int
    control: int = 0
    pn_info: bytes = b""

    @property
    def repeat_message_request(self) -> bool:
        return bool(self.control & CBV_REPEAT_MESSAGE_REQUEST)

    @property
    def active_wakeup(self) -> bool:
        return bool(self.control & CBV_ACTIVE_WAKEUP)

    @property
    def partial_network_information(self) -> bool:
        return bool(self.control & CBV_PARTIAL_NETWORK_INFORMATION)


@dataclass(frozen=True, slots=True)
class NmParams:
    """Timing and behaviour. Seconds throughout (the config speaks milliseconds)."""

    timeout_s: float = 2.0  # CanNmTimeoutTime
    repeat_message_s: float = 1.5  # CanNmRepeatMessageTime
    wait_bus_sleep_s: float = 2.0  # CanNmWaitBusSleepTime
    msg_cycle_s: float = 0.5  # CanNmMsgCycleTime (only used when not passive)
    msg_cycle_offset_s: float = 0.0  # CanNmMsgCycleOffset: first PDU after entering a transmit state
    immediate_transmissions: int = 0  # CanNmImmediateNmTransmissions (0 = none)
    immediate_cycle_s: float = 0.02  # CanNmImmediateNmCycleTime
    remote_sleep_ind_s: float | None = None  # CanNmRemoteSleepIndTime; None = CanNmRemoteSleepIndEnabled off
    node_detection: bool = True  # CanNmNodeDetectionEnabled: act on a received repeat-message bit
    active_wakeup_bit: bool = False  # CanNmActiveWakeupBitEnabled
    pn_enabled: bool = False  # CanNmPnEnabled: filter received NM PDUs by their PN info
    pn_filter_mask: tuple[int, ...] = ()  # CanNmPnFilterMaskByte per PN info byte (CanNmPnInfoLength)
    all_nm_messages_keep_awake: bool = False  # CanNmAllNmMessagesKeepAwake
    wake_validation_s: float = 1.0  # EcuM wake validation timeout
    # Not AUTOSAR: READY_SLEEP leaves for PREPARE_BUS_SLEEP only after this much silence of
    # *any* CAN traffic, so that a vehicle whose ECUs send no (or unrecognised) NM PDUs never
    # puts the accelerator to its deepest state while the car still talks. 0 = pure AUTOSAR.
    idle_timeout_s: float = 2.0
    passive: bool = True  # CanNmPassiveModeEnabled: never transmit NM PDUs
    # Not AUTOSAR (an active node may always wake the bus there): when False, an active gateway
    # transmits only while some other frame was seen within the NM timeout, i.e. it never wakes
    # a sleeping bus and never keeps one awake alone. True = a full AUTOSAR active node.
    may_wake_bus: bool = False
    battery_min_v: float = 0.0  # below: the gateway's own request no longer holds the bus


@dataclass(frozen=True, slots=True)
class NmInputs:
    """What happened since the previous step."""

    nm_pdus: tuple[NmPdu, ...] = ()
    # Any frame that is not an NM PDU (application traffic, NM IDs too short to decode). NM
    # PDUs count as activity only once they pass the PN filter (`CanNm.pn_relevant`).
    can_activity: bool = False
    ignition: bool | None = None  # KL15; None = unknown (no signal or stale)
    battery_v: float | None = None  # None = unknown: no battery guard
    local_request: bool = False  # the gateway needs the bus (a demand or lease is active)


@dataclass(frozen=True, slots=True)
class NmState:
    mode: NmMode
    since: float
    nm_deadline: float | None = None  # NM timeout (NETWORK_MODES)
    repeat_deadline: float | None = None  # repeat-message time (REPEAT_MESSAGE)
    bus_sleep_deadline: float | None = None  # wait-bus-sleep time (PREPARE_BUS_SLEEP)
    next_tx: float | None = None  # next NM PDU transmission (active nodes)
    immediate_left: int = 0  # immediate NM transmissions still to send (SWS_CanNm_00334)
    active_wakeup: bool = False  # we woke the network: CBV active-wakeup bit (SWS_CanNm_00401)
    remote_sleep_deadline: float | None = None  # remote sleep indication timer (NORMAL_OPERATION)
    remote_sleep: bool = False  # remote sleep indicated (every other node is ready to sleep)
    last_activity: float | None = None  # last frame of any kind seen on the bus
    wake_pending_since: float | None = None  # unvalidated wake event in BUS_SLEEP
    reason: str = "start"


@dataclass(frozen=True, slots=True)
class NmDecision:
    mode: NmMode
    reason: str
    changed: bool
    transmit: bool = False  # send one NM PDU now (never when passive; see NmParams.may_wake_bus)
    tx_control: int = 0  # the control bit vector of that PDU
    tx_pn_info: bytes = b""  # its PN info bytes (pn_enabled only)
    bus_sleep: bool = False  # accelerator to its deepest state; the daemon goes quiet
    network_requested: bool = False  # the effective request after the battery guard
    wakeup_validated: bool = False  # a wake event was confirmed this step
    wakeup_expired: bool = False  # a wake event was not confirmed in time (false wake)
    wakeup_pending: bool = False  # a wake event (plain frame in bus sleep) awaits validation
    remote_sleep_indication: bool = False  # remote sleep detected this step (SWS_CanNm_00150)
    remote_sleep_cancellation: bool = False  # ... and cancelled this step (SWS_CanNm_00151/00152)
    pn_filtered: int = 0  # NM PDUs of this step ignored by the PN filter


class CanNm:
    """The state machine. Immutable; all facts live in `NmState`."""

    def __init__(self, params: NmParams) -> None:
        if params.immediate_transmissions > 0 and params.immediate_cycle_s <= 0:
            raise ValueError("immediate_cycle_s must be > 0")
        if params.msg_cycle_s <= 0:
            raise ValueError("msg_cycle_s must be > 0")
        self.params = params

    def initial_state(self, now: float, mode: NmMode = NmMode.BUS_SLEEP) -> NmState:
        """Start asleep (SWS_CanNm_00141: BUS_SLEEP is the default after initialisation) unless
        the shell knows better (e.g. started while the bus already runs)."""
        if mode is NmMode.BUS_SLEEP:
            return NmState(mode=mode, since=now)
        # Started inside Network Mode: the bus is taken as alive now, so timers run from here.
        nm_deadline = now + self.params.timeout_s if mode in NETWORK_MODES else None
        base = NmState(mode=mode, since=now, nm_deadline=nm_deadline, last_activity=now)
        return self._enter(base, mode, now, "start")

    def next_deadline(self, state: NmState) -> float | None:
        """When the next timer of `state` fires: stepping then (with no inputs) acts on it, and
        the returned time always moves forward after such a step (a replayer never spins)."""
        mode = state.mode
        candidates: list[float | None]
        if mode is NmMode.BUS_SLEEP:
            candidates = [self._validation_deadline(state)]
        elif mode is NmMode.PREPARE_BUS_SLEEP:
            candidates = [state.bus_sleep_deadline]
        elif mode is NmMode.READY_SLEEP:
            idle = self._idle_deadline(state)
            nm = state.nm_deadline
            candidates = [max(nm, idle) if nm is not None and idle is not None else nm]
        else:
            candidates = [state.nm_deadline, state.repeat_deadline, self._tx_deadline(state)]
            if mode is NmMode.NORMAL_OPERATION and not state.remote_sleep:
                candidates.append(state.remote_sleep_deadline)
        deadlines = [d for d in candidates if d is not None]
        return min(deadlines) if deadlines else None

    def _tx_deadline(self, state: NmState) -> float | None:
        if self.params.passive or state.next_tx is None:
            return None
        if self.params.may_wake_bus:
            return state.next_tx
        if state.last_activity is None:
            return None
        if state.next_tx >= state.last_activity + self.params.timeout_s:
            return None  # the bus will count as asleep by then: nothing to send
        return state.next_tx

    def requested(self, inputs: NmInputs) -> bool:
        """KL15 on always requests the network; the gateway's own request only while the
        battery is not known to be low (do not hold a parked car's bus awake on a weak battery)."""
        if inputs.ignition:
            return True
        if not inputs.local_request:
            return False
        return inputs.battery_v is None or inputs.battery_v >= self.params.battery_min_v

    def pn_relevant(self, pdu: NmPdu) -> bool:
        """The partial-networking filter on a received NM PDU (CanNm SWS 7.x "Partial
        Networking"): False = the PDU is ignored for our network (no wake, no timer restart)."""
        p = self.params
        if not p.pn_enabled:
            return True  # SWS_CanNm_00409: no PN filtering
        if not pdu.partial_network_information:
            return p.all_nm_messages_keep_awake  # SWS_CanNm_00410 / SWS_CanNm_00411
        # SWS_CanNm_00412/00417/00419: relevant when a PN info bit is set that our filter mask
        # also has; SWS_CanNm_00420/00421: otherwise ignored unless all messages keep awake.
        if any(b & m for b, m in zip(pdu.pn_info, p.pn_filter_mask, strict=False)):
            return True
        return p.all_nm_messages_keep_awake

    # -- the step -------------------------------------------------------------------------

    def step(self, state: NmState, inputs: NmInputs, now: float) -> tuple[NmState, NmDecision]:
        requested = self.requested(inputs)
        pdus = tuple(pdu for pdu in inputs.nm_pdus if self.pn_relevant(pdu))
        filtered = len(inputs.nm_pdus) - len(pdus)
        if filtered:
            inputs = replace(inputs, nm_pdus=pdus)
        activity = inputs.can_activity or bool(pdus)
        if activity:
            state = replace(state, last_activity=now)
        validated = expired = False
        before = state

        if state.mode is NmMode.BUS_SLEEP:
            state, validated, expired = self._bus_sleep(state, inputs, requested, activity, now)
        elif state.mode is NmMode.PREPARE_BUS_SLEEP:
            state = self._prepare_bus_sleep(state, inputs, requested, now)
        else:
            state = self._network_mode(state, inputs, requested, now)

        transmit = False
        if self._may_transmit(state, now) and state.next_tx is not None and now >= state.next_tx:
            transmit = True
            state = self._sent(state, now)
        p = self.params
        control = (CBV_ACTIVE_WAKEUP if state.active_wakeup else 0) | (
            CBV_PARTIAL_NETWORK_INFORMATION if p.pn_enabled else 0)  # SWS_CanNm_00401 / 00413
        pn_info = b""
        if p.pn_enabled:
            # The PNs this gateway requests: those of its filter mask, while it needs the bus.
            pn_info = bytes(p.pn_filter_mask) if requested else bytes(len(p.pn_filter_mask))
        decision = NmDecision(
            mode=state.mode,
            reason=state.reason,
            changed=state.mode is not before.mode,
            transmit=transmit,
            tx_control=control if transmit else 0,
            tx_pn_info=pn_info if transmit else b"",
            bus_sleep=state.mode is NmMode.BUS_SLEEP,
            network_requested=requested,
            wakeup_validated=validated,
            wakeup_expired=expired,
            wakeup_pending=before.wake_pending_since is None and state.wake_pending_since is not None,
            remote_sleep_indication=not before.remote_sleep and state.remote_sleep,
            remote_sleep_cancellation=(before.remote_sleep and not state.remote_sleep
                                       and state.mode in NETWORK_MODES),
            pn_filtered=filtered,
        )
        return state, decision

    # -- per mode ---------------------------------------------------------------------------

    def _bus_sleep(
        self, state: NmState, inputs: NmInputs, requested: bool, activity: bool, now: float
    ) -> tuple[NmState, bool, bool]:
        pending = state.wake_pending_since is not None
        # An NM PDU or KL15 is a wake event that validates itself (and any pending one).
        if inputs.nm_pdus:
            # SWS_CanNm_00127: NM PDU in bus sleep -> network start indication; the gateway then
            # starts at once (what SWS_CanNm_00128 CanNm_PassiveStartUp does when ComM asks).
            return self._enter(state, NmMode.REPEAT_MESSAGE, now, "nm_pdu", by_request=requested), True, False
        if inputs.ignition:
            return self._enter(state, NmMode.REPEAT_MESSAGE, now, "ignition", by_request=True), True, False
        if requested:
            # SWS_CanNm_00129: network request in bus sleep -> repeat message. Unless
            # `may_wake_bus`, the gateway still transmits only once the bus shows life.
            return self._enter(state, NmMode.REPEAT_MESSAGE, now, "local_request", by_request=True), False, False
        deadline = self._validation_deadline(state)
        if deadline is not None and now >= deadline:
            # EcuM: a wake event not confirmed by an NM PDU or KL15 in time is a false wake.
            return replace(state, wake_pending_since=None, reason="wake_expired"), False, True
        if activity and not pending:
            return replace(state, wake_pending_since=now, reason="wake_pending"), False, False
        return state, False, False

    def _prepare_bus_sleep(
        self, state: NmState, inputs: NmInputs, requested: bool, now: float
    ) -> NmState:
        if requested:  # SWS_CanNm_00123
            return self._enter(state, NmMode.REPEAT_MESSAGE, now, "network_request", by_request=True)
        if inputs.nm_pdus:  # SWS_CanNm_00124
            return self._enter(state, NmMode.REPEAT_MESSAGE, now, "nm_pdu")
        if state.bus_sleep_deadline is not None and now >= state.bus_sleep_deadline:
            return self._enter(state, NmMode.BUS_SLEEP, now, "wait_bus_sleep_expired")  # 00115
        return state

    def _network_mode(
        self, state: NmState, inputs: NmInputs, requested: bool, now: float
    ) -> NmState:
        p = self.params
        if inputs.nm_pdus:
            # SWS_CanNm_00098: every received NM PDU restarts the NM timeout in Network Mode.
            state = replace(state, nm_deadline=now + p.timeout_s)
            if state.mode is NmMode.NORMAL_OPERATION and p.remote_sleep_ind_s is not None:
                state = replace(state, remote_sleep_deadline=now + p.remote_sleep_ind_s)
            if state.remote_sleep and state.mode is not NmMode.REPEAT_MESSAGE:
                state = replace(state, remote_sleep=False)  # SWS_CanNm_00151: cancellation
            repeat_bit = p.node_detection and any(pdu.repeat_message_request for pdu in inputs.nm_pdus)
            if repeat_bit and state.mode is not NmMode.REPEAT_MESSAGE:
                # SWS_CanNm_00111 (ready sleep) / SWS_CanNm_00119 (normal operation).
                return self._enter(state, NmMode.REPEAT_MESSAGE, now, "repeat_message_request")

        if state.mode is NmMode.REPEAT_MESSAGE:
            if state.repeat_deadline is not None and now >= state.repeat_deadline:
                # SWS_CanNm_00102 (the time), SWS_CanNm_00103 (requested) / 00106 (released).
                if requested:
                    return self._enter(state, NmMode.NORMAL_OPERATION, now, "repeat_done_requested")
                return self._enter(state, NmMode.READY_SLEEP, now, "repeat_done_released")
            return self._restart_expired_nm_timeout(state, now)  # SWS_CanNm_00101

        if state.mode is NmMode.NORMAL_OPERATION:
            if not requested:
                return self._enter(state, NmMode.READY_SLEEP, now, "network_released")  # 00118
            if (not state.remote_sleep and state.remote_sleep_deadline is not None
                    and now >= state.remote_sleep_deadline):
                # SWS_CanNm_00150: no NM PDU for CanNmRemoteSleepIndTime in normal operation.
                state = replace(state, remote_sleep=True, remote_sleep_deadline=None,
                                reason="remote_sleep_indication")
            return self._restart_expired_nm_timeout(state, now)  # SWS_CanNm_00117

        # READY_SLEEP
        if requested:
            return self._enter(state, NmMode.NORMAL_OPERATION, now, "network_request")  # 00110
        if state.nm_deadline is not None and now >= state.nm_deadline:
            idle = self._idle_deadline(state)
            if idle is not None and now < idle:
                return replace(state, reason="held_by_bus_activity")
            return self._enter(state, NmMode.PREPARE_BUS_SLEEP, now, "nm_timeout")  # 00109
        return state

    # -- helpers ----------------------------------------------------------------------------

    def _enter(self, state: NmState, mode: NmMode, now: float, reason: str, *,
               by_request: bool = False) -> NmState:
        p = self.params
        if mode is NmMode.REPEAT_MESSAGE:
            from_sleep = state.mode not in NETWORK_MODES
            # Entering Network Mode starts the NM timeout (SWS_CanNm_00096); entering repeat
            # message starts its timer (SWS_CanNm_00102) and (re)starts transmission
            # (SWS_CanNm_00100): after CanNmMsgCycleOffset (SWS_CanNm_00005), or at once and then
            # every CanNmImmediateNmCycleTime when a network request leaves (prepare) bus sleep
            # and CanNmImmediateNmTransmissions > 0 (SWS_CanNm_00334). Remote sleep detected
            # before is cancelled (SWS_CanNm_00152).
            keep_nm = not from_sleep and state.nm_deadline is not None and state.nm_deadline > now
            immediate = (p.immediate_transmissions if from_sleep and by_request and not p.passive else 0)
            if immediate:
                next_tx: float | None = now
            elif state.mode is NmMode.NORMAL_OPERATION and state.next_tx is not None:
                next_tx = state.next_tx  # transmission runs on in its cycle (no second PDU at once)
            else:
                next_tx = now + p.msg_cycle_offset_s
            active_wakeup = (
                (p.active_wakeup_bit and by_request) if from_sleep else state.active_wakeup
            )  # SWS_CanNm_00401
            return replace(
                state,
                mode=mode,
                since=now,
                nm_deadline=state.nm_deadline if keep_nm else now + p.timeout_s,
                repeat_deadline=now + p.repeat_message_s,
                bus_sleep_deadline=None,
                next_tx=next_tx,
                immediate_left=immediate,
                active_wakeup=active_wakeup,
                remote_sleep=False,
                remote_sleep_deadline=None,
                wake_pending_since=None,
                reason=reason,
            )
        if mode is NmMode.NORMAL_OPERATION:
            # From ready sleep held by the idle guard the NM timeout may already have run out.
            # From ready sleep transmission starts again at once (SWS_CanNm_00116, and
            # SWS_CanNm_00006 as autoas/as cites it; Arctic Core waits the offset); from repeat
            # message it just goes on. The remote sleep timer starts (SWS_CanNm_00150 counts in
            # normal operation).
            nm = state.nm_deadline
            restart_tx = state.mode is NmMode.READY_SLEEP or state.next_tx is None
            return replace(
                state, mode=mode, since=now, repeat_deadline=None, reason=reason,
                nm_deadline=nm if nm is not None and nm > now else now + p.timeout_s,
                next_tx=now if restart_tx else state.next_tx,
                remote_sleep_deadline=(
                    now + p.remote_sleep_ind_s if p.remote_sleep_ind_s is not None else None),
            )
        if mode is NmMode.READY_SLEEP:
            # SWS_CanNm_00108: transmission stops in ready sleep.
            return replace(
                state, mode=mode, since=now, repeat_deadline=None, next_tx=None, immediate_left=0,
                remote_sleep_deadline=None, reason=reason,
            )
        if mode is NmMode.PREPARE_BUS_SLEEP:
            # SWS_CanNm_00109 -> SWS_CanNm_00114; the active-wakeup bit is cleared on leaving
            # Network Mode (SWS_CanNm_00402).
            return replace(
                state, mode=mode, since=now, nm_deadline=None, repeat_deadline=None,
                next_tx=None, immediate_left=0, active_wakeup=False, remote_sleep=False,
                remote_sleep_deadline=None, bus_sleep_deadline=now + p.wait_bus_sleep_s,
                reason=reason,
            )
        return NmState(
            mode=NmMode.BUS_SLEEP, since=now, last_activity=state.last_activity, reason=reason
        )

    def _sent(self, state: NmState, now: float) -> NmState:
        """After one NM PDU went out: the next one is due one cycle later (the immediate cycle
        while immediate transmissions are left, SWS_CanNm_00334), and the transmission restarts
        the NM timeout (SWS_CanNm_00099, taking the send as its Tx confirmation)."""
        p = self.params
        left = max(0, state.immediate_left - 1)
        cycle = p.immediate_cycle_s if left > 0 else p.msg_cycle_s
        return replace(state, next_tx=now + cycle, immediate_left=left, nm_deadline=now + p.timeout_s)

    def _restart_expired_nm_timeout(self, state: NmState, now: float) -> NmState:
        if state.nm_deadline is not None and now >= state.nm_deadline:
            return replace(state, nm_deadline=now + self.params.timeout_s)
        return state

    def _validation_deadline(self, state: NmState) -> float | None:
        if state.wake_pending_since is None:
            return None
        return state.wake_pending_since + self.params.wake_validation_s

    def _idle_deadline(self, state: NmState) -> float | None:
        if state.mode is not NmMode.READY_SLEEP or self.params.idle_timeout_s <= 0:
            return None
        if state.last_activity is None:
            return None
        return state.last_activity + self.params.idle_timeout_s

    def _may_transmit(self, state: NmState, now: float) -> bool:
        """Active nodes send in repeat message and normal operation only (SWS_CanNm_00108 and
        the passive mode, SWS_CanNm_00072); unless `may_wake_bus`, only while the bus is known
        awake (some frame within the NM timeout): the gateway never wakes a sleeping bus and
        never keeps one awake alone."""
        if self.params.passive or state.mode not in TRANSMIT_MODES:
            return False
        if self.params.may_wake_bus:
            return True
        if state.last_activity is None:
            return False
        return now - state.last_activity < self.params.timeout_s
