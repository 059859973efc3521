"""The daemon's own cost, exported beside what it manages: CPU seconds, resident memory and how
long a Prometheus scrape takes. A power manager that burns a core to save a watt is a bad deal.

Collected at scrape time on prometheus-client's server thread (never on the event loop):
`getrusage` is a syscall, RSS is one small read of /proc/self/statm. The scrape duration is the
time the previous scrape took to collect every metric (`ScrapeTimer`, the collector the HTTP
server exposes, times the registry's collection): a scrape cannot time itself.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

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


class ScrapeTimer:
    """What the HTTP server exposes: the registry, timed, followed by the daemon's own cost.
    prometheus-client's server accepts any Collector; this one yields the registry's metrics,
    records how long their collection took (from the first metric to the last) for the next
    scrape to report, then the overhead metrics. Those are read only here, on the server's
    thread: a syscall and a /proc read have no place on the event loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self.last_scrape_s: float | None = None
        self.scrapes = 0

    def collect(self) -> Iterator[Metric]:
        previous = self.last()
        started = time.perf_counter()
        yield from self._registry.collect()
        with self._lock:
            self.last_scrape_s = time.perf_counter() - started
            self.scrapes += 1
        yield from overhead_metrics(previous)

    def restricted_registry(self, names: Iterable[str]) -> Any:
        """`?name[]=` scrapes: the registry's own restriction (not timed)."""
        return self._registry.restricted_registry(names)

    def last(self) -> float | None:
        with self._lock:
            return self.last_scrape_s


def overhead_metrics(previous_scrape_s: float | None) -> Iterator[Metric]:
    """The daemon's own cost: CPU seconds, resident memory, and the previous scrape's duration."""
    user, system = cpu_seconds()
    cpu = CounterMetricFamily("cerebellumd_process_cpu_seconds", "CPU time used by the daemon process.",
                              labels=["mode"])
    cpu.add_metric(["user"], user)
    cpu.add_metric(["system"], system)
    yield cpu
    yield GaugeMetricFamily("cerebellumd_rss_bytes", "Resident memory of the daemon process.", value=rss_bytes())
    yield GaugeMetricFamily("cerebellumd_scrape_duration_seconds",
                            "Time the previous scrape took to collect and render the metrics.",
                            value=previous_scrape_s if previous_scrape_s is not None else 0.0)
