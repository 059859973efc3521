"""The daemon's own overhead over a real HTTP scrape of an in-process daemon."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cerebellumd.config import Config, parse_config
from cerebellumd.daemon.runtime import Daemon


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def burn(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


async def test_cpu_rss_and_scrape_duration_are_exported() -> None:
    text = '[daemon]\nnode = "t"\n[prometheus]\nenabled = true\nport = 0\n'
    config: Config = await asyncio.to_thread(parse_config, text)
    daemon = await Daemon.async_create(config)
    await daemon.async_start()
    try:
        assert daemon.port is not None
        first = await asyncio.to_thread(scrape, daemon.port)
        await asyncio.to_thread(burn, 0.3)  # this process burns CPU: the counter must move
        second = await asyncio.to_thread(scrape, daemon.port)
    finally:
        await daemon.async_stop()
    def cpu(m: dict[str, float]) -> float:
        return sum(m[f"cerebellumd_process_cpu_seconds_total{{mode={mode}}}"] for mode in ("user", "system"))

    assert cpu(second) - cpu(first) >= 0.25
    assert second["cerebellumd_rss_bytes"] > 10_000_000  # a Python process with these imports
    assert first["cerebellumd_scrape_duration_seconds"] == 0.0  # nothing before the first scrape
    assert 0.0 < second["cerebellumd_scrape_duration_seconds"] < 1.0
