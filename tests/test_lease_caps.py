"""Garage-mode leases over a real Unix socket: hard caps (time, energy, 12 V budget) ended by the
daemon whatever the client does, who may claim what by SO_PEERCRED, and next-wake requests.

The energy and budget sources are plain callables (what the assembly passes); the peers are
real: this process (root here) and a separate process running as `nobody`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cerebellumd.config import LeaseConfig, LeaseRuleConfig, parse_config
from cerebellumd.daemon.lease_access import DEFAULT_RULES, Peer, async_access_policy
from cerebellumd.daemon.leases import LeaseServer, LeaseServerError

from .test_leases import Client, Clock

WAIT_S = 10.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cbl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Meter:
    """The accelerator's cumulative joules and the 12 V budget, as the assembly would pass them."""

    def __init__(self) -> None:
        self.joules = 5000.0
        self.budget: float | None = None

    def energy_j(self) -> float:
        return self.joules

    def budget_wh(self) -> float | None:
        return self.budget


def config(sock_dir: Path, **kw: Any) -> LeaseConfig:
    return LeaseConfig(enabled=True, path=sock_dir / "l.sock", max_ttl_s=600, max_duration_s=1800, **kw)


@pytest.fixture
async def capped(sock_dir: Path) -> AsyncIterator[tuple[LeaseServer, Clock, Meter]]:
    clock, meter = Clock(), Meter()
    srv = LeaseServer(config(sock_dir, min_budget_wh=10), clock=clock, energy_j=meter.energy_j,
                      budget_wh=meter.budget_wh)
    async with srv:
        yield srv, clock, meter


async def test_an_awake_lease_without_a_cap_is_refused_with_the_reason(
        capped: tuple[LeaseServer, Clock, Meter]) -> None:
    srv, clock, _ = capped
    c = await Client.connect(srv.config.path)
    r = await c.send(op="acquire", app="upload", ttl_s=60)
    assert (r["ok"], r["error"]) == (False, "no_cap") and "max_duration_s" in r["detail"]
    r = await c.send(op="acquire", app="upload", ttl_s=60, max_duration_s=1801)
    assert r["error"] == "bad_cap"
    for bad in (0, -1, "60", True):
        assert (await c.send(op="acquire", app="upload", ttl_s=60, max_duration_s=bad))["error"] == "bad_cap"
    # A sleep lease keeps nothing awake: no cap needed by default.
    assert (await c.send(op="acquire", app="quiet", ttl_s=60, mode="sleep"))["ok"]
    assert srv.errors == {"no_cap": 1, "bad_cap": 5}
    assert [h.owner for h in srv.holds(clock.t)] == ["app:quiet"]
    await c.close()


async def test_the_duration_cap_ends_the_lease_on_the_daemons_clock_renewed_or_not(sock_dir: Path) -> None:
    # The real monotonic clock: nothing but the server's own timer ends the lease.
    async with LeaseServer(config(sock_dir)) as srv:
        c = await Client.connect(srv.config.path)
        t0 = time.monotonic()
        r = await c.send(op="acquire", app="model_update", ttl_s=30, max_duration_s=0.4)
        assert r["ok"] and r["ends_in_s"] == 0.4 and r["expires_in_s"] == 0.4
        (hold,) = srv.holds(time.monotonic())
        assert hold.expires_at == pytest.approx(t0 + 0.4, abs=0.05)  # the policy drops it at the cap
        renewed = await c.send(op="renew", id=r["id"], ttl_s=60)
        assert renewed["ok"] and renewed["expires_in_s"] <= 0.4  # a renew never moves the cap
        event = await c.next_event()  # no request in between: the timer did it
        elapsed = time.monotonic() - t0
        assert (event["event"], event["id"], event["reason"]) == ("ended", r["id"], "duration_cap")
        assert 0.4 <= elapsed < 0.4 + 2.0
        assert srv.leases(time.monotonic()) == () and srv.ended == {"duration_cap": 1}
        assert (await c.send(op="renew", id=r["id"]))["error"] == "unknown_id"
        await c.close()


async def test_ttl_expiry_before_the_cap_is_reported_as_expired(capped: tuple[LeaseServer, Clock, Meter]) -> None:
    srv, clock, _ = capped
    c = await Client.connect(srv.config.path)
    r = await c.send(op="acquire", app="a", ttl_s=5, max_duration_s=100)
    clock.t += 50  # past both; the ttl came first
    srv.enforce(clock.t)
    event = await c.next_event()
    assert (event["id"], event["reason"]) == (r["id"], "expired")
    assert srv.ended == {"expired": 1}
    await c.close()


async def test_the_energy_cap_ends_the_lease(capped: tuple[LeaseServer, Clock, Meter]) -> None:
    srv, clock, meter = capped
    c = await Client.connect(srv.config.path)
    r = await c.send(op="acquire", app="calibration", ttl_s=600, max_duration_s=900, max_energy_wh=2)
    assert r["ok"] and r["max_energy_wh"] == 2
    meter.joules += 3600 * 1.5  # 1.5 Wh into the accelerator
    srv.enforce(clock.t)
    (status,) = (await c.send(op="status"))["leases"]
    assert status["energy_wh"] == pytest.approx(1.5) and status["ends_in_s"] == 900
    meter.joules += 3600 * 0.5
    srv.enforce(clock.t)  # what the daemon's tick does
    event = await c.next_event()
    assert (event["id"], event["reason"]) == (r["id"], "energy_cap") and "2 Wh" in event["detail"]
    assert srv.holds(clock.t) == () and srv.ended == {"energy_cap": 1}
    await c.close()


async def test_grants_only_while_the_budget_allows_and_ends_when_it_runs_out(
        capped: tuple[LeaseServer, Clock, Meter]) -> None:
    srv, clock, meter = capped
    c = await Client.connect(srv.config.path)
    # No budget known (no budget part): granted.
    assert (await c.send(op="acquire", app="a", ttl_s=60, max_duration_s=60))["ok"]
    meter.budget = 9.0  # below [leases] min_budget_wh = 10: the held awake lease ends
    srv.enforce(clock.t)
    assert (await c.next_event())["reason"] == "budget"
    r = await c.send(op="acquire", app="a", ttl_s=60, max_duration_s=60)
    assert (r["ok"], r["error"]) == (False, "budget") and "9 Wh" in r["detail"]
    # A sleep lease spends nothing: granted whatever the budget.
    assert (await c.send(op="acquire", app="quiet", ttl_s=60, mode="sleep"))["ok"]
    meter.budget = 30.0
    r = await c.send(op="acquire", app="big_job", ttl_s=60, max_duration_s=60, min_budget_wh=40)
    assert r["error"] == "budget"  # its own floor is higher than the config's
    r = await c.send(op="acquire", app="small_job", ttl_s=60, max_duration_s=60, min_budget_wh=25)
    assert r["ok"]
    meter.budget = 24.0
    srv.enforce(clock.t)
    event = await c.next_event()
    assert (event["id"], event["reason"]) == (r["id"], "budget")
    assert srv.ended == {"budget": 2} and srv.errors == {"budget": 2}
    await c.close()


async def test_energy_cap_without_an_energy_source_is_refused(sock_dir: Path) -> None:
    async with LeaseServer(config(sock_dir)) as srv:
        c = await Client.connect(srv.config.path)
        r = await c.send(op="acquire", app="a", ttl_s=60, max_duration_s=60, max_energy_wh=1)
        assert r["error"] == "bad_cap" and "measures no" in r["detail"]
        await c.close()


# -- who may ask for what ----------------------------------------------------------------------------


async def test_a_rule_excluding_uid_0_refuses_this_process(sock_dir: Path) -> None:
    rules = [LeaseRuleConfig(uid=12345, priorities=["safety", "normal", "power_saver"])]
    async with LeaseServer(config(sock_dir, rules=rules)) as srv:
        c = await Client.connect(srv.config.path)
        r = await c.send(op="acquire", app="a", ttl_s=60, max_duration_s=60)
        assert (r["ok"], r["error"]) == (False, "not_permitted")
        assert f"uid {os.getuid()}" in r["detail"] and "no [leases] rule" in r["detail"]
        assert srv.errors == {"not_permitted": 1} and srv.holds(time.monotonic()) == ()
        await c.close()


async def test_a_rule_including_uid_0_grants_within_its_limits(sock_dir: Path) -> None:
    rules = [LeaseRuleConfig(user="root", priorities=["normal"], modes=["awake"], max_duration_s=300,
                             max_energy_wh=5)]
    meter = Meter()
    async with LeaseServer(config(sock_dir, rules=rules), energy_j=meter.energy_j) as srv:
        c = await Client.connect(srv.config.path)
        r = await c.send(op="acquire", app="a", ttl_s=60, max_duration_s=300)
        assert r["ok"] and r["max_energy_wh"] == 5  # the rule's energy cap applies by default
        refused = {
            "priority safety": dict(priority="safety", max_duration_s=60),
            "mode sleep": dict(mode="sleep", max_duration_s=60),
            "max_duration_s up to 300": dict(max_duration_s=301),
            "max_energy_wh up to 5": dict(max_duration_s=60, max_energy_wh=6),
        }
        for why, extra in refused.items():
            reply = await c.send(op="acquire", app="b", ttl_s=60, **extra)
            assert reply["error"] == "not_permitted" and why in reply["detail"], (why, reply)
        assert srv.errors == {"not_permitted": 4}
        await c.close()


async def test_default_map_root_may_claim_safety(sock_dir: Path) -> None:
    async with LeaseServer(config(sock_dir)) as srv:
        c = await Client.connect(srv.config.path)
        assert (await c.send(op="acquire", app="guard", ttl_s=60, max_duration_s=60, priority="safety"))["ok"]
        await c.close()
    policy = await async_access_policy(None)
    assert policy.rules == DEFAULT_RULES
    assert policy.rule_for(Peer(1, 1000, 1000)) is DEFAULT_RULES[1]


async def test_unknown_user_name_fails_the_start(sock_dir: Path) -> None:
    rules = [LeaseRuleConfig(user="no-such-user-cbl")]
    with pytest.raises(LeaseServerError, match="no user 'no-such-user-cbl'"):
        await LeaseServer(config(sock_dir, rules=rules)).start()


NOBODY_CLIENT = textwrap.dedent(
    """
    import json, os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    out = {"uid": os.getuid()}
    for name, priority in (("safety", "safety"), ("normal", "normal")):
        req = {"op": "acquire", "app": "n", "ttl_s": 60, "max_duration_s": 60, "priority": priority}
        f.write(json.dumps(req).encode() + b"\\n"); f.flush()
        out[name] = json.loads(f.readline())
    print(json.dumps(out), flush=True)
    """
)
SYSTEM_PYTHON = Path("/usr/bin/python3")  # readable by nobody (the test's interpreter may not be)


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(),
                    reason="needs root (to run a client as nobody) and /usr/bin/python3")
async def test_a_real_process_running_as_nobody_may_not_claim_safety(sock_dir: Path) -> None:
    await asyncio.to_thread(os.chmod, sock_dir, 0o755)
    async with LeaseServer(config(sock_dir, socket_mode=0o666)) as srv:
        proc = await asyncio.create_subprocess_exec(
            str(SYSTEM_PYTHON), "-c", NOBODY_CLIENT, str(srv.config.path), user=65534, group=65534,
            extra_groups=[], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/")
        async with asyncio.timeout(WAIT_S):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        result = json.loads(out)
        assert result["uid"] == 65534
        assert result["safety"]["error"] == "not_permitted"
        assert "uid 65534 gid 65534 may not claim priority safety" in result["safety"]["detail"]
        assert result["normal"]["ok"]
        assert srv.errors == {"not_permitted": 1}
        # The process exited: its normal lease went with its connection.
        await _until(srv, lambda: srv.ended.get("disconnect") == 1)


# -- next wake ----------------------------------------------------------------------------------------


class WakeLink:
    def __init__(self) -> None:
        self.sent: list[float | None] = []
        self.fail = False

    async def __call__(self, when: float | None) -> None:
        if self.fail:
            raise RuntimeError("MCU did not acknowledge NEXT_WAKE")
        self.sent.append(when)


async def test_wake_requests_hand_the_earliest_time_to_the_mcu(sock_dir: Path) -> None:
    wall = [datetime(2024, 3, 14, 22, 30).timestamp()]
    link = WakeLink()
    async with LeaseServer(config(sock_dir), wake_at=link, wall=lambda: wall[0]) as srv:
        c = await Client.connect(srv.config.path)
        r = await c.send(op="wake_at", app="model_update", at="03:00")
        assert r["ok"] and r["wake_in_s"] == 4.5 * 3600 and r["earliest_in_s"] == 4.5 * 3600
        assert link.sent == [datetime(2024, 3, 15, 3, 0).timestamp()]
        r = await c.send(op="wake_at", app="log_upload", in_s=3600)
        assert r["earliest_in_s"] == 3600 and link.sent[-1] == wall[0] + 3600
        r = await c.send(op="wake_at", app="later", in_s=7200)  # not the earliest: nothing new to send
        assert r["earliest_in_s"] == 3600 and len(link.sent) == 2
        r = await c.send(op="wake_cancel", app="log_upload")
        assert r["earliest_in_s"] == 7200 and link.sent[-1] == wall[0] + 7200
        assert srv.snapshot(0.0)["next_wake_in_s"] == 7200
        # The wake request outlives the connection (the gateway may power down in between).
        await c.close()
        c = await Client.connect(srv.config.path)
        wall[0] += 7300  # "later" has passed: the earliest is now model_update's 03:00
        assert (await c.send(op="wake_cancel", app="nothing"))["earliest_in_s"] == pytest.approx(
            datetime(2024, 3, 15, 3, 0).timestamp() - wall[0])
        link.fail = True
        r = await c.send(op="wake_at", app="x", in_s=60)
        assert r["error"] == "wake_failed" and "NEXT_WAKE" in r["detail"]
        link.fail = False
        assert srv.snapshot(0.0)["next_wake_in_s"] > 60  # the failed request was not kept
        for bad in ({"in_s": 0}, {"in_s": 8 * 86400}, {"at": "24:00"}, {"at": 300}, {"in_s": 5, "at": "03:00"}, {}):
            assert (await c.send(op="wake_at", app="x", **bad))["error"] == "bad_field", bad
        await c.close()


async def test_wake_request_without_an_mcu_link_or_permission_is_refused(sock_dir: Path) -> None:
    async with LeaseServer(config(sock_dir)) as srv:
        c = await Client.connect(srv.config.path)
        r = await c.send(op="wake_at", app="x", in_s=60)
        assert r["error"] == "no_wake_link" and "[mcu]" in r["detail"]
        await c.close()
    rules = [LeaseRuleConfig(uid=os.getuid(), next_wake=False)]
    async with LeaseServer(config(sock_dir, rules=rules), wake_at=WakeLink()) as srv:
        c = await Client.connect(srv.config.path)
        assert (await c.send(op="wake_at", app="x", in_s=60))["error"] == "not_permitted"
        await c.close()


async def test_rules_in_toml_are_validated() -> None:
    text = '[leases]\nenabled = true\n[[leases.rules]]\nuser = "root"\nuid = 0\n'
    with pytest.raises(Exception, match="uid or user"):
        await asyncio.to_thread(parse_config, text)
    text = '[leases]\n[[leases.rules]]\ngroup = "adm"\npriorities = ["safety"]\nmax_energy_wh = 20\n'
    cfg = await asyncio.to_thread(parse_config, text)
    assert cfg.leases.rules is not None and cfg.leases.rules[0].priorities == ["safety"]
    with pytest.raises(Exception, match=r"leases.rules\[0\].priorities\[0\]: Input should be .safety"):
        await asyncio.to_thread(parse_config, '[leases]\n[[leases.rules]]\npriorities = ["urgent"]\n')


async def _until(srv: LeaseServer, predicate: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        await srv.wait_until(predicate)


def test_a_capped_command_without_the_lease_part_is_refused() -> None:
    from cerebellumd.daemon.control import CommandProcessor, HoldStore

    processor = CommandProcessor(HoldStore())
    result = processor.handle_payload(json.dumps(
        {"command": "hold", "owner": "tool", "id": "c1", "max_duration_s": 60}), 0.0)
    assert not result.ok and "need [leases] enabled" in (result.error or "")
    assert processor.holds.active(0.0) == ()  # and no uncapped hold instead
    bad = processor.handle_payload(json.dumps(
        {"command": "hold", "owner": "tool", "id": "c2", "max_energy_wh": -1}), 0.0)
    assert not bad.ok and "max_energy_wh" in (bad.error or "")
