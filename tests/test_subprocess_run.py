"""drivers.subprocess_run with real children: a normal exit with bounded output, a timeout and a
cancellation that kill the whole process group and reap the child (no zombie, no live member
of the group left), and a program that cannot start."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from pathlib import Path

import pytest

from cerebellumd.drivers import subprocess_run

from .helpers import until

wait_until = functools.partial(until, timeout=5.0)

# A leader that starts a grandchild in its own process group, says both pids, and hangs.
HANG = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}\\n')\n"
    "time.sleep(600)\n"
)


def _state(pid: int) -> str | None:
    """The process state letter from /proc (Z = zombie), None when the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _live_members(pgid: int) -> list[int]:
    """Pids of the group that are not zombies (a zombie reparented to a non-reaping init is dead)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


async def _started(pidfile: Path) -> tuple[int, int]:
    """(leader, grandchild) pids once the leader has started its grandchild."""
    await wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"), what="grandchild started")
    leader, grandchild = pidfile.read_text().split()
    return int(leader), int(grandchild)


async def test_normal_exit_output_is_kept_bounded() -> None:
    code = ("import sys; sys.stdout.write('head ' + 'x' * 300000); sys.stdout.flush(); "
            "sys.stderr.write('y' * 300000 + ' the tail'); sys.exit(3)")
    done = await subprocess_run.run([sys.executable, "-c", code], 10, max_output=1000)
    assert done.returncode == 3
    assert done.stdout.startswith(b"head ") and len(done.stdout) == 1000
    assert done.stdout_dropped == 300005 - 1000
    assert done.stderr.endswith(b" the tail") and len(done.stderr) == 1000
    assert done.stderr_tail(8) == "the tail"
    ok = await subprocess_run.run([sys.executable, "-c", "print('active')"], 10)
    assert (ok.returncode, ok.stdout, ok.stderr, ok.stdout_dropped) == (0, b"active\n", b"", 0)


async def test_timeout_kills_the_group_and_reaps_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(subprocess_run.run([sys.executable, "-c", HANG, str(pidfile)], 1.0))
    leader, grandchild = await _started(pidfile)
    assert os.getpgid(grandchild) == leader != os.getpgid(0)  # a session and group of its own
    with pytest.raises(TimeoutError):
        await task
    assert loop.time() - started < 10
    assert _state(leader) is None  # killed and reaped before TimeoutError came out: no zombie
    await wait_until(lambda: not _live_members(leader), what="process group gone")
    assert _state(grandchild) in (None, "Z")


async def test_cancellation_kills_the_group_and_awaits_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    task = asyncio.create_task(subprocess_run.run([sys.executable, "-c", HANG, str(pidfile)], 30))
    leader, grandchild = await _started(pidfile)
    assert _state(leader) not in (None, "Z")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The child was awaited before CancelledError came out: no zombie of ours is left.
    assert _state(leader) is None
    with pytest.raises(ChildProcessError):
        os.waitpid(leader, os.WNOHANG)
    await wait_until(lambda: not _live_members(leader), what="process group gone")
    assert _state(grandchild) in (None, "Z")


async def test_a_program_that_cannot_start_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await subprocess_run.run([str(tmp_path / "missing")], 5)
    with pytest.raises(ValueError, match="empty argv"):
        await subprocess_run.run([], 5)
