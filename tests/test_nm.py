"""CanNm state machine: AUTOSAR transitions (table), wake validation, the idle guard, and
properties over random input sequences (passive never transmits; nothing is sent on a
sleeping bus; timers always move forward)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cerebellumd.config.nm import NmConfig
from cerebellumd.daemon.nm_frames import (
    NmFrameError,
    NmFrameLayout,
    NmInputCollector,
    decode_nm_frame,
    encode_nm_frame,
    replay_nm_log,
)
from cerebellumd.policies.nm import (
    CBV_ACTIVE_WAKEUP,
    CBV_PARTIAL_NETWORK_INFORMATION,
    CBV_REPEAT_MESSAGE_REQUEST,
    CanNm,
    NmDecision,
    NmInputs,
    NmMode,
    NmParams,
    NmPdu,
    NmState,
)

BS, PBS = NmMode.BUS_SLEEP, NmMode.PREPARE_BUS_SLEEP
RM, NO, RS = NmMode.REPEAT_MESSAGE, NmMode.NORMAL_OPERATION, NmMode.READY_SLEEP

# Pure AUTOSAR timing (no idle guard) so each row tests exactly one SWS transition.
AUTOSAR = NmParams(
    timeout_s=2.0, repeat_message_s=1.5, wait_bus_sleep_s=2.0, wake_validation_s=1.0,
    idle_timeout_s=0.0, passive=True, battery_min_v=11.8,
)
PDU = NmPdu(source_node=0x12)
PDU_RMR = NmPdu(source_node=0x12, control=CBV_REPEAT_MESSAGE_REQUEST)
NONE = NmInputs()


@dataclass(frozen=True)
class Row:
    name: str
    start: NmMode
    inputs: NmInputs
    at: float
    expect: NmMode
    reason: str | None = None


ROWS = [
    Row("bus sleep + NM PDU -> repeat message", BS, NmInputs(nm_pdus=(PDU,)), 0.1, RM, "nm_pdu"),
    Row("bus sleep + KL15 -> repeat message", BS, NmInputs(ignition=True), 0.1, RM, "ignition"),
    Row("bus sleep + local request -> repeat message", BS, NmInputs(local_request=True), 0.1, RM,
        "local_request"),
    Row("bus sleep + local request on low battery stays", BS,
        NmInputs(local_request=True, battery_v=11.0), 0.1, BS),
    Row("bus sleep + plain CAN frame: wake pending only", BS, NmInputs(can_activity=True), 0.1,
        BS, "wake_pending"),
    Row("repeat message expiry, requested -> normal operation", RM,
        NmInputs(local_request=True), 1.5, NO, "repeat_done_requested"),
    Row("repeat message expiry, KL15 -> normal operation", RM, NmInputs(ignition=True), 1.5, NO),
    Row("repeat message expiry, released -> ready sleep", RM, NONE, 1.5, RS,
        "repeat_done_released"),
    Row("repeat message before expiry stays", RM, NONE, 1.49, RM),
    Row("repeat message + RMR bit stays", RM, NmInputs(nm_pdus=(PDU_RMR,)), 0.5, RM),
    Row("ready sleep + NM timeout -> prepare bus sleep", RS, NONE, 2.0, PBS, "nm_timeout"),
    Row("ready sleep before NM timeout stays", RS, NONE, 1.99, RS),
    Row("ready sleep + request -> normal operation", RS, NmInputs(local_request=True), 0.5, NO,
        "network_request"),
    Row("ready sleep + RMR bit -> repeat message", RS, NmInputs(nm_pdus=(PDU_RMR,)), 0.5, RM,
        "repeat_message_request"),
    Row("ready sleep + NM PDU stays", RS, NmInputs(nm_pdus=(PDU,)), 0.5, RS),
    Row("normal operation + RMR bit -> repeat message", NO, NmInputs(
        nm_pdus=(PDU_RMR,), local_request=True), 0.5, RM, "repeat_message_request"),
    Row("normal operation + release -> ready sleep", NO, NONE, 0.5, RS, "network_released"),
    Row("normal operation + NM timeout, requested: stays", NO, NmInputs(ignition=True), 2.5, NO),
    Row("prepare bus sleep + wait-bus-sleep expiry -> bus sleep", PBS, NONE, 2.0, BS,
        "wait_bus_sleep_expired"),
    Row("prepare bus sleep before expiry stays", PBS, NONE, 1.99, PBS),
    Row("prepare bus sleep + NM PDU -> repeat message", PBS, NmInputs(nm_pdus=(PDU,)), 1.0, RM,
        "nm_pdu"),
    Row("prepare bus sleep + request -> repeat message", PBS, NmInputs(local_request=True), 1.0,
        RM, "network_request"),
    Row("prepare bus sleep + KL15 -> repeat message", PBS, NmInputs(ignition=True), 1.0, RM),
    Row("prepare bus sleep + plain CAN frame stays", PBS, NmInputs(can_activity=True), 1.0, PBS),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_autosar_transition(row: Row) -> None:
    nm = CanNm(AUTOSAR)
    state = nm.initial_state(0.0, row.start)
    state, decision = nm.step(state, row.inputs, row.at)
    assert decision.mode is row.expect
    assert decision.changed is (row.expect is not row.start)
    assert decision.bus_sleep is (row.expect is BS)
    if row.reason is not None:
        assert decision.reason == row.reason


@pytest.mark.parametrize("mode", [NO, RS])
def test_nm_pdu_restarts_nm_timeout(mode: NmMode) -> None:
    nm = CanNm(AUTOSAR)
    requested = NmInputs(local_request=True) if mode is NO else NONE
    state = nm.initial_state(0.0, mode)
    state, _ = nm.step(state, NmInputs(nm_pdus=(PDU,), local_request=requested.local_request), 1.9)
    assert state.nm_deadline == pytest.approx(3.9)
    state, d = nm.step(state, requested, 3.0)  # past the first timeout, before the restarted
    assert d.mode is mode


def test_nm_timeout_in_repeat_message_restarts() -> None:
    nm = CanNm(NmParams(timeout_s=1.0, repeat_message_s=3.0, idle_timeout_s=0.0))
    state = nm.initial_state(0.0, RM)
    state, d = nm.step(state, NONE, 1.0)
    assert d.mode is RM
    assert state.nm_deadline == pytest.approx(2.0)  # SWS_CanNm_00101


def test_full_cycle_wake_to_sleep_at_the_right_times() -> None:
    nm = CanNm(AUTOSAR)
    state = nm.initial_state(0.0)
    state, d = nm.step(state, NmInputs(nm_pdus=(PDU,)), 10.0)
    assert (d.mode, d.wakeup_validated) == (RM, True)
    # Last NM PDU at 10.0: repeat ends 11.5 -> ready sleep; NM timeout 12.0 -> prepare;
    # wait-bus-sleep 14.0 -> bus sleep. Walk the deadlines as a shell would.
    timeline = []
    while (deadline := nm.next_deadline(state)) is not None and deadline < 100:
        state, d = nm.step(state, NONE, deadline)
        if d.changed:
            timeline.append((deadline, d.mode))
    assert timeline == [(11.5, RS), (12.0, PBS), (14.0, BS)]


def test_idle_guard_holds_ready_sleep_while_traffic_continues() -> None:
    nm = CanNm(NmParams(timeout_s=2.0, idle_timeout_s=1.0))
    state = nm.initial_state(0.0, RS)
    state, _ = nm.step(state, NmInputs(can_activity=True), 1.8)  # application frame, no NM PDU
    state, d = nm.step(state, NONE, 2.0)
    assert (d.mode, d.reason) == (RS, "held_by_bus_activity")
    assert nm.next_deadline(state) == pytest.approx(2.8)
    state, d = nm.step(state, NONE, 2.8)
    assert d.mode is PBS


class TestWakeValidation:
    def test_unconfirmed_wake_expires(self) -> None:
        nm = CanNm(AUTOSAR)
        state, d = nm.step(nm.initial_state(0.0), NmInputs(can_activity=True), 5.0)
        assert d.reason == "wake_pending" and not d.wakeup_expired
        assert nm.next_deadline(state) == pytest.approx(6.0)
        state, d = nm.step(state, NONE, 6.0)
        assert (d.mode, d.wakeup_expired, d.wakeup_validated) == (BS, True, False)
        assert state.wake_pending_since is None

    @pytest.mark.parametrize(
        "confirm", [NmInputs(nm_pdus=(PDU,)), NmInputs(ignition=True)], ids=["nm_pdu", "kl15"]
    )
    def test_wake_confirmed_in_time_is_validated(self, confirm: NmInputs) -> None:
        nm = CanNm(AUTOSAR)
        state, _ = nm.step(nm.initial_state(0.0), NmInputs(can_activity=True), 5.0)
        state, d = nm.step(state, confirm, 5.9)
        assert (d.mode, d.wakeup_validated, d.wakeup_expired) == (RM, True, False)

    def test_local_request_is_no_wake_event(self) -> None:
        nm = CanNm(AUTOSAR)
        _, d = nm.step(nm.initial_state(0.0), NmInputs(local_request=True), 1.0)
        assert d.mode is RM and not d.wakeup_validated


class TestActiveTransmission:
    params = NmParams(passive=False, msg_cycle_s=0.5, timeout_s=2.0, repeat_message_s=1.5)

    def test_active_node_sends_on_an_awake_bus(self) -> None:
        nm = CanNm(self.params)
        state, d = nm.step(nm.initial_state(0.0), NmInputs(nm_pdus=(PDU,)), 1.0)
        assert d.transmit  # SWS_CanNm_00005-style immediate start in repeat message
        state, d = nm.step(state, NONE, 1.2)
        assert not d.transmit  # not before the next cycle
        state, d = nm.step(state, NONE, 1.5)
        assert d.transmit

    def test_active_node_never_wakes_a_sleeping_bus(self) -> None:
        nm = CanNm(self.params)
        state, d = nm.step(nm.initial_state(0.0), NmInputs(local_request=True), 1.0)
        assert d.mode is RM and not d.transmit
        state, d = nm.step(state, NmInputs(local_request=True), 1.5)
        assert not d.transmit
        # The bus shows life: now the gateway joins in.
        state, d = nm.step(state, NmInputs(local_request=True, can_activity=True), 1.6)
        assert d.transmit

    def test_active_node_stops_when_it_would_keep_the_bus_awake_alone(self) -> None:
        nm = CanNm(self.params)
        state, _ = nm.step(nm.initial_state(0.0), NmInputs(nm_pdus=(PDU,)), 0.0)
        sent = []
        t = 0.0
        while t < 5.0:
            t = round(t + 0.1, 6)
            state, d = nm.step(state, NmInputs(local_request=True), t)
            if d.transmit:
                sent.append(t)
        assert sent and max(sent) < 2.0  # nobody else spoke after 0.0; NM timeout is 2.0


# -- properties ---------------------------------------------------------------------------------

pdus = st.builds(NmPdu, source_node=st.integers(0, 255), control=st.integers(0, 255),
                 pn_info=st.binary(max_size=2))
inputs = st.builds(
    NmInputs,
    nm_pdus=st.lists(pdus, max_size=2).map(tuple),
    can_activity=st.booleans(),
    ignition=st.one_of(st.none(), st.booleans()),
    battery_v=st.one_of(st.none(), st.floats(9.0, 15.0)),
    local_request=st.booleans(),
)
steps = st.lists(st.tuples(st.floats(0.0, 3.0), inputs), min_size=1, max_size=60)
param_sets = st.builds(
    NmParams,
    timeout_s=st.floats(0.1, 3.0),
    repeat_message_s=st.floats(0.0, 3.0),
    wait_bus_sleep_s=st.floats(0.0, 3.0),
    msg_cycle_s=st.floats(0.05, 1.0),
    wake_validation_s=st.floats(0.05, 2.0),
    idle_timeout_s=st.floats(0.0, 3.0),
    passive=st.booleans(),
    battery_min_v=st.floats(0.0, 13.0),
    msg_cycle_offset_s=st.floats(0.0, 1.0),
    immediate_transmissions=st.integers(0, 4),
    immediate_cycle_s=st.floats(0.01, 0.5),
    remote_sleep_ind_s=st.one_of(st.none(), st.floats(0.05, 3.0)),
    node_detection=st.booleans(),
    active_wakeup_bit=st.booleans(),
    may_wake_bus=st.booleans(),
    pn_enabled=st.booleans(),
    pn_filter_mask=st.lists(st.integers(0, 255), max_size=2).map(tuple),
    all_nm_messages_keep_awake=st.booleans(),
)


def _run(params: NmParams, sequence: list[tuple[float, NmInputs]]) -> list[tuple[NmMode, bool]]:
    """Step through the sequence, also at every timer deadline in between (as the shells do)."""
    return [(d.mode, d.transmit) for d in _decisions(params, sequence)]


def _decisions(params: NmParams, sequence: list[tuple[float, NmInputs]]) -> list[NmDecision]:
    nm = CanNm(params)
    state = nm.initial_state(0.0)
    t = 0.0
    out = []
    for gap, step_inputs in sequence:
        target = t + gap
        fired = 0
        while (deadline := nm.next_deadline(state)) is not None and deadline <= target:
            assert deadline >= t - 1e-9, "a timer fired in the past"
            state, d = nm.step(state, NONE, deadline)
            out.append(d)
            t = deadline
            fired += 1
            assert fired < 10_000, "timers spin"
        state, d = nm.step(state, step_inputs, target)
        t = target
        out.append(d)
        assert d.bus_sleep is (d.mode is BS)
    return out


@settings(max_examples=150, deadline=None)
@given(params=param_sets, sequence=steps)
def test_remote_sleep_is_indicated_only_in_normal_operation_and_pn_filter_only_with_pn(
    params: NmParams, sequence: list[tuple[float, NmInputs]]
) -> None:
    for d in _decisions(params, sequence):
        if d.remote_sleep_indication:
            assert params.remote_sleep_ind_s is not None and d.mode is NO
        if d.pn_filtered:
            assert params.pn_enabled
        if d.transmit:
            assert d.tx_control & CBV_PARTIAL_NETWORK_INFORMATION == (
                CBV_PARTIAL_NETWORK_INFORMATION if params.pn_enabled else 0)
            assert not d.tx_control & CBV_ACTIVE_WAKEUP or params.active_wakeup_bit


@settings(max_examples=150, deadline=None)
@given(params=param_sets, sequence=steps)
def test_never_transmits_when_passive_or_in_sleep_modes(
    params: NmParams, sequence: list[tuple[float, NmInputs]]
) -> None:
    for mode, transmit in _run(params, sequence):
        if transmit:
            assert not params.passive
            assert mode in (RM, NO)  # never BUS_SLEEP, PREPARE_BUS_SLEEP (nor READY_SLEEP)


@settings(max_examples=200, deadline=None)
@given(params=param_sets, sequence=steps)
def test_active_node_never_transmits_without_bus_activity(
    params: NmParams, sequence: list[tuple[float, NmInputs]]
) -> None:
    silent = [(gap, NmInputs(ignition=i.ignition, local_request=i.local_request))
              for gap, i in sequence]
    active = NmParams(**{**{f: getattr(params, f) for f in params.__slots__}, "passive": False,
                         "may_wake_bus": False})
    assert not any(transmit for _, transmit in _run(active, silent))


# -- config ---------------------------------------------------------------------------------------


def test_config_converts_ms_and_forbids_unknown_keys() -> None:
    cfg = NmConfig(enabled=True, timeout_ms=1500, wait_bus_sleep_ms=750)
    p = cfg.params()
    assert (p.timeout_s, p.wait_bus_sleep_s, p.passive) == (1.5, 0.75, True)
    with pytest.raises(ValidationError):
        NmConfig.model_validate({"timeout": 5})
    with pytest.raises(ValidationError):
        NmConfig(source_byte=1, control_byte=1)
    with pytest.raises(ValidationError):
        NmConfig(nm_id_base=0x5AB, nm_id_mask=0x700)


# -- NM frames and log replay (daemon/nm_frames.py) ----------------------------------------------

DEFAULT_LAYOUT = NmFrameLayout()


@pytest.mark.parametrize(
    ("msg", "layout", "expect"),
    [
        (can.Message(arbitration_id=0x512, data=b"\x12\x11\xff"), DEFAULT_LAYOUT, NmPdu(0x12, 0x11)),
        (can.Message(arbitration_id=0x100, data=b"\x12\x11"), DEFAULT_LAYOUT, None),
        (can.Message(arbitration_id=0x512, is_remote_frame=True), DEFAULT_LAYOUT, None),
        (can.Message(arbitration_id=0x512, is_error_frame=True), DEFAULT_LAYOUT, None),
        # Node id in the CAN ID (0x500 + node), CBV in byte 0.
        (can.Message(arbitration_id=0x52A, data=b"\x01"),
         NmFrameLayout(source_byte=None, control_byte=0), NmPdu(0x2A, 0x01)),
        # Swapped positions (some OEMs put the CBV first).
        (can.Message(arbitration_id=0x5FF, data=b"\x10\x07"),
         NmFrameLayout(source_byte=1, control_byte=0), NmPdu(0x07, 0x10)),
        # Extended IDs work with an extended base/mask.
        (can.Message(arbitration_id=0x18FF0042, data=b"\x42\x00", is_extended_id=True),
         NmFrameLayout(id_base=0x18FF0000, id_mask=0x1FFFFF00), NmPdu(0x42, 0)),
    ],
    ids=["default", "not-nm", "remote", "error", "id-node", "swapped", "extended"],
)
def test_decode_nm_frame(msg: can.Message, layout: NmFrameLayout, expect: NmPdu | None) -> None:
    assert decode_nm_frame(msg, layout) == expect


def test_short_nm_frame_is_an_error_and_counted_by_the_collector() -> None:
    short = can.Message(arbitration_id=0x512, data=b"\x12")
    with pytest.raises(NmFrameError):
        decode_nm_frame(short, DEFAULT_LAYOUT)
    collector = NmInputCollector(DEFAULT_LAYOUT)
    collector.add(short)
    collector.add(can.Message(arbitration_id=0x534, data=b"\x34\x01"))
    collector.add(can.Message(arbitration_id=0x100, is_error_frame=True))
    inputs = collector.take(ignition=False)
    assert collector.malformed == 1
    assert inputs.nm_pdus == (NmPdu(0x34, 0x01),) and inputs.can_activity
    assert inputs.nm_pdus[0].repeat_message_request
    empty = collector.take()
    assert empty.nm_pdus == () and not empty.can_activity


def _write_candump(path: str, frames: list[tuple[float, int, bytes]]) -> None:
    writer = can.CanutilsLogWriter(path, channel="can0")
    for t, can_id, data in sorted(frames):
        writer.on_message_received(can.Message(timestamp=t, arbitration_id=can_id, data=data))
    writer.stop()


def _every(start: float, stop: float, period: float) -> list[float]:
    n = round((stop - start) / period)
    return [round(start + k * period, 6) for k in range(n + 1)]


def test_replay_two_ecus_then_silence_goes_to_bus_sleep_on_time(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0  # candump stamps wall-clock seconds; only differences matter
    frames = [(t0 + t, 0x512, b"\x12\x00") for t in _every(0.0, 10.0, 0.5)]  # ECU 0x12
    frames += [(t0 + t, 0x534, b"\x34\x00") for t in _every(0.2, 12.2, 0.5) if t != 5.2]
    frames += [(t0 + 5.2, 0x534, b"\x34\x01")]  # ECU 0x34 asks for repeat message once
    frames += [(t0 + t, 0x1A0, b"\x00" * 8) for t in _every(0.05, 12.05, 0.1)]  # app traffic
    log = str(tmp_path / "drive.log")
    _write_candump(log, frames)

    cfg = NmConfig(enabled=True, timeout_ms=2000, repeat_message_ms=1500, wait_bus_sleep_ms=2000,
                   idle_timeout_ms=2000)
    replay = replay_nm_log(log, cfg)
    got = [(round(e.time - t0, 3), e.mode) for e in replay.events]
    assert got == [
        (0.0, BS),  # log start
        (0.0, RM),  # first NM PDU: validated wake, repeat message
        (1.5, RS),  # repeat-message time over, the gateway does not request the network
        (5.2, RM),  # repeat-message request bit from 0x34
        (6.7, RS),
        (14.2, PBS),  # last NM PDU 12.2 + NM timeout 2.0 (app traffic stopped at 12.05)
        (16.2, BS),  # + wait-bus-sleep 2.0
    ]
    assert replay.events[1].wakeup_validated
    assert replay.nodes == {0x12, 0x34}
    assert replay.nm_pdus == 21 + 25 and replay.malformed == 0
    assert replay.mode_at(t0 + 15.0) is PBS
    assert replay.final is not None and replay.final.mode is BS


def test_replay_app_traffic_without_nm_holds_ready_sleep(tmp_path: Path) -> None:
    frames = [(t, 0x512, b"\x12\x00") for t in _every(0.0, 3.0, 0.5)]
    frames += [(t, 0x1A0, b"\x00") for t in _every(0.0, 20.0, 0.1)]
    log = str(tmp_path / "nonm.log")
    _write_candump(log, frames)
    replay = replay_nm_log(log, NmConfig(enabled=True, idle_timeout_ms=2000))
    assert replay.first(PBS) == pytest.approx(22.0)  # not 5.0: traffic ran until 20.0
    pure = replay_nm_log(log, NmConfig(enabled=True, idle_timeout_ms=0))
    assert pure.first(PBS) == pytest.approx(5.0)  # pure AUTOSAR ignores application frames


def test_replay_unconfirmed_wake_frame_expires(tmp_path: Path) -> None:
    log = str(tmp_path / "glitch.log")
    _write_candump(log, [(0.0, 0x1A0, b"\x00"), (0.3, 0x1A0, b"\x00")])
    replay = replay_nm_log(log, NmConfig(enabled=True, wake_validation_ms=1000))
    assert [(e.reason, e.wakeup_expired) for e in replay.events[1:]] == [
        ("wake_pending", False),
        ("wake_expired", True),
    ]
    assert replay.events[-1].time == pytest.approx(1.0)
    assert replay.first(RM) is None


# -- the CanNm state diagram, with the timers from the parameters and explicit times --------------


@dataclass
class Trace:
    transitions: list[tuple[float, NmMode, str]]
    tx: list[tuple[float, int, bytes]]
    remote_sleep: list[tuple[float, str]]
    pn_filtered: int
    final: NmState


def drive(params: NmParams, script: list[tuple[float, dict[str, object]]], *, until: float,
          start: NmMode = BS) -> Trace:
    """Step CanNm as the shells do: at every timer deadline, and at each scripted time with its
    inputs (`pdus` and `frame` happen once; `request` and `ignition` hold until changed)."""
    nm = CanNm(params)
    state = nm.initial_state(0.0, start)
    trace = Trace([], [], [], 0, state)
    held: dict[str, object] = {"local_request": False, "ignition": None}

    def record(t: float, d: NmDecision) -> None:
        if d.changed:
            trace.transitions.append((round(t, 9), d.mode, d.reason))
        if d.transmit:
            trace.tx.append((round(t, 9), d.tx_control, d.tx_pn_info))
        if d.remote_sleep_indication:
            trace.remote_sleep.append((round(t, 9), "indication"))
        if d.remote_sleep_cancellation:
            trace.remote_sleep.append((round(t, 9), "cancellation"))
        trace.pn_filtered += d.pn_filtered

    def timers(upto: float) -> NmState:
        s = state
        for _ in range(10_000):
            deadline = nm.next_deadline(s)
            if deadline is None or deadline > upto:
                return s
            s, d = nm.step(s, NmInputs(**held), deadline)  # type: ignore[arg-type]
            record(deadline, d)
        raise AssertionError("timers spin")

    for t, change in sorted(script, key=lambda e: e[0]):
        state = timers(t)
        if "request" in change:
            held["local_request"] = change["request"]
        if "ignition" in change:
            held["ignition"] = change["ignition"]
        inputs = NmInputs(nm_pdus=change.get("pdus", ()), can_activity=bool(change.get("frame")),  # type: ignore[arg-type]
                          **held)  # type: ignore[arg-type]
        state, d = nm.step(state, inputs, t)
        record(t, d)
    trace.final = timers(until)
    return trace


PURE = dict(timeout_s=2.0, repeat_message_s=1.5, wait_bus_sleep_s=2.0, idle_timeout_s=0.0, battery_min_v=0.0)


def test_state_diagram_active_node_wakes_the_bus_and_sleeps_on_time() -> None:
    """bus sleep -> repeat message -> normal operation -> ready sleep -> prepare bus sleep -> bus
    sleep for a full AUTOSAR active node (may_wake_bus), then a wake by another node's PDU."""
    params = NmParams(**PURE, passive=False, may_wake_bus=True, msg_cycle_s=0.5, immediate_transmissions=3,
                      immediate_cycle_s=0.1, active_wakeup_bit=True)
    trace = drive(params, [(1.0, {"request": True}), (4.0, {"request": False}), (10.0, {"pdus": (PDU,)})],
                  until=30.0)
    assert trace.transitions == [
        (1.0, RM, "local_request"),  # SWS_CanNm_00129
        (2.5, NO, "repeat_done_requested"),  # + CanNmRepeatMessageTime 1.5 (SWS_CanNm_00102/00103)
        (4.0, RS, "network_released"),  # SWS_CanNm_00118
        (5.7, PBS, "nm_timeout"),  # our last PDU 3.7 + CanNmTimeoutTime 2.0 (SWS_CanNm_00099/00109)
        (7.7, BS, "wait_bus_sleep_expired"),  # + CanNmWaitBusSleepTime 2.0 (SWS_CanNm_00115)
        (10.0, RM, "nm_pdu"),  # another node wakes the bus
        (11.5, RS, "repeat_done_released"),  # SWS_CanNm_00106
        (13.0, PBS, "nm_timeout"),  # our last PDU 11.0 + 2.0
        (15.0, BS, "wait_bus_sleep_expired"),
    ]
    times = [t for t, _, _ in trace.tx]
    # Three immediate PDUs 0.1 apart (SWS_CanNm_00334), then every CanNmMsgCycleTime; none in
    # ready sleep (SWS_CanNm_00108). The passive start at 10.0 sends no immediate PDUs.
    assert times == pytest.approx([1.0, 1.1, 1.2, 1.7, 2.2, 2.7, 3.2, 3.7, 10.0, 10.5, 11.0])
    # Active-wakeup bit while our request woke the network (SWS_CanNm_00401), cleared with it (00402).
    assert [c for _, c, _ in trace.tx] == [CBV_ACTIVE_WAKEUP] * 8 + [0] * 3
    assert trace.final.mode is BS


def test_state_diagram_network_request_in_ready_sleep() -> None:
    """A guarded active node (the default: it transmits only on an awake bus) with a message
    cycle offset: its own PDUs restart the NM timeout, a request in ready sleep restarts them."""
    params = NmParams(**PURE, passive=False, msg_cycle_s=0.5, msg_cycle_offset_s=0.05)
    trace = drive(params, [(0.0, {"pdus": (PDU,)}), (1.8, {"pdus": (PDU,)}), (2.5, {"request": True}),
                           (2.8, {"request": False})], until=30.0)
    assert trace.transitions == [
        (0.0, RM, "nm_pdu"),
        (1.5, RS, "repeat_done_released"),
        (2.5, NO, "network_request"),  # SWS_CanNm_00110
        (2.8, RS, "network_released"),
        (4.5, PBS, "nm_timeout"),  # our PDU at 2.5 + 2.0, later than the ECU's 1.8 + 2.0
        (6.5, BS, "wait_bus_sleep_expired"),
    ]
    # First PDU one offset after entering repeat message (SWS_CanNm_00005), at once on entering
    # normal operation from ready sleep (SWS_CanNm_00116/00006); none in ready sleep.
    assert [t for t, _, _ in trace.tx] == pytest.approx([0.05, 0.55, 1.05, 2.5])


@pytest.mark.parametrize("node_detection", [True, False])
def test_state_diagram_repeat_message_bit(node_detection: bool) -> None:
    params = NmParams(**PURE, node_detection=node_detection)
    script: list[tuple[float, dict[str, object]]] = [(k * 0.5, {"pdus": (PDU_RMR if k == 6 else PDU,)})
                                                     for k in range(13)]
    script[0][1]["ignition"] = True
    script += [(6.2, {"ignition": False})]
    trace = drive(params, script, until=30.0)
    expect = [(0.0, RM, "nm_pdu"), (1.5, NO, "repeat_done_requested")]
    if node_detection:  # SWS_CanNm_00119, the repeat timer starts again (SWS_CanNm_00102)
        expect += [(3.0, RM, "repeat_message_request"), (4.5, NO, "repeat_done_requested")]
    expect += [(6.2, RS, "network_released"), (8.0, PBS, "nm_timeout"), (10.0, BS, "wait_bus_sleep_expired")]
    assert trace.transitions == expect


def test_remote_sleep_indication_and_cancellation() -> None:
    params = NmParams(**PURE, remote_sleep_ind_s=0.8)
    trace = drive(params, [
        (0.0, {"pdus": (PDU,), "ignition": True}), (0.5, {"pdus": (PDU,)}), (1.0, {"pdus": (PDU,)}),
        (2.0, {"pdus": (PDU,)}), (3.5, {"pdus": (PDU,)}), (5.0, {"pdus": (PDU_RMR,)}),
        (8.0, {"ignition": False}), (8.5, {"pdus": (PDU,)}),
    ], until=30.0)
    assert trace.remote_sleep == [
        (2.8, "indication"),  # last PDU 2.0 + CanNmRemoteSleepIndTime 0.8 (SWS_CanNm_00150)
        (3.5, "cancellation"),  # an NM PDU in normal operation (SWS_CanNm_00151)
        (4.3, "indication"),
        (5.0, "cancellation"),  # repeat message entered (SWS_CanNm_00152)
        (7.3, "indication"),  # normal operation entered at 6.5 starts the timer
        (8.5, "cancellation"),  # an NM PDU in ready sleep (SWS_CanNm_00151)
    ]
    assert trace.transitions == [
        (0.0, RM, "nm_pdu"), (1.5, NO, "repeat_done_requested"), (5.0, RM, "repeat_message_request"),
        (6.5, NO, "repeat_done_requested"), (8.0, RS, "network_released"), (10.5, PBS, "nm_timeout"),
        (12.5, BS, "wait_bus_sleep_expired"),
    ]


def test_remote_sleep_off_by_default() -> None:
    trace = drive(NmParams(**PURE), [(0.0, {"pdus": (PDU,), "ignition": True})], until=5.0)
    assert trace.remote_sleep == [] and trace.final.mode is NO


def pn_pdu(*info: int, pni: bool = True) -> NmPdu:
    return NmPdu(0x22, CBV_PARTIAL_NETWORK_INFORMATION if pni else 0, bytes(info) if pni else b"")


PN = dict(**PURE, pn_enabled=True, pn_filter_mask=(0x01, 0x00))


class TestPartialNetworking:
    def test_pdu_for_other_pns_does_not_wake_the_bus(self) -> None:
        trace = drive(NmParams(**PN), [(1.0, {"pdus": (pn_pdu(0x02, 0xFF),)})], until=5.0)
        assert trace.transitions == [] and trace.pn_filtered == 1
        assert trace.final.mode is BS and trace.final.wake_pending_since is None  # not even a candidate

    def test_pdu_for_our_pn_wakes_the_bus(self) -> None:
        trace = drive(NmParams(**PN), [(1.0, {"pdus": (pn_pdu(0x03, 0x00),)})], until=10.0)
        assert trace.transitions == [(1.0, RM, "nm_pdu"), (2.5, RS, "repeat_done_released"),
                                     (3.0, PBS, "nm_timeout"), (5.0, BS, "wait_bus_sleep_expired")]

    def test_filtered_pdus_do_not_restart_the_nm_timeout(self) -> None:
        script: list[tuple[float, dict[str, object]]] = [(t / 10, {"pdus": (pn_pdu(0x80, 0x01),)})
                                                         for t in range(2, 40, 2)]
        trace = drive(NmParams(**{**PN, "idle_timeout_s": 1.0}), script, until=10.0, start=RS)
        # Neither the NM timeout (SWS_CanNm_00098) nor the idle guard sees the filtered PDUs.
        assert trace.transitions == [(2.0, PBS, "nm_timeout"), (4.0, BS, "wait_bus_sleep_expired")]
        assert trace.pn_filtered == len(script)

    @pytest.mark.parametrize(
        ("pdu", "keep_awake", "relevant"),
        [
            (pn_pdu(0x01, 0x00), False, True),  # SWS_CanNm_00419: a bit of our mask
            (pn_pdu(0x00, 0x01), False, False),  # SWS_CanNm_00420: none of our bits
            (pn_pdu(0x00, 0x01), True, True),  # SWS_CanNm_00421
            (pn_pdu(pni=False), False, False),  # SWS_CanNm_00411: no PNI bit
            (pn_pdu(pni=False), True, True),  # SWS_CanNm_00410
        ],
    )
    def test_filter_rules(self, pdu: NmPdu, keep_awake: bool, relevant: bool) -> None:
        assert CanNm(NmParams(**{**PN, "all_nm_messages_keep_awake": keep_awake})).pn_relevant(pdu) is relevant

    def test_without_pn_every_pdu_counts(self) -> None:
        assert CanNm(NmParams(**PURE)).pn_relevant(pn_pdu(0x00, 0x00))  # SWS_CanNm_00409

    def test_our_pdus_carry_the_pni_bit_and_our_pns_while_requested(self) -> None:
        params = NmParams(**{**PN, "passive": False, "may_wake_bus": True, "msg_cycle_s": 0.5})
        trace = drive(params, [(0.0, {"request": True}), (2.0, {"request": False})], until=10.0)
        assert trace.tx[0] == (0.0, CBV_PARTIAL_NETWORK_INFORMATION, b"\x01\x00")  # SWS_CanNm_00413
        assert all(c == CBV_PARTIAL_NETWORK_INFORMATION for _, c, _ in trace.tx)


def test_immediate_transmissions_only_on_our_request() -> None:
    params = NmParams(**PURE, passive=False, may_wake_bus=True, msg_cycle_s=0.5, immediate_transmissions=2,
                      immediate_cycle_s=0.05)
    woken = drive(params, [(0.0, {"pdus": (PDU,)})], until=1.2)  # passive start-up: regular cycle
    assert [t for t, _, _ in woken.tx] == pytest.approx([0.0, 0.5, 1.0])
    # Network request in prepare bus sleep (SWS_CanNm_00123) starts the immediate PDUs too.
    trace = drive(params, [(1.0, {"request": True})], until=1.6, start=PBS)
    assert trace.transitions == [(1.0, RM, "network_request")]
    assert [t for t, _, _ in trace.tx] == pytest.approx([1.0, 1.05, 1.55])


PN_LAYOUT = NmFrameLayout(pn_info_offset=2, pn_info_length=2)


def test_decode_pn_info_when_the_pni_bit_is_set() -> None:
    msg = can.Message(arbitration_id=0x522, data=bytes([0x22, 0x40, 0x01, 0x80, 0xFF]))
    assert decode_nm_frame(msg, PN_LAYOUT) == NmPdu(0x22, 0x40, b"\x01\x80")
    no_pni = can.Message(arbitration_id=0x522, data=bytes([0x22, 0x00]))
    assert decode_nm_frame(no_pni, PN_LAYOUT) == NmPdu(0x22, 0x00)  # PN info not needed then
    short = can.Message(arbitration_id=0x522, data=bytes([0x22, 0x40, 0x01]))
    with pytest.raises(NmFrameError, match="PN info"):
        decode_nm_frame(short, PN_LAYOUT)
    collector = NmInputCollector(PN_LAYOUT)
    collector.add(short)
    collector.add(msg)
    inputs = collector.take()
    assert collector.malformed == 1 and inputs.nm_pdus == (NmPdu(0x22, 0x40, b"\x01\x80"),)
    assert inputs.can_activity  # the malformed frame is activity; the NM PDU waits for the PN filter


def test_encode_our_pdu_with_cbv_and_pn_info() -> None:
    msg = encode_nm_frame(0x30, PN_LAYOUT, CBV_PARTIAL_NETWORK_INFORMATION | CBV_ACTIVE_WAKEUP, b"\x01\x00")
    assert msg.arbitration_id == 0x530
    assert bytes(msg.data) == bytes([0x30, 0x50, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF])
    assert decode_nm_frame(msg, PN_LAYOUT) == NmPdu(0x30, 0x50, b"\x01\x00")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"immediate_nm_transmissions": 3}, "needs passive = false"),
        ({"may_wake_bus": True}, "needs passive = false"),
        ({"active_wakeup_bit": True}, "needs passive = false"),
        ({"pn_enabled": True}, "needs pn_filter_mask"),
        ({"pn_filter_mask": [1]}, "pn_enabled = false"),
        ({"pn_enabled": True, "pn_filter_mask": [1, 2], "pn_info_offset": 0}, "overlap"),
        ({"pn_enabled": True, "pn_filter_mask": [1], "control_byte": None}, "needs control_byte"),
        ({"pn_filter_mask": [256]}, "less than or equal to 255"),
        ({"remote_sleep_ind_ms": 0}, "greater than 0"),
    ],
)
def test_config_rejects_inconsistent_autosar_keys(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NmConfig.model_validate({"enabled": True, **keys})


def test_config_autosar_keys_reach_the_state_machine_and_layout() -> None:
    cfg = NmConfig.model_validate({
        "enabled": True, "passive": False, "immediate_nm_transmissions": 4, "immediate_nm_cycle_ms": 30,
        "msg_cycle_offset_ms": 70, "remote_sleep_ind_ms": 1200, "node_detection": False,
        "active_wakeup_bit": True, "may_wake_bus": True, "pn_enabled": True, "pn_info_offset": 3,
        "pn_filter_mask": [0x81, 0x00, 0x04], "all_nm_messages_keep_awake": True,
    })
    p = cfg.params()
    assert (p.immediate_transmissions, p.immediate_cycle_s, p.msg_cycle_offset_s, p.remote_sleep_ind_s) == (
        4, 0.03, 0.07, 1.2)
    assert (p.node_detection, p.active_wakeup_bit, p.may_wake_bus, p.pn_enabled) == (False, True, True, True)
    assert p.pn_filter_mask == (0x81, 0x00, 0x04) and p.all_nm_messages_keep_awake
    layout = cfg.layout()
    assert (layout.pn_info_offset, layout.pn_info_length) == (3, 3)


def test_replay_ignores_pdus_of_other_partial_networks(tmp_path: Path) -> None:
    frames = [(t, 0x522, bytes([0x22, 0x40, 0x02, 0x00])) for t in _every(0.0, 5.0, 0.5)]  # PN 1 only
    frames += [(t, 0x533, bytes([0x33, 0x40, 0x01, 0x00])) for t in _every(10.0, 12.0, 0.5)]  # our PN 0
    log = str(tmp_path / "pn.log")
    _write_candump(log, frames)
    cfg = NmConfig(enabled=True, idle_timeout_ms=0, pn_enabled=True, pn_filter_mask=(0x01, 0x00))
    replay = replay_nm_log(log, cfg)
    assert replay.pn_filtered == 11 and replay.nm_pdus == 11 + 5
    assert [(round(e.time, 6), e.mode) for e in replay.events] == [
        (0.0, BS), (10.0, RM), (11.5, RS), (14.0, PBS), (16.0, BS)]


def test_repeat_message_request_in_normal_operation_sends_no_second_pdu_at_once() -> None:
    """Found side by side with autoas/as: the bit arriving at the instant a PDU went out must not
    send another one; the cycle runs on (the C code restarts it after the offset: same count)."""
    params = NmParams(**PURE, passive=False, may_wake_bus=True, msg_cycle_s=0.5)
    trace = drive(params, [(0.0, {"request": True}), (3.0, {"pdus": (PDU_RMR,)}), (4.2, {"request": False})],
                  until=4.3)
    assert (3.0, RM, "repeat_message_request") in trace.transitions
    assert [t for t, _, _ in trace.tx] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])


@pytest.mark.parametrize(
    "change",
    ["remote_sleep_ind_ms = 900", "immediate_nm_cycle_ms = 30", "pn_enabled = true\npn_filter_mask = [1]",
     "node_detection = false", "msg_cycle_offset_ms = 10"],
)
def test_new_nm_keys_need_a_restart(change: str) -> None:
    from cerebellumd.config import builtin_example, parse_config
    from cerebellumd.config.reload import plan_reload

    base = builtin_example() + "\n[nm]\nenabled = true\n"
    plan = plan_reload(parse_config(base), parse_config(base + change + "\n"))
    assert plan.refused and plan.restart == ("nm",)
