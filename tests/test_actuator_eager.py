"""Actuator with an EagerAccelerator driver: a wake is commanded synchronously inside
`request()` (no task hop before the command), but the drive task still reads the state back,
and a failed eager command is counted and retried through `async_set_state`."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from cerebellumd.accel import AccelState
from cerebellumd.config import AcceleratorConfig
from cerebellumd.daemon.actuator import Actuator
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.metrics import Metrics
from cerebellumd.drivers.base import DriverError, EagerAccelerator
from cerebellumd.profiles import load_profile

from .helpers import until


class EagerDriver:
    kind: ClassVar[str] = "test-eager"

    def __init__(self, *, fail_eager: bool = False, reach: bool = True) -> None:
        self.state = AccelState.SLEEP
        self.calls: list[tuple[str, AccelState]] = []
        self.fail_eager = fail_eager
        self.reach = reach  # False: commands are accepted but the state never changes

    def request_now(self, target: AccelState) -> None:
        self.calls.append(("now", target))
        if self.fail_eager:
            raise DriverError("eager path refused")
        if self.reach:
            self.state = target

    async def async_open(self) -> None:
        return None

    async def async_set_state(self, target: AccelState) -> None:
        self.calls.append(("async", target))
        if self.reach:
            self.state = target

    async def async_read_state(self) -> AccelState:
        return self.state

    async def async_close(self) -> None:
        return None




async def make(driver: EagerDriver, retries: int = 2) -> tuple[Actuator, Metrics]:
    model = await asyncio.to_thread(load_profile, "orin_nano")
    metrics = Metrics()
    cfg = AcceleratorConfig(retries=retries, retry_backoff_ms=1, command_timeout_ms=200)
    act = Actuator(driver, model, cfg, Clock(scale=1000.0), metrics, poll_s=0.001)
    await act.async_start()
    return act, metrics


def failures(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value(
        "cerebellumd_actuation_failures_total", {"kind": kind}) or 0.0


async def test_wake_is_commanded_inside_request_and_still_read_back() -> None:
    driver = EagerDriver()
    assert isinstance(driver, EagerAccelerator)
    act, _ = await make(driver)
    act.request(AccelState.ACTIVE)
    # Synchronously, before any await: the command is out, the read-back is not done yet.
    assert driver.calls == [("now", AccelState.ACTIVE)]
    assert act.state is AccelState.SLEEP and act.busy
    await until(lambda: not act.busy)
    assert act.state is AccelState.ACTIVE  # observed through async_read_state
    assert driver.calls == [("now", AccelState.ACTIVE)]  # not commanded twice
    await act.async_stop(None)


async def test_sleep_commands_keep_the_drive_task_path() -> None:
    driver = EagerDriver()
    driver.state = AccelState.ACTIVE
    act, _ = await make(driver)
    act.request(AccelState.SLEEP)
    assert driver.calls == []  # only wakes are latency-critical
    await until(lambda: act.state is AccelState.SLEEP and not act.busy)
    assert driver.calls == [("async", AccelState.SLEEP)]
    await act.async_stop(None)


async def test_a_failed_eager_wake_is_counted_and_retried_asynchronously() -> None:
    driver = EagerDriver(fail_eager=True)
    act, metrics = await make(driver)
    act.request(AccelState.ACTIVE)
    await until(lambda: act.state is AccelState.ACTIVE and not act.busy)
    assert driver.calls == [("now", AccelState.ACTIVE), ("async", AccelState.ACTIVE)]
    assert failures(metrics, "error") == 1
    await act.async_stop(None)


async def test_an_eager_wake_that_does_not_take_is_retried_until_given_up() -> None:
    driver = EagerDriver(reach=False)
    act, metrics = await make(driver, retries=1)
    act.request(AccelState.ACTIVE)
    await until(lambda: failures(metrics, "gave_up") == 1)
    assert driver.calls == [("now", AccelState.ACTIVE), ("async", AccelState.ACTIVE)]
    assert failures(metrics, "readback") == 2
    assert act.goal is None  # the next decision may command again
    await act.async_stop(None)


async def test_no_eager_command_while_another_command_is_under_way() -> None:
    driver = EagerDriver()
    driver.state = AccelState.ACTIVE
    act, _ = await make(driver)
    act.request(AccelState.SLEEP)  # drive task created, not yet run
    act.request(AccelState.ACTIVE)  # supersedes it: must not race the cancelled task
    assert driver.calls == []
    await until(lambda: not act.busy)
    assert driver.calls == [("async", AccelState.ACTIVE)]
    assert act.state is AccelState.ACTIVE
    await act.async_stop(None)
