"""The policy's self-calibration in the daemon: a wake that comes after its demand's deadline
tightens the budget for unannounced challenges; the budget is exported, shown in the MQTT state
document, persisted in the state file and restored at the next start; a corrupt saved one is
counted and ignored; a consumer's late report over MQTT (a real broker) teaches it too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cerebellumd.accel import AccelState
from cerebellumd.config import parse_config
from cerebellumd.daemon.calibration import CalibrationPart
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.mqtt import state_payload
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.profiles import load_profile
from tests import test_mqtt as mq
from tests.test_faults import DEMO_TEXT, Rig, _channels
from tests.test_mqtt import PASSWORDS, Broker, Peer

from .helpers import until

# the real-broker fixtures of test_mqtt, shared
broker_dir = mq.broker_dir
broker = mq.broker
CONFIGURED_S = 1.5  # the demo's latency_budget_ms


async def start(tmp_path: Path, state_file: Path, *, deadline_ms: int = 300, extra: str = "") -> Rig:
    channel = f"test-calibration-{next(_channels)}"
    text = DEMO_TEXT.replace('channel = "cerebellumd-demo"', f'channel = "{channel}"')
    text = text.replace('initial_state = "idle"', 'initial_state = "sleep"')
    text = text.replace('[daemon]\n', f'[daemon]\nstate_file = "{state_file}"\n', 1)
    text = text.replace("[prometheus]\n", "[prometheus]\nenabled = false\n", 1)
    # The collision demand must be served within 300 ms; from sleep the accelerator needs 1 s.
    old = 'when = "collision_risk == 1"\nclass = "critical"\ndeadline_ms = 1500\n'
    assert old in text
    text = text.replace(old, old.replace("1500", str(deadline_ms))) + extra
    config = await asyncio.to_thread(parse_config, text)
    model = await asyncio.to_thread(load_profile, "orin_nano")
    driver = SimulatedAccelerator(model, initial=AccelState.SLEEP, time_scale=1.0)
    daemon = await Daemon.async_create(config, clock=Clock(), driver=driver, model=model)
    rig = Rig(daemon, driver, channel)
    rig.start_vehicle()
    await daemon.async_start()
    return rig


def part(daemon: Daemon) -> CalibrationPart:
    return next(p for p in daemon.parts if isinstance(p, CalibrationPart))


async def test_a_late_wake_tightens_exports_persists_and_is_restored(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    rig = await start(tmp_path, state_file)
    try:
        await until(lambda: rig.metric("cerebellumd_unannounced_budget_seconds") == CONFIGURED_S, 5,
                    "the configured budget exported")
        await collision_from_sleep(rig)
        await until(lambda: rig.metric("cerebellumd_late_wakes") == 1, 5, "the late wake counted")
        learned = rig.metric("cerebellumd_unannounced_budget_seconds")
        assert learned < 1.0  # below sleep's 1 s exit: unannounced challenges now need idle
        body = json.loads(state_payload(rig.daemon.snapshot(), part(rig.daemon).state_extra()))
        assert body["calibration"]["unannounced_budget_s"] == round(learned, 3)
        assert body["calibration"]["late_wakes"] == 1
        assert body["calibration"]["trusted"] is True  # the collision tested the budget
        # The collision was a challenge, and an unannounced one: above the prior share of 0.3.
        assert body["calibration"]["challenges"] >= 1 and body["calibration"]["unannounced_share"] > 0.3
    finally:
        await rig.close()
    saved = json.loads(await asyncio.to_thread(state_file.read_text))
    assert saved["sections"]["calibration"]["budget_s"] == learned
    assert saved["sections"]["calibration"]["trusted"] is True  # a probation would not start again
    # The clean stretch run so far is kept, for the next start to continue (not restart) it.
    assert 0.0 <= saved["sections"]["calibration"]["clean_s"] < 900.0
    # Entry risk's counts: the collision was a challenge, and an unannounced one.
    counts = saved["sections"]["entry_risk"]
    assert counts["challenges"] >= 1 and counts["unannounced"] >= 1

    again = await start(tmp_path, state_file)  # a restart: what was learned is kept
    try:
        assert part(again.daemon).restored
        risk = again.daemon.entry_risk()
        assert risk is not None and risk.to_dict() == counts  # restored before any challenge
        await until(lambda: again.metric("cerebellumd_unannounced_budget_seconds") == learned, 5,
                    "the restored budget exported before any wake")
    finally:
        await again.close()


async def test_a_corrupt_saved_calibration_is_counted_and_ignored(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    rig = await start(tmp_path, state_file)
    await rig.close()
    body = json.loads(await asyncio.to_thread(state_file.read_text))
    body["sections"]["calibration"] = {"budget_s": -3, "late_wakes": "many"}
    body["sections"]["entry_risk"] = {"challenges": 2, "unannounced": 5}  # more unannounced than all
    await asyncio.to_thread(state_file.write_text, json.dumps(body))
    again = await start(tmp_path, state_file)
    try:
        assert not part(again.daemon).restored
        assert again.metric("cerebellumd_state_file_errors_total", kind="corrupt") == 2
        risk = again.daemon.entry_risk()
        assert risk is not None and risk.challenges == 0  # the prior share, not the broken counts
        await until(lambda: again.metric("cerebellumd_unannounced_budget_seconds") == CONFIGURED_S, 5,
                    "the configured budget")
    finally:
        await again.close()


async def mqtt_rig(tmp_path: Path, broker: Broker) -> Rig:
    """The demo config with its collision deadline as shipped (1500 ms) and MQTT on the broker."""
    password = tmp_path / "mqtt.password"
    await asyncio.to_thread(password.write_text, PASSWORDS["cerebellumd"] + "\n")
    mqtt = (f'\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "cerebellumd"\n'
            f'password_file = "{password}"\npublish_interval_ms = 100\n')
    return await start(tmp_path, tmp_path / "state.json", deadline_ms=1500, extra=mqtt)


async def command(perception: Peer, node: str, **body: object) -> dict[str, object]:
    """One command on `set` as the perception stack, and the daemon's reply to it."""
    await perception.publish(f"cerebellumd/{node}/set", json.dumps({"owner": "perception", **body}))
    reply = await perception.expect(f"cerebellumd/{node}/response",
                                    lambda m: json.loads(m.payload).get("id") == body["id"])  # type: ignore[arg-type]
    return dict(json.loads(reply.payload))  # type: ignore[arg-type]


async def listen(perception: Peer, node: str) -> None:
    """Subscribe to the replies, then wait for the daemon's retained `online`, which it publishes
    only once its subscription to `set` is acknowledged (a command sent before is lost: `set`
    is never retained)."""
    await perception.subscribe(f"cerebellumd/{node}/response")
    await perception.subscribe(f"cerebellumd/{node}/status")
    await perception.expect(f"cerebellumd/{node}/status", lambda m: m.payload == b"online")


async def collision_from_sleep(rig: Rig) -> None:
    await until(lambda: rig.daemon.actuator.state is AccelState.SLEEP, 10, "the accelerator asleep")
    rig.values["AdasStatus"]["CollisionRisk"] = 1  # unannounced: nothing anticipated it
    await until(lambda: rig.daemon.actuator.state is AccelState.ACTIVE, 10, "the wake")


async def test_a_consumers_late_report_over_mqtt_tightens_the_budget(tmp_path: Path, broker: Broker) -> None:
    """The collision demand's configured deadline (1500 ms) is met from sleep (1 s exit), so the
    daemon alone sees nothing late; the perception stack, which owns the real deadline, reports
    over MQTT that it was ready 400 ms late. The policy learns what that challenge allowed."""
    rig = await mqtt_rig(tmp_path, broker)
    node = rig.daemon.config.daemon.node
    try:
        async with Peer(broker.port, "operator") as perception:
            await listen(perception, node)
            await until(lambda: rig.daemon.actuator.state is AccelState.SLEEP, 10, "the accelerator asleep")
            assert (await command(perception, node, command="late", id="too-early", late_ms=400))["ok"] is True
            assert rig.metric("cerebellumd_unannounced_budget_seconds") == CONFIGURED_S  # no wake yet: nothing learned
            await collision_from_sleep(rig)
            assert rig.metric("cerebellumd_late_wakes") == 0  # on time against the configured deadline
            assert (await command(perception, node, command="late", id="r1", late_ms=400))["ok"] is True
            await until(lambda: rig.metric("cerebellumd_late_wakes") == 1, 5, "the late report learned")
            assert rig.metric("cerebellumd_unannounced_budget_seconds") < 1.0  # below sleep's 1 s exit: idle now
            assert rig.metric("cerebellumd_consumer_reports_total", kind="late") == 2
            bad = await command(perception, node, command="late", id="bad", late_ms=-5)
            assert bad["ok"] is False and "late_ms" in str(bad["error"])
    finally:
        await rig.close()


async def test_a_served_report_over_mqtt_tightens_before_any_miss(tmp_path: Path, broker: Broker) -> None:
    """The wake from sleep is on time for the configured 1500 ms and for the consumer too, but the
    consumer says its challenge allowed only 1100 ms: the next one may find the accelerator in a
    state it cannot leave in time, so the budget tightens with no late wake counted. A served
    report that allowed more than the configured deadline teaches nothing."""
    rig = await mqtt_rig(tmp_path, broker)
    node = rig.daemon.config.daemon.node
    try:
        async with Peer(broker.port, "operator") as perception:
            await listen(perception, node)
            await collision_from_sleep(rig)
            assert (await command(perception, node, command="served", id="loose", allowed_ms=2000))["ok"] is True
            await until(lambda: rig.metric("cerebellumd_consumer_reports_total", kind="served") == 1, 5, "counted")
            assert rig.metric("cerebellumd_unannounced_budget_seconds") == CONFIGURED_S
            assert (await command(perception, node, command="served", id="tight", allowed_ms=1100))["ok"] is True
            await until(lambda: rig.metric("cerebellumd_unannounced_budget_seconds") < CONFIGURED_S, 5,
                        "the served report learned")
            assert abs(rig.metric("cerebellumd_unannounced_budget_seconds") - 1.0) < 1e-6  # 1100 ms less the margin
            assert rig.metric("cerebellumd_late_wakes") == 0
            both = await command(perception, node, command="served", id="both", allowed_ms=5, late_ms=5)
            assert both["ok"] is False
    finally:
        await rig.close()
