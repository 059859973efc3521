"""CAN NM in the daemon (daemon/nm_service.py) against real python-can virtual buses: two
simulated ECUs send NM PDUs and application frames; when they release the network and go quiet
the daemon must reach bus sleep at the right time, put the accelerator to its deepest state and
stop its tickers; a wake frame (NM PDU or KL15) must bring it back, validated, with fresh samples
and a fresh policy state."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable

import can

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.nm_service import NmService
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.policies.nm import NmMode
from cerebellumd.profiles import load_profile
from tests.test_faults import DB, REAL_BUS, defaults, until
from tests.test_persist import sample

_channels = itertools.count()
DEMO_TEXT = builtin_example()  # read at import: a file read inside the loop is refused
# Short NM timers so a test runs in about a second; the ratios are a real vehicle's.
NM_TIMEOUT_S = 0.3
IDLE_S = 0.3
WAIT_BUS_SLEEP_S = 0.3
NM_TOML = f"""
[nm]
enabled = true
timeout_ms = {int(NM_TIMEOUT_S * 1000)}
repeat_message_ms = 200
wait_bus_sleep_ms = {int(WAIT_BUS_SLEEP_S * 1000)}
wake_validation_ms = 300
idle_timeout_ms = {int(IDLE_S * 1000)}
"""
ECUS = (0x10, 0x20)


def nm_pdu(node: int, control: int = 0, pn_info: int = 0) -> can.Message:
    return can.Message(arbitration_id=0x500 + node, data=bytes([node, control, pn_info, 0, 0, 0, 0, 0]),
                       is_extended_id=False)


class Vehicle:
    """Two ECUs: NM PDUs every 50 ms each and the DBC's application frames every 20 ms."""

    def __init__(self, channel: str) -> None:
        self.bus = REAL_BUS(interface="virtual", channel=channel)
        self.nm_on = True
        self.nm_control = 0  # control bit vector and PN info byte (byte 2) of the ECUs' NM PDUs
        self.nm_pn_info = 0
        self.app_on = True
        self.values = defaults()
        self._task: asyncio.Task[None] | None = None

    def send_app(self, message: str, **override: float) -> None:
        msg = DB.get_message_by_name(message)
        data = msg.encode({**self.values[message], **override})
        self.bus.send(can.Message(arbitration_id=msg.frame_id, data=data, is_extended_id=False))

    async def _run(self) -> None:
        for k in itertools.count():
            if self.nm_on and k % 5 == 0:
                for node in ECUS:
                    self.bus.send(nm_pdu(node, self.nm_control, self.nm_pn_info))
            if self.app_on and k % 2 == 0:
                for name in self.values:
                    self.send_app(name)
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.bus.shutdown()


@contextlib.asynccontextmanager
async def rig(extra: str = "", nm: str = NM_TOML) -> AsyncIterator[tuple[Daemon, NmService, Vehicle, str]]:
    ch = f"test-nm-{next(_channels)}"
    text = DEMO_TEXT.replace('channel = "cerebellumd-demo"', f'channel = "{ch}"')
    if "passive = false" in nm:  # an active node transmits: its bus must not be listen-only
        text = text.replace(f'channel = "{ch}"', f'channel = "{ch}"\nlisten_only = false')
    text = re.sub(r"(?m)^(min_dwell_ms|release_ms) = \d+", r"\1 = 0", text)
    config = await asyncio.to_thread(parse_config, text + nm + extra)
    config = config.model_copy(update={"prometheus": config.prometheus.model_copy(update={"enabled": False})})
    model = await asyncio.to_thread(load_profile, "orin_nano")
    driver = SimulatedAccelerator(model, initial=AccelState.SLEEP, time_scale=50.0)
    daemon = await Daemon.async_create(config, clock=Clock(), driver=driver, model=model)
    vehicle = Vehicle(ch)
    vehicle.start()
    await daemon.async_start()
    service = next(s for s in daemon.parts if isinstance(s, NmService))
    try:
        yield daemon, service, vehicle, ch
    finally:
        await vehicle.close()
        await daemon.async_stop()


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    return sample(daemon.metrics.registry, name, labels) or 0.0


async def stays(predicate: Callable[[], bool], duration: float, what: str) -> None:
    """A negative check: `predicate` must hold at every poll for `duration` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    while loop.time() < end:
        assert predicate(), what
        await asyncio.sleep(0.005)


async def mode_change_time(service: NmService, mode: NmMode, timeout: float = 5.0) -> float:
    loop = asyncio.get_running_loop()
    await until(lambda: service.mode is mode, timeout, f"NM {mode.value}")
    return loop.time()


async def to_bus_sleep(daemon: Daemon, service: NmService, vehicle: Vehicle) -> None:
    """ECUs release the network (NM PDUs stop), then, one NM timeout later, go quiet."""
    loop = asyncio.get_running_loop()
    await until(lambda: service.mode is NmMode.READY_SLEEP, 5, "ready sleep while ECUs talk")
    vehicle.nm_on = False
    released = loop.time()
    await until(lambda: loop.time() - released >= NM_TIMEOUT_S, 5, "NM timeout passes")
    vehicle.app_on = False
    quiet = loop.time()
    prepare = await mode_change_time(service, NmMode.PREPARE_BUS_SLEEP)
    asleep = await mode_change_time(service, NmMode.BUS_SLEEP)
    # Prepare-bus-sleep only after the idle guard's silence, bus sleep one wait-bus-sleep later
    # (each step is a 10 ms decision tick: allow some scheduling slack on a loaded runner).
    assert IDLE_S - 0.02 <= prepare - quiet <= IDLE_S + 0.4, prepare - quiet
    assert WAIT_BUS_SLEEP_S - 0.02 <= asleep - prepare <= WAIT_BUS_SLEEP_S + 0.4, asleep - prepare


async def test_two_ecus_then_silence_bus_sleep_then_wake_frame() -> None:
    async with rig() as (daemon, service, vehicle, _):
        await until(lambda: service.mode in (NmMode.REPEAT_MESSAGE, NmMode.READY_SLEEP), 5, "network up")
        assert metric(daemon, "cerebellumd_wake_validations_total", result="validated") >= 1
        assert not daemon.paused
        await to_bus_sleep(daemon, service, vehicle)

        deepest = daemon.params.deepest_state
        await until(lambda: daemon.actuator.state is deepest, 5, "accelerator in its deepest state")
        assert metric(daemon, "cerebellumd_nm_state", state="bus_sleep") == 1
        # prepare-bus-sleep's ticks went to the clamp (then "paused"), as the evaluator names them
        assert daemon.actuator.clamped_by == "path:quiet_bus"
        assert metric(daemon, "cerebellumd_accelerator_energy_joules_total", reason="path:quiet_bus") > 0
        assert metric(daemon, "cerebellumd_nm_state", state="ready_sleep") == 0
        assert metric(daemon, "cerebellumd_nm_transitions_total", state="bus_sleep") == 1
        # The collision signal (on_stale = wake) went stale because the bus went to sleep:
        # no fail-safe wake for that.
        assert metric(daemon, "cerebellumd_wakes_total", reason="stale:collision_risk") == 0
        assert daemon.paused
        decisions = daemon.decisions
        await stays(lambda: daemon.decisions == decisions, 0.3, "decisions stop in bus sleep")

        # A plain frame is a wake candidate only: it expires without an NM PDU or KL15.
        expired = metric(daemon, "cerebellumd_wake_validations_total", result="expired")
        vehicle.send_app("VehicleDynamics")
        await until(lambda: metric(daemon, "cerebellumd_wake_validations_total", result="expired") > expired,
                    5, "unvalidated wake expires")
        assert service.mode is NmMode.BUS_SLEEP and daemon.paused and daemon.decisions == decisions

        # An NM PDU wakes the network: validated, resumed, samples from before cleared.
        validated = metric(daemon, "cerebellumd_wake_validations_total", result="validated")
        loop = asyncio.get_running_loop()
        woke_at = daemon.clock.now()
        vehicle.bus.send(nm_pdu(ECUS[0], control=0x10))
        await until(lambda: service.mode is NmMode.REPEAT_MESSAGE, 5, "wake frame -> repeat message")
        assert service.state is not None and service.state.reason == "nm_pdu"
        assert metric(daemon, "cerebellumd_wake_validations_total", result="validated") == validated + 1
        assert not daemon.paused
        assert "speed_kmh" not in daemon.samples  # the last speed before the sleep is gone
        state = daemon._state
        assert state is not None and state.started_at >= woke_at  # policy restarted
        started = loop.time()
        await until(lambda: daemon.decisions > decisions + 20, 5, "decisions resume")
        assert loop.time() - started < 2


async def test_kl15_wakes_a_sleeping_bus() -> None:
    extra = '\n[signals.kl15]\ncan = "BodyStatus.Ignition"\nmax_age_ms = 1000\n'
    async with rig(extra=extra, nm=NM_TOML + 'ignition_signal = "kl15"\n') as (daemon, service, vehicle, _):
        # Ignition off while the ECUs run down, else KL15 holds the network (normal operation).
        vehicle.values["BodyStatus"]["Ignition"] = 0
        await to_bus_sleep(daemon, service, vehicle)
        assert daemon.paused
        vehicle.send_app("BodyStatus", Ignition=1)
        await until(lambda: service.mode is NmMode.REPEAT_MESSAGE, 5, "KL15 -> repeat message")
        assert service.state is not None and service.state.reason == "ignition"
        assert not daemon.paused


async def test_active_node_transmits_only_while_the_bus_is_awake() -> None:
    nm = NM_TOML + "passive = false\nnode_id = 0x30\nmsg_cycle_ms = 50\n"
    async with rig(nm=nm) as (daemon, service, vehicle, ch):
        listener = REAL_BUS(interface="virtual", channel=ch)
        try:
            def ours() -> int:
                n = 0
                while (msg := listener.recv(0)) is not None:
                    if msg.arbitration_id == 0x530:
                        assert msg.data[0] == 0x30
                        n += 1
                return n

            seen = 0
            # A repeat-message request: every node (we included) announces itself again.
            vehicle.bus.send(nm_pdu(ECUS[0], control=0x01))

            def heard() -> bool:
                nonlocal seen
                seen += ours()
                return seen >= 2

            await until(heard, 5, "the gateway's NM PDUs while the network is up")
            await to_bus_sleep(daemon, service, vehicle)
            ours()  # drop what was sent before bus sleep
            sent = service.sent
            await stays(lambda: ours() == 0 and service.sent == sent, 0.3, "nothing sent in bus sleep")
        finally:
            listener.shutdown()


async def test_without_nm_nothing_attaches() -> None:
    config = await asyncio.to_thread(parse_config, DEMO_TEXT)
    daemon = await Daemon.async_create(config)
    assert not any(isinstance(s, NmService) for s in daemon.parts)
    assert daemon.assembly.nm is None


KL15 = '\n[signals.kl15]\ncan = "BodyStatus.Ignition"\nmax_age_ms = 1000\n'


async def test_active_node_wakes_the_bus_with_immediate_transmissions() -> None:
    """`may_wake_bus`: KL15 (a network request) in bus sleep -> repeat message, and the gateway
    sends CanNmImmediateNmTransmissions PDUs CanNmImmediateNmCycleTime apart with the
    active-wakeup bit, then one per CanNmMsgCycleTime (SWS_CanNm_00334/00401)."""
    nm = NM_TOML + ('ignition_signal = "kl15"\npassive = false\nnode_id = 0x30\nmay_wake_bus = true\n'
                    "immediate_nm_transmissions = 3\nimmediate_nm_cycle_ms = 60\nmsg_cycle_ms = 300\n"
                    "active_wakeup_bit = true\n")
    async with rig(extra=KL15, nm=nm) as (daemon, service, vehicle, ch):
        vehicle.values["BodyStatus"]["Ignition"] = 0
        await to_bus_sleep(daemon, service, vehicle)
        listener = REAL_BUS(interface="virtual", channel=ch)
        try:
            ours: list[can.Message] = []

            def collect() -> int:
                while (msg := listener.recv(0)) is not None:
                    if msg.arbitration_id == 0x530:
                        ours.append(msg)
                return len(ours)

            await stays(lambda: collect() == 0, 0.2, "nothing sent in bus sleep")
            assert daemon.paused
            # KL15 on again (BodyStatus every 20 ms): the first frame is a network request.
            sent_at = time.time()
            vehicle.values["BodyStatus"]["Ignition"] = 1
            vehicle.app_on = True
            await until(lambda: collect() >= 5, 5, "five NM PDUs after the wake")
            assert service.transitions >= 5 and service.mode is NmMode.NORMAL_OPERATION
            stamps = [m.timestamp for m in ours]
            gaps = [round(b - a, 3) for a, b in itertools.pairwise(stamps)]
            assert stamps[0] - sent_at < 0.15, stamps[0] - sent_at  # the first one at once
            # Two gaps of the immediate cycle (60 ms), then the message cycle (300 ms); slack for
            # the thread that sends and a loaded runner.
            assert all(0.03 <= g <= 0.13 for g in gaps[:2]), gaps
            assert all(0.25 <= g <= 0.40 for g in gaps[2:4]), gaps
            assert all(m.data[0] == 0x30 and m.data[1] & 0x10 for m in ours), [bytes(m.data) for m in ours]
        finally:
            listener.shutdown()


async def test_pn_filter_pdus_of_other_partial_networks_do_not_wake() -> None:
    nm = NM_TOML + "pn_enabled = true\npn_info_offset = 2\npn_filter_mask = [0x01]\n"
    async with rig(nm=nm) as (daemon, service, vehicle, _):
        vehicle.nm_control, vehicle.nm_pn_info = 0x40, 0x01  # the ECUs request our PN
        await to_bus_sleep(daemon, service, vehicle)
        assert metric(daemon, "cerebellumd_nm_pn_filtered_total") == 0
        vehicle.bus.send(nm_pdu(ECUS[0], control=0x40, pn_info=0x06))  # other PNs only
        await until(lambda: metric(daemon, "cerebellumd_nm_pn_filtered_total") == 1, 5, "PDU filtered")
        vehicle.bus.send(nm_pdu(ECUS[0], control=0x00))  # no PNI bit: ignored (SWS_CanNm_00411)
        await until(lambda: metric(daemon, "cerebellumd_nm_pn_filtered_total") == 2, 5, "PDU filtered")
        await stays(lambda: service.mode is NmMode.BUS_SLEEP and daemon.paused, 0.3, "still asleep")
        assert service.state is not None and service.state.wake_pending_since is None  # not even a candidate
        vehicle.bus.send(nm_pdu(ECUS[1], control=0x40, pn_info=0x03))  # our PN among others
        await until(lambda: service.mode is NmMode.REPEAT_MESSAGE, 5, "our PN wakes the network")
        assert not daemon.paused


async def test_remote_sleep_indication_in_normal_operation() -> None:
    nm = NM_TOML + 'ignition_signal = "kl15"\nremote_sleep_ind_ms = 150\n'
    async with rig(extra=KL15, nm=nm) as (daemon, service, vehicle, _):
        await until(lambda: service.mode is NmMode.NORMAL_OPERATION, 5, "KL15 holds the network")
        assert metric(daemon, "cerebellumd_nm_remote_sleep") == 0
        loop = asyncio.get_running_loop()
        vehicle.nm_on = False  # the ECUs stop their NM PDUs (ready to sleep); KL15 frames go on
        stopped = loop.time()
        await until(lambda: metric(daemon, "cerebellumd_nm_remote_sleep") == 1, 5, "remote sleep indication")
        elapsed = loop.time() - stopped
        # The last NM PDU was at most one ECU cycle (50 ms) before `stopped`.
        assert 0.15 - 0.06 <= elapsed <= 0.15 + 0.3, elapsed
        assert service.state_extra()["nm"]["remote_sleep"] is True
        assert service.mode is NmMode.NORMAL_OPERATION
        vehicle.nm_on = True
        await until(lambda: metric(daemon, "cerebellumd_nm_remote_sleep") == 0, 5, "remote sleep cancelled")
        assert service.state_extra()["nm"]["remote_sleep"] is False
