"""The parked car (docs/parked.md): the pure ignition fusion and 12 V budget, then the daemon part
against real python-can virtual buses: key-off and key-on, the budget in the state file, the power
-down decision and its hook, listen-only buses, and the replay of an ignition-off candump log that
must leave zero frames sent and zero keep-awake events."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import can
import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import ConfigError, parse_config
from cerebellumd.daemon.ingest import LISTEN_ONLY_OPTIONS
from cerebellumd.daemon.vehicle_power import KEEP_AWAKE_REASONS, VehiclePower
from cerebellumd.drivers.mcu_emulator import McuEmulator
from cerebellumd.drivers.mcu_protocol import Reason
from cerebellumd.policies.cerebellum import CerebellumFirst
from cerebellumd.policies.types import Hold, HoldMode, Inputs, PolicyParams, Sample
from cerebellumd.policies.vehicle_power import (
    BatteryBudget,
    BudgetInputs,
    BudgetParams,
    FusionInputs,
    FusionParams,
    FusionState,
    PowerFusion,
    PowerState,
)
from cerebellumd.profiles import load_profile
from tests.test_faults import DEMO_TEXT, REAL_BUS, Rig, make_rig

from .helpers import until

LOG = Path(__file__).parent / "data" / "ignition_off.log"


def run(fusion: PowerFusion, st: FusionState, inputs: FusionInputs, t0: float, t1: float,
        dt: float = 0.01) -> tuple[FusionState, list[tuple[float, PowerState]]]:
    """Step from t0 to t1 with the same inputs (samples re-stamped to each step's time unless None)."""
    changes = []
    n = round((t1 - t0) / dt)
    for i in range(n + 1):
        t = t0 + i * dt
        fresh = FusionInputs(
            line=None if inputs.line is None else Sample(inputs.line.value, t),
            can_ignition=None if inputs.can_ignition is None else Sample(inputs.can_ignition.value, t),
            power_mode=None if inputs.power_mode is None else Sample(inputs.power_mode.value, t),
            nm_awake_since=inputs.nm_awake_since, nm_known=inputs.nm_known)
        st, step = fusion.step(st, fresh, t)
        if step.changed:
            changes.append((t, step.state))
    return st, changes


# -- the fusion, pure ----------------------------------------------------------------------------


def test_line_thresholds_have_hysteresis_and_separate_debounces() -> None:
    f = PowerFusion(FusionParams(line_on_threshold=9.0, line_off_threshold=6.0, on_debounce_s=0.05,
                                 off_debounce_s=1.0))
    st, ch = run(f, f.initial_state(), FusionInputs(line=Sample(12.0, 0)), 0, 0.2)
    assert ch == [(pytest.approx(0.05), PowerState.ON)]  # held for on_debounce
    st, ch = run(f, st, FusionInputs(line=Sample(7.5, 0)), 0.21, 3.0)  # between the thresholds
    assert ch == [] and st.state is PowerState.ON
    st, ch = run(f, st, FusionInputs(line=Sample(5.0, 0)), 3.01, 3.5)  # off, but shorter than 1 s
    assert ch == []
    st, step = f.step(st, FusionInputs(line=Sample(12.0, 3.51)), 3.51)
    assert step.debounced and step.edges == {"line": 1}
    st, ch = run(f, st, FusionInputs(line=Sample(5.0, 0)), 3.6, 5.0)
    assert len(ch) == 1 and ch[0][1] is PowerState.OFF and ch[0][0] == pytest.approx(4.6)


def test_can_latch_ignores_the_lagging_line_and_a_new_line_edge_is_key_on() -> None:
    f = PowerFusion(FusionParams(off_debounce_s=0.5, on_debounce_s=0.05, can_timeout_s=2.0))
    st, _ = run(f, f.initial_state(), FusionInputs(line=Sample(1, 0), can_ignition=Sample(1, 0)), 0, 1)
    assert st.state is PowerState.ON and st.can_latched
    # Key-off: CAN says 0, the line stays high ~30 s (openpilot ignition_state.py).
    st, ch = run(f, st, FusionInputs(line=Sample(1, 0), can_ignition=Sample(0, 0)), 1.01, 2)
    assert [s for _, s in ch] == [PowerState.OFF]
    # The bus sleeps: CAN silent, the line still high: still off, and the timeout is counted once.
    stale = 0
    for i in range(300):
        t = 2.01 + i * 0.01
        st, step = f.step(st, FusionInputs(line=Sample(1, t), can_ignition=Sample(0, 2.0)), t)
        stale += step.went_stale
        assert st.state is PowerState.OFF
    assert stale == 1
    # The line drops (its lag is over), then rises again: a key-on before CAN speaks.
    st, _ = run(f, st, FusionInputs(line=Sample(0, 0)), 5.02, 5.5)  # (CAN still silent)
    st, ch = run(f, st, FusionInputs(line=Sample(1, 0)), 5.51, 5.7)
    assert ch == [(pytest.approx(5.56), PowerState.ON)]


def test_can_on_times_out_to_off_and_power_modes_map_with_bad_values_counted() -> None:
    f = PowerFusion(FusionParams(power_modes={0: PowerState.OFF, 1: PowerState.ACCESSORY, 2: PowerState.ON,
                                              3: PowerState.CRANKING}, on_debounce_s=0, off_debounce_s=0))
    st, ch = run(f, f.initial_state(), FusionInputs(power_mode=Sample(3, 0)), 0, 0.1)
    assert ch[-1][1] is PowerState.CRANKING
    st, ch = run(f, st, FusionInputs(power_mode=Sample(1, 0)), 0.11, 0.2)
    assert ch[-1][1] is PowerState.ACCESSORY
    st, step = f.step(st, FusionInputs(power_mode=Sample(7, 0.21)), 0.21)
    assert step.bad_power_mode == 7 and st.state is PowerState.ACCESSORY
    st, ch = run(f, st, FusionInputs(power_mode=Sample(2, 0)), 0.22, 0.3)
    assert st.state is PowerState.ON
    # Silent longer than the 2 s timeout: no longer on.
    changes = []
    for i in range(300):
        t = 0.31 + i * 0.01
        st, step = f.step(st, FusionInputs(power_mode=Sample(2, 0.3)), t)
        if step.changed:
            changes.append((t, step.state))
    assert changes == [(pytest.approx(2.31), PowerState.OFF)]


def test_nm_alone_gives_accessory_or_off() -> None:
    f = PowerFusion(FusionParams(on_debounce_s=0, off_debounce_s=0))
    st, step = f.step(f.initial_state(), FusionInputs(nm_known=True, nm_awake_since=1.0), 1.0)
    assert step.state is PowerState.ACCESSORY
    st, step = f.step(st, FusionInputs(nm_known=True), 2.0)
    assert step.state is PowerState.OFF
    st, step = f.step(f.initial_state(), FusionInputs(), 3.0)  # nothing known: stays undefined
    assert step.state is PowerState.UNDEFINED and not step.changed


def test_a_flapping_line_is_counted_and_never_cycles_the_accelerator_faster_than_min_dwell() -> None:
    model = load_profile("orin_nano")
    min_dwell = 0.3
    policy = CerebellumFirst(PolicyParams(signals=(), demands=(), min_dwell_s=min_dwell, release_s=0), model)
    f = PowerFusion(FusionParams(on_debounce_s=0.0, off_debounce_s=0.0, flap_window_s=10, flap_edges=6))
    fst = f.initial_state()
    pst = policy.initial_state(0.0, AccelState.SLEEP)
    hold = Hold("op:awake", "op", "bench", HoldMode.AWAKE, float("inf"))  # key-on: awake (ACTIVE) ...
    targets: list[tuple[float, AccelState]] = []
    edges = flaps = 0
    for i in range(1000):  # 10 s, the line toggling every 70 ms (faster than min_dwell)
        t = i * 0.01
        level = 1.0 if (i // 7) % 2 == 0 else 0.0
        fst, step = f.step(fst, FusionInputs(line=Sample(level, t)), t)
        edges += step.edges.get("line", 0)
        flaps += step.flapping_started
        parked = fst.state is PowerState.OFF
        holds = () if parked else (hold,)  # ... parked: the policy puts it to its deepest state
        pst, d = policy.step(pst, Inputs({}, holds, parked=parked), t)
        if d.changed:
            targets.append((t, d.target))
    assert edges > 100 and flaps == 1
    assert len(targets) > 5  # it does follow, but ...
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(targets)]
    assert min(gaps) >= min_dwell - 1e-9  # ... never faster than min_dwell


def test_parked_denies_normal_demands_rests_deepest_and_quiets_stale_signals() -> None:
    from cerebellumd.config import policy_params

    config = parse_config(DEMO_TEXT)
    model = load_profile("orin_nano")
    policy = CerebellumFirst(policy_params(config), model)
    st = policy.initial_state(0.0, AccelState.IDLE)
    fresh = {"highway_engaged": Sample(1, 10.0)}
    st, d = policy.step(st, Inputs(fresh, parked=True), 10.0)
    st, d = policy.step(st, Inputs(fresh, parked=True), 10.2)  # past its 100 ms confirm
    assert d.target is AccelState.OFF and d.reason == "parked" and d.denied == "parked"
    # 20 s later every signal is stale; collision_risk is on_stale = wake, but a parked car is quiet.
    st, d = policy.step(st, Inputs({}, parked=True), 30.0)
    assert d.target is AccelState.OFF and "collision" not in d.active_demands
    # A critical demand still wakes it.
    st, d = policy.step(st, Inputs({"collision_risk": Sample(1, 31.0)}, parked=True), 31.0)
    assert d.target is AccelState.ACTIVE


# -- the budget, pure ----------------------------------------------------------------------------


def steps(b: BatteryBudget, st: Any, inp: BudgetInputs, t0: float, t1: float, dt: float) -> Any:
    t = t0
    while t < t1 - 1e-9:
        t += dt
        st = b.step(st, inp, t)
        if st.power_down:
            return st
    return st


def test_budget_credits_while_driving_capped_and_debits_every_domain_while_parked() -> None:
    b = BatteryBudget(BudgetParams())
    st = b.step(b.initial_state(None), BudgetInputs(driving=True, parked=False, draw_w=10), 0.0)
    assert st.budget_wh == pytest.approx(3.0)  # openpilot's floor: capacity / 10
    st = steps(b, st, BudgetInputs(driving=True, parked=False, draw_w=10), 0, 600, 1.0)
    assert st.budget_wh == pytest.approx(3.0 + 45 * 600 / 3600)  # 45 W for 10 min
    st = steps(b, st, BudgetInputs(driving=True, parked=False, draw_w=10), 600, 7200, 10.0)
    assert st.budget_wh == pytest.approx(30.0)  # capped
    # Parked, 5 W of every domain together: 30 Wh last 6 h.
    st = steps(b, st, BudgetInputs(driving=False, parked=True, draw_w=5.0), 7200, 7200 + 7 * 3600, 10.0)
    assert st.power_down and st.reason == "budget"
    assert st.last_t - 7200 == pytest.approx(6 * 3600, abs=10)
    # Measured battery power replaces the configured charge rate.
    st = steps(b, b.initial_state(0.0), BudgetInputs(driving=True, parked=False, draw_w=0, battery_w=-20), 0, 3600,
               10.0)
    assert st.budget_wh == pytest.approx(0.0)  # 3 Wh floor minus 20 Wh, clamped at 0


def test_budget_min_parked_max_parked_and_low_passed_voltage() -> None:
    b = BatteryBudget(BudgetParams())
    st = b.step(b.initial_state(0.0), BudgetInputs(driving=False, parked=True, draw_w=100), 0.0)
    st = steps(b, st, BudgetInputs(driving=False, parked=True, draw_w=100), 0, 1000, 1.0)
    assert st.power_down and st.reason == "budget" and st.last_t == pytest.approx(300)  # not before 300 s
    st = b.step(b.initial_state(30.0), BudgetInputs(driving=False, parked=True, draw_w=0), 0.0)
    st = steps(b, st, BudgetInputs(driving=False, parked=True, draw_w=0), 0, 40 * 3600, 60.0)
    assert st.power_down and st.reason == "max_parked" and st.last_t == pytest.approx(30 * 3600)
    # A drop from 12.6 V to 11.0 V: the 45 s LPF crosses 11.8 V after 45 * ln(1.6/0.8) = 31.2 s,
    # then 30 s of delay.
    st = b.step(b.initial_state(30.0), BudgetInputs(driving=False, parked=True, draw_w=1, voltage_v=12.6), 0.0)
    st = steps(b, st, BudgetInputs(driving=False, parked=True, draw_w=1, voltage_v=11.0), 0, 200, 0.1)
    assert st.power_down and st.reason == "voltage"
    assert st.last_t == pytest.approx(31.2 + 30, abs=0.3)
    # A short dip (a crank) never does.
    st = b.step(b.initial_state(30.0), BudgetInputs(driving=False, parked=True, draw_w=1, voltage_v=12.6), 0.0)
    st = steps(b, st, BudgetInputs(driving=False, parked=True, draw_w=1, voltage_v=9.0), 0, 3, 0.1)
    st = steps(b, st, BudgetInputs(driving=False, parked=True, draw_w=1, voltage_v=12.6), 3, 200, 0.1)
    assert not st.power_down


# -- config --------------------------------------------------------------------------------------


def test_config_checks_sources_signals_thresholds_and_active_nm_on_a_listen_only_bus() -> None:
    with pytest.raises(ConfigError, match="no source"):
        parse_config(DEMO_TEXT + "\n[vehicle_power]\nenabled = true\n")
    with pytest.raises(ConfigError, match="unknown signal"):
        parse_config(DEMO_TEXT + '\n[vehicle_power]\nenabled = true\nline_signal = "nope"\n')
    with pytest.raises(ConfigError, match="line_on_threshold"):
        parse_config(DEMO_TEXT + "\n[vehicle_power]\nline_on_threshold = 1\nline_off_threshold = 2\n")
    with pytest.raises(ConfigError, match="power_modes"):
        parse_config(DEMO_TEXT + '\n[vehicle_power]\npower_modes = { "2" = "running" }\n')
    with pytest.raises(ConfigError, match="needs \\[vehicle_power\\]"):
        parse_config(DEMO_TEXT + "\n[battery]\nenabled = true\n")
    with pytest.raises(ConfigError, match="listen_only = false"):
        parse_config(DEMO_TEXT + "\n[nm]\nenabled = true\npassive = false\n")
    config = parse_config(DEMO_TEXT)
    assert all(bus.listen_only for bus in config.can)  # listen-only by default


@pytest.mark.parametrize("interface", sorted(LISTEN_ONLY_OPTIONS))
def test_listen_only_options_are_what_python_can_takes(interface: str) -> None:
    """Each option we pass is a real keyword of that python-can interface (no hardware needed)."""
    import importlib

    paths = {"slcan": "can.interfaces.slcan:slcanBus", "vector": "can.interfaces.vector:VectorBus",
             "nixnet": "can.interfaces.nixnet:NiXNETcanBus", "cantact": "can.interfaces.cantact:CantactBus",
             "pcan": "can.interfaces.pcan:PcanBus", "kvaser": "can.interfaces.kvaser:KvaserBus"}
    module, cls = paths[interface].split(":")
    bus = getattr(importlib.import_module(module), cls)
    source = inspect.getsource(bus.__init__)
    params = inspect.signature(bus.__init__).parameters
    for key in LISTEN_ONLY_OPTIONS[interface]():
        assert key in params or f'"{key}"' in source or f"'{key}'" in source, (interface, key)


# -- the daemon ----------------------------------------------------------------------------------

VP = """
[signals.ignition]
can = "BodyStatus.Ignition"
max_age_ms = 500

[vehicle_power]
enabled = true
can_ignition_signal = "ignition"
off_debounce_ms = 200
interval_ms = 20
"""


@contextlib.asynccontextmanager
async def parked_rig(extra: str = "", **kwargs: Any) -> AsyncIterator[Rig]:
    rig = await make_rig(extra=VP + extra, **kwargs)
    try:
        yield rig
    finally:
        await rig.close()


def part(rig: Rig) -> VehiclePower:
    return next(p for p in rig.daemon.parts if isinstance(p, VehiclePower))


async def test_key_off_parks_the_accelerator_and_key_on_counts_readiness() -> None:
    async with parked_rig(initial=AccelState.IDLE) as rig:
        vp, d = part(rig), rig.daemon
        await until(lambda: vp.state is PowerState.ON, 5, "ignition on")
        assert rig.metric("cerebellumd_vehicle_power_state", state="on") == 1
        rig.values["BodyStatus"]["Ignition"] = 0
        await until(lambda: vp.state is PowerState.OFF, 5, "key-off")
        assert d.parked
        await until(lambda: d.actuator.state is AccelState.OFF, 10, "accelerator off (deepest) when parked")
        assert rig.metric("cerebellumd_keep_awake_total", reason="hold") == 0
        rig.values["BodyStatus"]["Ignition"] = 1
        await until(lambda: vp.last_ready_s is not None, 10, "ready after key-on")
        assert vp.last_ready_s is not None and vp.last_ready_s > 0
        assert d.actuator.state is not AccelState.OFF
        assert rig.metric("cerebellumd_keyon_ready_seconds_count") == 1
        extra = vp.state_extra()["vehicle_power"]
        assert extra["state"] == "on" and extra["vss"] == "ON" and extra["can_latched"] is True


async def test_a_hold_with_a_reason_is_the_only_keep_awake_and_is_counted_once() -> None:
    async with parked_rig() as rig:
        vp, d = part(rig), rig.daemon
        rig.values["BodyStatus"]["Ignition"] = 0
        await until(lambda: vp.state is PowerState.OFF, 5, "key-off")
        r = d.commands.handle_payload(
            '{"command": "wake", "owner": "op", "id": "x", "reason": "log upload", "ttl_s": 60}', d.clock.now())
        assert r.ok
        await until(lambda: d.actuator.state is AccelState.ACTIVE, 10, "held awake while parked")
        await until(lambda: rig.metric("cerebellumd_keep_awake_total", reason="hold") == 1, 5, "counted")
        assert vp.awake_reasons["hold"].endswith("log upload")
        for _ in range(10):  # one episode, one count, however many steps
            vp.step(d.clock.now())
        assert sum(rig.metric("cerebellumd_keep_awake_total", reason=r) for r in KEEP_AWAKE_REASONS) == 1


async def test_budget_is_persisted_and_a_corrupt_one_restarts_at_the_floor(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    battery = '\n[battery]\nenabled = true\n'
    daemon_key = f'[daemon]\nstate_file = "{state}"\n'
    replace = {"[daemon]\n": daemon_key}
    async with parked_rig(battery, replace=replace) as rig:
        vp = part(rig)
        assert vp.budget is not None and vp.budget.budget_wh == pytest.approx(3.0)
        assert rig.metric("cerebellumd_battery_budget_restores_total", result="missing") == 1
        await until(lambda: vp.budget is not None and vp.budget.budget_wh > 3.0, 5, "credited while driving")
    saved = json.loads(await asyncio.to_thread(state.read_text))
    assert saved["schema"] == 1 and saved["sections"]["battery"]["budget_wh"] > 3.0
    saved["sections"]["battery"]["budget_wh"] = 12.5
    await asyncio.to_thread(state.write_text, json.dumps(saved))
    async with parked_rig(battery, replace=replace) as rig:
        vp = part(rig)
        assert vp.budget is not None and vp.budget.budget_wh >= 12.5
        assert rig.metric("cerebellumd_battery_budget_restores_total", result="ok") == 1
    saved = json.loads(await asyncio.to_thread(state.read_text))
    saved["sections"]["battery"]["budget_wh"] = "lots"
    await asyncio.to_thread(state.write_text, json.dumps(saved))
    async with parked_rig(battery, replace=replace) as rig:
        vp = part(rig)
        assert vp.budget is not None and vp.budget.budget_wh == pytest.approx(3.0, abs=0.01)
        assert rig.metric("cerebellumd_battery_budget_restores_total", result="corrupt") == 1
        assert rig.daemon.joules["gateway"] > 0  # the rest of the file was kept


async def test_an_empty_budget_powers_down_holds_the_accelerator_off_and_runs_the_hook(tmp_path: Path) -> None:
    out = tmp_path / "hook.txt"
    hook = json.dumps([sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(out)])
    battery = f"\n[battery]\nenabled = true\nrestore_floor_wh = 0\nmin_parked_s = 0\npower_down_command = {hook}\n"
    async with parked_rig(battery) as rig:
        vp, d = part(rig), rig.daemon
        rig.values["BodyStatus"]["Ignition"] = 0
        await until(lambda: vp.power_down_reason == "budget", 10, "power down on an empty budget")
        assert rig.metric("cerebellumd_battery_power_down", reason="budget") == 1
        assert vp.state_extra()["battery"]["power_down"] is True
        # Even an awake hold cannot bring the accelerator back: the target filter holds it off.
        d.commands.handle_payload('{"command": "wake", "owner": "op", "id": "x", "ttl_s": 60}', d.clock.now())
        await until(lambda: d.actuator.state is AccelState.OFF, 10, "accelerator off")
        assert d.actuator.clamped_by == "path:power_down"
        await until(lambda: rig.metric("cerebellumd_accelerator_energy_joules_total", reason="path:power_down") > 0,
                    10, "the power-down's energy named")
        await until(lambda: out.exists(), 10, "the hook ran")
        assert await asyncio.to_thread(out.read_text) == "budget"
        assert rig.metric("cerebellumd_battery_power_down_hook_runs_total", result="ok") == 1
        rig.values["BodyStatus"]["Ignition"] = 1  # key-on lifts it
        await until(lambda: vp.power_down_reason is None, 10, "lifted at key-on")
        assert rig.metric("cerebellumd_battery_power_down", reason="budget") == 0
        await until(lambda: d.actuator.clamped_by is None, 10, "the filter lets go")


async def test_listen_only_bus_refuses_and_counts_every_send() -> None:
    async with parked_rig() as rig:
        ingest = rig.daemon.ingests[0]
        with pytest.raises(can.CanOperationError, match="listen_only"):
            ingest.send(can.Message(arbitration_id=0x123, data=b"\x00"))
        assert rig.metric("cerebellumd_can_tx_frames_total", bus="vehicle", result="refused") == 1
        assert rig.metric("cerebellumd_can_tx_frames_total", bus="vehicle", result="ok") == 0


# -- the ignition-off log ------------------------------------------------------------------------

NM = """
[nm]
enabled = true
timeout_ms = 600
wait_bus_sleep_ms = 300
idle_timeout_ms = 300
"""


async def replay_log(channel: str) -> int:
    """Plays tests/data/ignition_off.log onto the virtual bus at its own pace; returns frames sent."""
    def play() -> int:
        bus = REAL_BUS(interface="virtual", channel=channel)
        n = 0
        try:
            for msg in can.MessageSync(can.LogReader(LOG)):
                bus.send(msg)
                n += 1
        finally:
            bus.shutdown()
        return n

    return await asyncio.to_thread(play)


@pytest.mark.parametrize("hold", [False, True])
async def test_replaying_an_ignition_off_log_sends_nothing_and_keeps_nothing_awake(hold: bool) -> None:
    """The car is off and its bus goes to sleep: the daemon sends no frame, never keeps the bus or
    the accelerator awake, and ends parked in bus sleep with the accelerator off. With an
    operator hold that states its reason, exactly that one keep-awake is counted."""
    async with parked_rig(NM, vehicle=False, initial=AccelState.SLEEP) as rig:
        d, vp = rig.daemon, part(rig)
        listener = REAL_BUS(interface="virtual", channel=rig.channel)
        try:
            if hold:
                d.commands.handle_payload(
                    '{"command": "wake", "owner": "op", "id": "x", "reason": "garage job", "ttl_s": 60}',
                    d.clock.now())
            played = await replay_log(rig.channel)
            assert played == 220
            await until(lambda: vp.state is PowerState.OFF, 5, "off from the log's KL15")
            heard = 0
            while listener.recv(0) is not None:
                heard += 1
            assert heard == played  # every frame on the bus is the log's: none of ours
            assert rig.metric("cerebellumd_can_tx_frames_total", bus="vehicle", result="ok") == 0
            assert rig.metric("cerebellumd_can_tx_frames_total", bus="vehicle", result="refused") == 0
            assert rig.metric("cerebellumd_nm_tx_total", result="ok") == 0
            keep_awake = {r: rig.metric("cerebellumd_keep_awake_total", reason=r) for r in KEEP_AWAKE_REASONS}
            if hold:
                assert keep_awake["hold"] == 1 and sum(keep_awake.values()) == 1 + keep_awake["nm_request"]
                assert vp.awake_reasons["hold"] == "op: garage job"
                assert d.actuator.state is AccelState.ACTIVE or d.actuator.goal is AccelState.ACTIVE
            else:
                assert sum(keep_awake.values()) == 0, keep_awake
                await until(lambda: d.paused, 10, "NM bus sleep after the log's silence")
                await until(lambda: d.actuator.state is AccelState.OFF, 10, "accelerator off")
                assert rig.metric("cerebellumd_vehicle_power_state", state="off") == 1
        finally:
            listener.shutdown()


async def test_an_empty_budget_tells_the_mcu_and_key_on_revokes_it(tmp_path: Path) -> None:
    """With an [mcu] link the power-down permission is a command on the MCU protocol
    (POWER_DOWN_ALLOWED, acknowledged), and key-on takes it back; the hook is not run."""
    emulator = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1, link_path=tmp_path / "mcu")
    await emulator.async_open()
    emulator.start()
    battery = (f'\n[battery]\nenabled = true\nrestore_floor_wh = 0\nmin_parked_s = 0\n'
               f'[mcu]\nport = "{tmp_path / "mcu"}"\nheartbeat_timeout_ms = 500\n')
    try:
        async with parked_rig(battery) as rig:
            vp = part(rig)
            rig.values["BodyStatus"]["Ignition"] = 0
            await until(lambda: vp.power_down_reason == "budget", 10, "power down on an empty budget")
            await until(lambda: emulator.power_down is not None and emulator.power_down.allow, 10,
                        "POWER_DOWN_ALLOWED at the MCU")
            assert emulator.power_down is not None and emulator.power_down.reason == int(Reason.ENERGY_BUDGET)
            await until(lambda: rig.metric("cerebellumd_battery_power_down_link_total", result="acked") == 1, 10,
                        "the permission acknowledged")
            rig.values["BodyStatus"]["Ignition"] = 1
            await until(lambda: emulator.power_down is not None and not emulator.power_down.allow, 10,
                        "the permission revoked at key-on")
            assert rig.metric("cerebellumd_battery_power_down_link_total", result="revoked") == 1
            assert rig.metric("cerebellumd_battery_power_down_hook_runs_total", result="ok") == 0
    finally:
        await emulator.stop()
