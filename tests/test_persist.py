"""The state file: atomic writes, resume of the energy counters, bad files reported and
replaced (never fatal), write failures counted. In-process daemons, real files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cerebellumd.config import Config, parse_config
from cerebellumd.config.state_file import SCHEMA_VERSION, StateFileError, Totals, read_totals, write_atomic
from cerebellumd.daemon.persist import Persistence
from cerebellumd.daemon.runtime import Daemon

from .helpers import until


def minimal_toml(state_file: Path | None, *, interval_s: float = 0.1, extra: str = "") -> str:
    """A daemon with no bus: the default domains (accelerator model, gateway 3.5 W, mcu 0.6 W)
    still integrate energy, which is all persistence needs."""
    state = f'state_file = "{state_file}"\npersist_interval_s = {interval_s}\n' if state_file else ""
    return (
        "[daemon]\nnode = \"test\"\ntick_ms = 10\ntelemetry_interval_ms = 50\n"
        'initial_state = "idle"\nsafe_state = "off"\n' + state
        + "[prometheus]\nenabled = false\nport = 0\n" + extra
    )


async def make_daemon(state_file: Path | None, **kwargs: object) -> Daemon:
    config: Config = await asyncio.to_thread(parse_config, minimal_toml(state_file, **kwargs))  # type: ignore[arg-type]
    return await Daemon.async_create(config)


def persistence(daemon: Daemon) -> Persistence:
    return next(s for s in daemon.parts if isinstance(s, Persistence))


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample from the collector that owns `name` only. registry.get_sample_value would run
    every collector, including ones meant for the scrape thread that read /proc (blocking,
    which blockbuster rightly refuses on the loop)."""
    collector = registry._names_to_collectors.get(name)  # type: ignore[attr-defined]
    if collector is None:
        return None
    for family in collector.collect():
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return None


def energy(daemon: Daemon, domain: str) -> float:
    value = sample(daemon.metrics.registry, "cerebellumd_domain_energy_joules_total", {"domain": domain})
    assert value is not None
    return value


def errors(daemon: Daemon, kind: str) -> float:
    return sample(daemon.metrics.registry, "cerebellumd_state_file_errors_total", {"kind": kind}) or 0.0


def good_state(**joules: float) -> str:
    return Totals(joules=dict(joules), wakes=3, sleeps=2, wakes_by_reason={"demand:collision": 3.0},
                  sleeps_by_state_reason={("sleep", "rest:sleep"): 2.0}).to_json("test")


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_totals_round_trip_and_strict_reader(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(good_state(gateway=12.5))
    totals = read_totals(path)
    assert totals is not None
    assert totals.joules == {"gateway": 12.5}
    assert totals.sleeps_by_state_reason == {("sleep", "rest:sleep"): 2.0}
    assert read_totals(tmp_path / "missing.json") is None
    for text, kind in [
        ('{"schema": 1, "joules": {"gateway": 1.0}, "wak', "corrupt"),  # cut mid-write
        ("\x00\x00\x00", "corrupt"),
        ('{"schema": 99, "joules": {}, "wakes": 0, "sleeps": 0}', "schema"),
        ('{"schema": 1, "joules": {"gateway": -1}, "wakes": 0, "sleeps": 0}', "corrupt"),
        ('{"schema": 1, "joules": {"gateway": true}, "wakes": 0, "sleeps": 0}', "corrupt"),
        ('{"schema": 1, "joules": {"gateway": 1e999}, "wakes": 0, "sleeps": 0}', "corrupt"),
        ('{"schema": 1, "joules": [], "wakes": 0, "sleeps": 0}', "corrupt"),
        ("[1, 2]", "corrupt"),
    ]:
        path.write_text(text)
        with pytest.raises(StateFileError) as info:
            read_totals(path)
        assert info.value.kind == kind, text
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(StateFileError):
        read_totals(path)


async def test_resume_continues_counters_and_stop_saves(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(good_state(gateway=1000.0, accelerator=50.0, gone=7.0))
    daemon = await make_daemon(path)
    await daemon.async_start()
    try:
        # The counters continue from the stored values instead of restarting at 0.
        assert energy(daemon, "gateway") >= 1000.0
        assert energy(daemon, "accelerator") >= 50.0
        assert daemon.wakes == 3 and daemon.sleeps == 2
        assert sample(daemon.metrics.registry, "cerebellumd_wakes_total", {"reason": "demand:collision"}) == 3.0
        writes_before = persistence(daemon).writes._value.get()
        await until(lambda: persistence(daemon).writes._value.get() >= writes_before + 2)  # the interval saves
        on_disk = await asyncio.to_thread(read_totals, path)
        assert on_disk is not None and on_disk.joules["gateway"] > 1000.0
        assert "gone" not in on_disk.joules  # an unconfigured domain is dropped, said so in the log
        await until(lambda: energy(daemon, "gateway") > 1000.0 + 3.5 * 0.3)
        before_stop = energy(daemon, "gateway")
    finally:
        await daemon.async_stop()
    after_stop = energy(daemon, "gateway")
    final = await asyncio.to_thread(read_totals, path)
    assert final is not None
    # Stop saves everything up to the stop; only the moments between the persistence service's
    # stop and the daemon's last integration (other services stopping) are not in the file.
    assert before_stop <= final.joules["gateway"] <= after_stop
    assert final.wakes_by_reason == {"demand:collision": 3.0}
    assert errors(daemon, "corrupt") == 0


@pytest.mark.parametrize("content", [b'{"schema": 1, "joules": {"gat', b"\x00" * 64, b'{"schema": 0}'])
async def test_corrupt_state_file_is_reported_and_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    daemon = await make_daemon(path)
    await daemon.async_start()
    try:
        assert errors(daemon, "corrupt") + errors(daemon, "schema") == 1
        assert energy(daemon, "gateway") < 1.0  # started from zero
        fresh = await asyncio.to_thread(read_totals, path)  # replaced at once by a good file
        assert fresh is not None
        aside = path.with_name("state.json.corrupt")
        assert (await asyncio.to_thread(aside.read_bytes)) == content  # kept for forensics
        decisions = daemon.decisions
        await until(lambda: daemon.decisions > decisions + 5)  # and the daemon runs
    finally:
        await daemon.async_stop()


async def test_write_failure_is_counted_not_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    daemon = await make_daemon(blocker / "state.json")  # the parent is a file: every write fails
    await daemon.async_start()
    try:
        await until(lambda: errors(daemon, "write") >= 2)
        decisions = daemon.decisions
        await until(lambda: daemon.decisions > decisions + 5)
    finally:
        await daemon.async_stop()
    assert errors(daemon, "write") >= 3  # the stop save failed too, counted


async def test_no_state_file_means_no_persistence_service(tmp_path: Path) -> None:
    daemon = await make_daemon(None)
    assert not any(isinstance(s, Persistence) for s in daemon.parts)
    assert list(tmp_path.iterdir()) == []


def test_state_file_format_is_versioned() -> None:
    body = json.loads(good_state(gateway=1.0))
    assert body["schema"] == SCHEMA_VERSION
    assert set(body) >= {"schema", "node", "saved_at", "joules", "wakes", "sleeps"}
