"""Run one external program with a deadline: the one subprocess runner of the drivers
(`accel_command`, `accel_jetson`).

- The child starts in a new session (`start_new_session=True`), so it leads its own process
  group and everything it starts (ssh, a shell's children) is in that group too.
- Past `timeout_s` the whole group gets SIGKILL (`os.killpg`), the child is awaited (reaped: no
  zombie) and `TimeoutError` is raised.
- If the awaiting task is cancelled the group is killed the same way and the child awaited
  before `CancelledError` propagates; the wait is shielded, so a second cancellation cannot
  leave the child unreaped (the event loop's child watcher still collects it).
- stdout and stderr are read concurrently until EOF (no pipe can fill and block the child) and
  kept bounded: the first `max_output` bytes of stdout (a status word comes first) and the last
  `max_output` bytes of stderr (an error message comes last); the rest is counted, not kept.

asyncio has the pieces (`create_subprocess_exec`, `asyncio.timeout`) but no group kill or
bounded capture, and `Process.communicate` keeps all output in memory: hence this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

#: Default bound on the bytes kept of each of stdout and stderr.
MAX_OUTPUT = 64 * 1024
_CHUNK = 16 * 1024


@dataclass(frozen=True, slots=True)
class Completed:
    """A child that exited by itself (any status)."""

    returncode: int
    stdout: bytes  # the first max_output bytes
    stderr: bytes  # the last max_output bytes
    stdout_dropped: int = 0  # bytes read but not kept
    stderr_dropped: int = 0

    def stderr_tail(self, limit: int) -> str:
        return self.stderr.decode(errors="replace").strip()[-limit:]


async def run(argv: Sequence[str], timeout_s: float, *, max_output: int = MAX_OUTPUT) -> Completed:
    """Run `argv` (no shell), stdin from /dev/null. OSError when it cannot start; TimeoutError
    (an OSError subclass: catch it first) after `timeout_s`, with the group killed and the child
    reaped; CancelledError likewise after a kill."""
    if not argv:
        raise ValueError("empty argv")
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: a kill reaches its children too
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout_s):
            (out, out_dropped), (err, err_dropped) = await asyncio.gather(
                _read_head(proc.stdout, max_output), _read_tail(proc.stderr, max_output))
            returncode = await proc.wait()
    except BaseException:  # TimeoutError, CancelledError, anything: never leave a child behind
        await _kill_and_reap(proc)
        raise
    return Completed(returncode, out, err, out_dropped, err_dropped)


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        # Shielded: cancelled again, the wait still completes and the loop reaps the child.
        await asyncio.shield(proc.wait())


async def _read_head(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, int]:
    kept = bytearray()
    dropped = 0
    while chunk := await stream.read(_CHUNK):
        room = limit - len(kept)
        kept += chunk[:room]
        dropped += max(0, len(chunk) - room)
    return bytes(kept), dropped


async def _read_tail(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, int]:
    kept = bytearray()
    dropped = 0
    while chunk := await stream.read(_CHUNK):
        kept += chunk
        if len(kept) > limit:
            dropped += len(kept) - limit
            del kept[: len(kept) - limit]
    return bytes(kept), dropped
