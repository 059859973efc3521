"""Process-level real-time tuning for the daemon (config section ``[realtime]``).

Every setting degrades instead of failing: the daemon must still run unprivileged on a
developer laptop or in a container without CAP_SYS_NICE / CAP_IPC_LOCK. Each outcome is logged
and returned as a message so the caller can surface it (status page, startup banner).

Order matters and is the caller's job:
  1. ``install_event_loop_policy_if(cfg.uvloop)`` before the event loop is created;
  2. ``apply_realtime(cfg)`` early in start-up (affinity, SCHED_FIFO, mlockall);
  3. ``after_startup(cfg)`` once start-up allocations are done: collects, ``gc.freeze()`` if
     ``cfg.gc_freeze``, and hands the C heap's free pages back to the kernel (``trim_heap``);
     again after a reload, which replaces start-up objects.

Linux applies affinity and scheduling policy per thread (pid 0 = the calling thread); threads
and child processes inherit them when created. So ``apply_realtime`` must run on the loop's
thread before the ingest reader threads and the default executor exist, and anything the
daemon spawns that should not be real-time must lower its own policy.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import logging
import os
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "RealtimeSettings",
    "RealtimeSyscalls",
    "after_startup",
    "apply_realtime",
    "freeze_gc_after_startup",
    "install_event_loop_policy_if",
    "trim_heap",
]

logger = logging.getLogger(__name__)

# <sys/mman.h> on Linux (all architectures we ship for).
MCL_CURRENT = 1
MCL_FUTURE = 2


class RealtimeSettings(Protocol):
    """The fields of ``cerebellumd.config.RealtimeConfig`` this module reads."""

    @property
    def uvloop(self) -> bool: ...
    @property
    def cpu_affinity(self) -> list[int]: ...
    @property
    def sched_fifo_priority(self) -> int: ...
    @property
    def mlockall(self) -> bool: ...
    @property
    def gc_freeze(self) -> bool: ...


class RealtimeSyscalls:
    """The OS calls, behind a seam so tests can simulate EPERM or a platform without them.

    Methods raise ``NotImplementedError`` where the platform lacks the call and ``OSError``
    where the kernel refuses it.
    """

    def set_affinity(self, cpus: Sequence[int]) -> None:
        setter = getattr(os, "sched_setaffinity", None)
        if setter is None:
            raise NotImplementedError("os.sched_setaffinity")
        setter(0, cpus)

    def set_fifo(self, priority: int) -> None:
        setter = getattr(os, "sched_setscheduler", None)
        policy = getattr(os, "SCHED_FIFO", None)
        if setter is None or policy is None:
            raise NotImplementedError("os.sched_setscheduler(SCHED_FIFO)")
        setter(0, policy, os.sched_param(priority))

    def mlockall(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.mlockall
        except (OSError, AttributeError) as exc:
            raise NotImplementedError("mlockall") from exc
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        if fn(MCL_CURRENT | MCL_FUTURE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def _degraded(what: str, exc: BaseException, hint: str) -> str:
    if isinstance(exc, NotImplementedError):
        msg = f"{what}: not supported on this platform ({exc}); continuing without it"
    elif isinstance(exc, PermissionError) or (
            isinstance(exc, OSError) and exc.errno == errno.EPERM):
        msg = f"{what}: permission denied (EPERM); {hint}; continuing without it"
    else:
        msg = f"{what}: failed ({exc}); continuing without it"
    logger.warning("%s", msg)
    return msg


def _applied(msg: str) -> str:
    logger.info("%s", msg)
    return msg


def apply_realtime(
    settings: RealtimeSettings, *, syscalls: RealtimeSyscalls | None = None
) -> list[str]:
    """Apply CPU affinity, SCHED_FIFO and mlockall as configured; never raises for OS refusals.

    ``uvloop`` and ``gc_freeze`` are read elsewhere because they belong to other moments of
    start-up (see the module docstring). Returns one message per attempted setting.
    """
    sc = syscalls or RealtimeSyscalls()
    messages: list[str] = []

    cpus = list(settings.cpu_affinity)
    if cpus:
        try:
            sc.set_affinity(cpus)
            messages.append(_applied(f"cpu_affinity: pinned to CPUs {cpus}"))
        except (OSError, ValueError, OverflowError, NotImplementedError) as exc:
            messages.append(_degraded(
                f"cpu_affinity {cpus}", exc, "cannot change this process's affinity"))

    prio = settings.sched_fifo_priority
    if prio > 0:
        try:
            sc.set_fifo(prio)
            messages.append(_applied(f"sched_fifo_priority: SCHED_FIFO priority {prio}"))
        except (OSError, ValueError, OverflowError, NotImplementedError) as exc:
            messages.append(_degraded(
                f"sched_fifo_priority {prio}", exc,
                "needs CAP_SYS_NICE or an RLIMIT_RTPRIO >= the priority"))

    if settings.mlockall:
        try:
            sc.mlockall()
            messages.append(_applied("mlockall: memory locked (MCL_CURRENT|MCL_FUTURE)"))
        except (OSError, ValueError, OverflowError, NotImplementedError) as exc:
            messages.append(_degraded(
                "mlockall", exc, "needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK"))

    return messages


def freeze_gc_after_startup() -> str:
    """Move every object allocated so far out of the GC's reach.

    Start-up objects (config, DBC, profiles, modules) live forever; freezing them means later
    collections scan only what the running daemon allocates, which shortens GC pauses inside
    the 10 ms loop.
    """
    gc.collect()  # collect start-up garbage first so it is not frozen forever
    gc.freeze()
    return _applied(f"gc_freeze: {gc.get_freeze_count()} start-up objects frozen")


def trim_heap() -> bool:
    """Return the free memory at the top and inside the C heap to the kernel: glibc's
    ``malloc_trim(0)``; False where the C library has none (musl, macOS).

    CPython has no API for it: objects it frees go back to its own allocator (pymalloc, which
    unmaps an arena only when it is completely empty) or to malloc, and glibc keeps freed heap
    memory mapped for reuse, trimming only a free top above M_TRIM_THRESHOLD. Start-up leaves
    some behind (import temporaries, pydantic building validators; most when modules are
    compiled from source), so the daemon calls this after start-up and after each reload
    (issue 13: RSS; measured in docs/PERFORMANCE.md).
    """
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    fn(0)
    return True


def after_startup(settings: RealtimeSettings) -> list[str]:
    """Once start-up (or a reload) is done: collect its garbage, freeze what is left if
    ``gc_freeze``, and return the freed C heap to the kernel. A reload first unfreezes, so the
    objects it replaced are collected rather than kept frozen forever."""
    messages: list[str] = []
    gc.unfreeze()
    if settings.gc_freeze:
        messages.append(freeze_gc_after_startup())
    else:
        gc.collect()
    if trim_heap():
        messages.append(_applied("malloc_trim: free C heap returned to the kernel"))
    return messages


def install_event_loop_policy_if(enabled: bool) -> bool:
    """Install uvloop's event loop policy if enabled and importable; True if installed.

    Must run before the event loop is created.
    """
    if not enabled:
        return False
    try:
        import uvloop  # optional dependency (extra "rt")
    except ImportError:
        logger.warning("uvloop: requested but not installed (pip install 'cerebellumd[rt]'); "
                       "using the default asyncio loop")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    logger.info("uvloop: event loop policy installed")
    return True
