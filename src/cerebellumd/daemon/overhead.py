"""The daemon's own cost, exported beside what it manages: CPU seconds, resident memory and how
long a Prometheus scrape takes. A power manager that burns a core to save a watt is a bad deal.

Collected at scrape time on prometheus-client's server thread (never on the event loop):
`getrusage` is a syscall, RSS is one small read of /proc/self/statm. The scrape duration is the
time the previous scrape took to collect and render every metric (the registry's `collect`
generator timed from its first item to its exhaustion): a scrape cannot time itself.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from .runtime import Daemon

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def rss_bytes() -> int:
    """Resident set size now (/proc); the peak from getrusage where /proc is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OverheadCollector:
    """A prometheus-client collector; `timed(registry)` wraps the registry's collect."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_scrape_s: float | None = None
        self.scrapes = 0

    def describe(self) -> Iterator[Metric]:
        # Without it the registry would call collect() on the event loop at register time.
        yield CounterMetricFamily("cerebellumd_process_cpu_seconds", "CPU time used by the daemon process.",
                                  labels=["mode"])
        yield GaugeMetricFamily("cerebellumd_rss_bytes", "Resident memory of the daemon process.")
        yield GaugeMetricFamily("cerebellumd_scrape_duration_seconds",
                                "Time the previous scrape took to collect and render the metrics.")

    def collect(self) -> Iterator[Metric]:
        user, system = cpu_seconds()
        cpu = CounterMetricFamily("cerebellumd_process_cpu_seconds", "CPU time used by the daemon process.",
                                  labels=["mode"])
        cpu.add_metric(["user"], user)
        cpu.add_metric(["system"], system)
        yield cpu
        yield GaugeMetricFamily("cerebellumd_rss_bytes", "Resident memory of the daemon process.", value=rss_bytes())
        with self._lock:
            last = self.last_scrape_s
        yield GaugeMetricFamily("cerebellumd_scrape_duration_seconds",
                                "Time the previous scrape took to collect and render the metrics.",
                                value=last if last is not None else 0.0)

    def timed(self, registry: CollectorRegistry) -> None:
        inner: Callable[[], Iterable[Metric]] = registry.collect

        def collect() -> Iterator[Metric]:
            started = time.perf_counter()
            yield from inner()
            with self._lock:
                self.last_scrape_s = time.perf_counter() - started
                self.scrapes += 1

        registry.collect = collect  # type: ignore[method-assign]


def attach_overhead(daemon: Daemon) -> OverheadCollector:
    """Called from Daemon._attach_services."""
    collector = OverheadCollector()
    daemon.metrics.register(collector)
    collector.timed(daemon.metrics.registry)
    return collector
