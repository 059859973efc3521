"""One set of transition rules for the evaluator's accelerator and the daemon's simulated driver
(`AcceleratorModel.next_leg`): a transition under way runs to its end, resting -> resting goes
through `active`, and both engines cost the same command sequence the same."""

from __future__ import annotations

import asyncio

from cerebellumd.accel import AccelState
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.profiles import load_profile
from cerebellumd.sim.accelerator import SimAccelerator

from .helpers import until

MODEL = load_profile("hailo8")  # sleep: enter 0.05 s, exit 0.25 s; off: enter 0.2 s, exit 2.0 s
SCALE = 20.0  # the driver's time runs 20x faster than the wall clock


def test_legs() -> None:
    assert MODEL.next_leg(AccelState.IDLE, AccelState.IDLE) is None
    kind, to, cost = MODEL.next_leg(AccelState.ACTIVE, AccelState.SLEEP) or (None, None, None)
    assert (kind, to, cost) == (AccelState.SUSPENDING, AccelState.SLEEP, MODEL.enter[AccelState.SLEEP])
    # off -> sleep boots first: the model has no off -> sleep edge.
    assert MODEL.next_leg(AccelState.OFF, AccelState.SLEEP) == (
        AccelState.WAKING, AccelState.ACTIVE, MODEL.exit[AccelState.OFF])
    # A failed resume: a wake is a cold start, a resting target is entered directly.
    assert MODEL.next_leg(AccelState.UNKNOWN, AccelState.ACTIVE) == (
        AccelState.WAKING, AccelState.ACTIVE, MODEL.exit[AccelState.OFF])
    assert MODEL.next_leg(AccelState.UNKNOWN, AccelState.OFF) == (
        AccelState.SUSPENDING, AccelState.OFF, MODEL.enter[AccelState.OFF])


async def test_a_wake_mid_suspend_waits_for_the_suspend_then_exits() -> None:
    """As the evaluator does (issue 14's US06 trace): the wake is ready after the rest of the entry
    plus the whole exit, never by cutting the entry short."""
    loop = asyncio.get_running_loop()
    driver = SimulatedAccelerator(MODEL, initial=AccelState.ACTIVE, time_scale=SCALE)
    started = loop.time()
    await driver.async_set_state(AccelState.OFF)  # 0.2 s of entry
    assert await driver.async_read_state() is AccelState.SUSPENDING
    await driver.async_set_state(AccelState.ACTIVE)
    assert await driver.async_read_state() is AccelState.SUSPENDING  # not cut short
    await until(lambda: driver._state is AccelState.ACTIVE, 10, "active again")
    took = (loop.time() - started) * SCALE
    entry_and_exit = MODEL.enter[AccelState.OFF].latency_s + MODEL.exit[AccelState.OFF].latency_s
    assert took >= entry_and_exit - 0.05, took


async def test_the_driver_moves_by_the_evaluators_legs() -> None:
    """The same commands at the same (scaled) times: the driver passes through the same states
    as the evaluator's accelerator, sleep -> off included (it wakes first)."""
    commands = [(0.0, AccelState.SLEEP), (1.0, AccelState.OFF), (4.0, AccelState.SLEEP), (8.0, AccelState.ACTIVE)]
    ev = SimAccelerator(MODEL, AccelState.ACTIVE)
    for t, target in commands:
        ev.command(t, target)
    ev.finish(10.0)
    expected = [AccelState.ACTIVE] + [state for _, _, state in ev.segments]

    loop = asyncio.get_running_loop()
    driver = SimulatedAccelerator(MODEL, initial=AccelState.ACTIVE, time_scale=SCALE)
    seen = [AccelState.ACTIVE]
    set_at = [loop.time()]
    set_state = driver._set

    def record(state: AccelState) -> None:
        """Every state the driver passes through, in order; one it leaves within the same loop
        callback (the `active` between a wake and the suspend that follows) is not a state
        anyone can read, as the evaluator records no zero-length segment."""
        now = loop.time()
        if now - set_at[-1] < 1e-4 and len(seen) > 1:
            seen.pop()
            set_at.pop()
        if state is not seen[-1]:
            seen.append(state)
            set_at.append(now)
        set_state(state)

    driver._set = record  # type: ignore[method-assign]
    t0 = loop.time()
    for t, target in commands:
        delay = t / SCALE - (loop.time() - t0)
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule of the commands, not a wait for a result
        await driver.async_set_state(target)
    await until(lambda: seen[-1] is AccelState.ACTIVE and len(seen) > 1, 10, "active")
    want = [s for i, s in enumerate(expected) if i == 0 or s is not expected[i - 1]]
    assert [s.value for s in seen] == [s.value for s in want]
