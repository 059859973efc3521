"""apply_realtime and friends: every path, including the degraded ones.

Privileged calls (SCHED_FIFO, mlockall) are only made for real in a child process, so the test
runner itself keeps its normal scheduling and memory behaviour.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from cerebellumd.config import RealtimeConfig, parse_config
from cerebellumd.daemon import realtime
from cerebellumd.daemon.realtime import (
    RealtimeSyscalls,
    after_startup,
    apply_realtime,
    freeze_gc_after_startup,
    install_event_loop_policy_if,
)
from cerebellumd.daemon.runtime import Daemon

from .helpers import until


@dataclass
class Settings:
    uvloop: bool = False
    cpu_affinity: list[int] = field(default_factory=list)
    sched_fifo_priority: int = 0
    mlockall: bool = False
    gc_freeze: bool = False


class FakeSyscalls(RealtimeSyscalls):
    """Records calls; raises the configured exception per call instead of touching the OS."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, object]] = []

    def _do(self, name: str, arg: object) -> None:
        self.calls.append((name, arg))
        if self.fail is not None:
            raise self.fail

    def set_affinity(self, cpus: Sequence[int]) -> None:
        self._do("affinity", list(cpus))

    def set_fifo(self, priority: int) -> None:
        self._do("fifo", priority)

    def mlockall(self) -> None:
        self._do("mlockall", None)


ALL_ON = Settings(cpu_affinity=[1], sched_fifo_priority=50, mlockall=True)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=realtime.__name__)


def test_nothing_requested_does_nothing() -> None:
    sc = FakeSyscalls()
    assert apply_realtime(Settings(), syscalls=sc) == []
    assert sc.calls == []


def test_all_applied_when_permitted(caplog: pytest.LogCaptureFixture) -> None:
    sc = FakeSyscalls()
    msgs = apply_realtime(ALL_ON, syscalls=sc)
    assert sc.calls == [("affinity", [1]), ("fifo", 50), ("mlockall", None)]
    assert len(msgs) == 3
    assert "pinned to CPUs [1]" in msgs[0]
    assert "SCHED_FIFO priority 50" in msgs[1]
    assert "memory locked" in msgs[2]
    assert [r.getMessage() for r in caplog.records] == msgs


def test_eperm_degrades_each_setting_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    sc = FakeSyscalls(PermissionError(errno.EPERM, "Operation not permitted"))
    msgs = apply_realtime(ALL_ON, syscalls=sc)
    assert len(sc.calls) == 3  # one refusal does not stop the others from being tried
    assert all("EPERM" in m and "continuing without it" in m for m in msgs)
    assert "CAP_SYS_NICE" in msgs[1]
    assert "CAP_IPC_LOCK" in msgs[2]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_platform_without_the_calls_degrades() -> None:
    sc = FakeSyscalls(NotImplementedError("os.sched_setaffinity"))
    msgs = apply_realtime(ALL_ON, syscalls=sc)
    assert len(msgs) == 3
    assert all("not supported on this platform" in m for m in msgs)


def test_affinity_to_nonexistent_cpu_is_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    before = os.sched_getaffinity(0)
    msgs = apply_realtime(Settings(cpu_affinity=[4095]))  # real syscall: EINVAL
    assert len(msgs) == 1
    assert "cpu_affinity [4095]" in msgs[0] and "continuing without it" in msgs[0]
    assert caplog.records[0].levelno == logging.WARNING
    assert os.sched_getaffinity(0) == before


def test_negative_cpu_is_logged_not_raised() -> None:
    msgs = apply_realtime(Settings(cpu_affinity=[-1]))
    assert len(msgs) == 1 and "failed" in msgs[0]


def test_real_affinity_to_current_cpus_applies() -> None:
    current = sorted(os.sched_getaffinity(0))
    msgs = apply_realtime(Settings(cpu_affinity=current))
    assert msgs == [f"cpu_affinity: pinned to CPUs {current}"]
    assert sorted(os.sched_getaffinity(0)) == current


def test_accepts_the_real_config_model() -> None:
    cfg = RealtimeConfig(uvloop=False, cpu_affinity=[0], sched_fifo_priority=10, mlockall=True,
                         gc_freeze=True)
    sc = FakeSyscalls()
    apply_realtime(cfg, syscalls=sc)
    assert sc.calls == [("affinity", [0]), ("fifo", 10), ("mlockall", None)]


_CHILD = textwrap.dedent("""
    import json, os
    from cerebellumd.daemon.realtime import apply_realtime
    class S:
        uvloop = False; cpu_affinity = []; sched_fifo_priority = 1; mlockall = True
        gc_freeze = False
    msgs = apply_realtime(S())
    with open("/proc/self/status") as f:
        vmlck = next(line.split()[1] for line in f if line.startswith("VmLck:"))
    print(json.dumps({"msgs": msgs, "policy": os.sched_getscheduler(0),
                      "fifo": os.SCHED_FIFO, "vmlck_kb": int(vmlck)}))
""")


def test_real_fifo_and_mlockall_in_a_child_process() -> None:
    """Root (or CAP_SYS_NICE/CAP_IPC_LOCK) → applied; otherwise degraded. Either way the
    messages must match what the kernel reports for the process."""
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=60, check=True)
    res = json.loads(out.stdout)
    fifo_msg, lock_msg = res["msgs"]
    if "SCHED_FIFO priority 1" in fifo_msg:
        assert res["policy"] == res["fifo"]
    else:
        assert "continuing without it" in fifo_msg and res["policy"] != res["fifo"]
    if "memory locked" in lock_msg:
        assert res["vmlck_kb"] > 0
    else:
        assert "continuing without it" in lock_msg and res["vmlck_kb"] == 0


@pytest.fixture
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("_unfreeze")
def test_freeze_gc_after_startup_freezes_existing_objects() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    msg = freeze_gc_after_startup()
    assert gc.get_freeze_count() > 0
    assert f"{gc.get_freeze_count()} start-up objects frozen" in msg


@pytest.mark.usefixtures("_unfreeze")
def test_after_startup_freezes_only_when_configured_and_unfreezes_first() -> None:
    gc.freeze()  # as a start-up before a reload left it
    msgs = after_startup(Settings(gc_freeze=False))
    assert gc.get_freeze_count() == 0
    assert not any("frozen" in m for m in msgs)
    msgs = after_startup(Settings(gc_freeze=True))
    assert gc.get_freeze_count() > 0
    assert any("start-up objects frozen" in m for m in msgs)


_TRIM_CHILD = textwrap.dedent("""
    import json, sys
    from cerebellumd.daemon.realtime import after_startup

    class S:
        uvloop = False; cpu_affinity = []; sched_fifo_priority = 0; mlockall = False
        gc_freeze = False

    def rss_kb():
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmRSS:")))

    # 60 MB of 1 kB blocks: above pymalloc's 512 bytes, so from malloc's heap, below its mmap
    # threshold. Every 16th stays allocated, so free() leaves 15 kB holes that glibc keeps
    # mapped: only malloc_trim's release of free pages inside the heap returns them.
    blocks = [bytes(1000) + bytes([i % 256]) for i in range(60_000)]
    keep = blocks[::16]
    full = rss_kb()
    del blocks
    freed = rss_kb()
    msgs = after_startup(S())
    print(json.dumps({"full": full, "freed": freed, "trimmed": rss_kb(), "msgs": msgs}))
""")


def test_after_startup_returns_the_free_c_heap_in_a_child_process() -> None:
    out = subprocess.run([sys.executable, "-c", _TRIM_CHILD], capture_output=True, text=True,
                         timeout=60, check=True)
    res = json.loads(out.stdout)
    if not any("malloc_trim" in m for m in res["msgs"]):
        pytest.skip("no glibc malloc_trim here")
    assert res["freed"] - res["trimmed"] > 30_000, res  # most of the 60 MB goes back to the kernel


@pytest.fixture
def _restore_policy() -> Iterator[None]:
    old = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(old)


@pytest.mark.usefixtures("_restore_policy")
def test_uvloop_policy_installed_when_enabled() -> None:
    import uvloop

    assert install_event_loop_policy_if(True) is True
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


@pytest.mark.usefixtures("_restore_policy")
def test_uvloop_not_installed_when_disabled() -> None:
    before = asyncio.get_event_loop_policy()
    assert install_event_loop_policy_if(False) is False
    assert asyncio.get_event_loop_policy() is before


@pytest.mark.usefixtures("_restore_policy")
def test_uvloop_missing_degrades(monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import now raises ImportError
    before = asyncio.get_event_loop_policy()
    assert install_event_loop_policy_if(True) is False
    assert asyncio.get_event_loop_policy() is before
    assert any("not installed" in r.getMessage() for r in caplog.records)


async def test_daemon_runs_its_after_start_up_step_once_after_the_first_tick() -> None:
    config = await asyncio.to_thread(parse_config, '[daemon]\nnode = "t"\ntick_ms = 5\n')
    daemon = await Daemon.async_create(config)
    ticks: list[float] = []
    daemon.on_tick(ticks.append)
    calls: list[int] = []  # ticks seen when the step ran
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.async_run(stop, started=lambda: calls.append(len(ticks))))
    try:
        await until(lambda: len(ticks) >= 5, what="5 ticks")
    finally:
        stop.set()
        await run
    assert len(calls) == 1 and calls[0] >= 1, calls
