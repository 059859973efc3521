"""Operator commands: schema, dedupe, rate limit, hold bounds."""

from __future__ import annotations

import json

from cerebellumd.daemon.control import CommandProcessor, HoldStore
from cerebellumd.policies.types import HoldMode


def cmd(i: int, owner: str = "op", command: str = "hold", **extra: object) -> str:
    return json.dumps({"command": command, "owner": owner, "id": f"c{i}", **extra})


def test_hold_wake_sleep_release() -> None:
    proc = CommandProcessor(HoldStore())
    assert proc.handle_payload(cmd(1, ttl_s=10), now=0.0).ok
    assert proc.handle_payload(cmd(2, command="sleep", owner="saver"), now=0.0).ok
    modes = sorted(h.mode.value for h in proc.holds.active(1.0))
    assert modes == [HoldMode.AWAKE.value, HoldMode.SLEEP.value]
    assert [h.owner for h in proc.holds.active(11.0)] == ["saver"]  # the hold expired at 10 s
    assert proc.handle_payload(cmd(3, command="release", owner="saver"), now=12.0).ok
    assert proc.holds.active(12.0) == ()


def test_bad_payloads_are_rejected_with_a_reason() -> None:
    proc = CommandProcessor(HoldStore())
    for payload, needle in [
        (b"\xff\xfe", "UTF-8"), ("{", "not JSON"), ('{"command": "explode", "owner": "a", "id": "x"}', "command"),
        ('{"command": "hold", "owner": "a"}', "id"), ('{"command": "hold", "owner": "a b", "id": "x"}', "owner"),
        (json.dumps({"command": "hold", "owner": "a", "id": "x", "ttl_s": -1}), "ttl_s"),
        (b"x" * 5000, "larger"),
    ]:
        result = proc.handle_payload(payload, now=0.0)
        assert not result.ok and needle in (result.error or ""), (payload, result)


def test_duplicate_id_is_not_applied_twice() -> None:
    proc = CommandProcessor(HoldStore())
    first = proc.handle_payload(cmd(1), now=0.0)
    again = proc.handle_payload(cmd(1), now=1.0)
    assert first.ok and again.ok and again.duplicate
    assert len(proc.holds.active(1.0)) == 1


def test_rate_limit() -> None:
    proc = CommandProcessor(HoldStore(), rate_per_minute=3)
    results = [proc.handle_payload(cmd(i, owner=f"o{i}"), now=float(i)) for i in range(5)]
    assert [r.ok for r in results] == [True, True, True, False, False]
    assert "rate limit" in (results[3].error or "")
    assert proc.handle_payload(cmd(9, owner="late"), now=70.0).ok  # the window moved on


def test_an_owner_refreshes_its_hold_and_the_store_is_bounded() -> None:
    proc = CommandProcessor(HoldStore(max_total=5), rate_per_minute=1000)
    for i in range(4):
        assert proc.handle_payload(cmd(i, owner="same", ttl_s=100 + i), now=0.0).ok
    [hold] = proc.holds.active(0.0)
    assert hold.expires_at == 103.0  # the latest command refreshed the one hold
    for i in range(10, 14):
        assert proc.handle_payload(cmd(i, owner=f"o{i}", ttl_s=1000), now=0.0).ok
    assert len(proc.holds.active(0.0)) == 5
    refused = proc.handle_payload(cmd(20, owner="one_more"), now=0.0)
    assert not refused.ok and "too many holds" in (refused.error or "")
    # Expired holds free their places.
    assert proc.handle_payload(cmd(21, owner="later"), now=2000.0).ok


def test_priority_ranks_a_command_as_a_lease_and_its_absence_as_an_operator() -> None:
    from cerebellumd.daemon.control import is_lease_priority
    from cerebellumd.daemon.leases import HOLD_PRIORITY, LeasePriority

    proc = CommandProcessor(HoldStore(), rate_per_minute=1000)
    got = {}
    for i, (command, priority) in enumerate([
        ("hold", "safety"), ("sleep", "normal"), ("wake", "power_saver"), ("hold", None), ("sleep", None),
    ]):
        extra = {"priority": priority} if priority is not None else {}
        assert proc.handle_payload(cmd(i, owner=f"o{i}", command=command, **extra), now=0.0).ok
    for h in proc.holds.active(0.0):
        got[h.owner] = (h.mode, h.priority)
    assert got == {
        "o0": (HoldMode.AWAKE, HOLD_PRIORITY[LeasePriority.SAFETY]),
        "o1": (HoldMode.SLEEP, HOLD_PRIORITY[LeasePriority.NORMAL]),
        "o2": (HoldMode.AWAKE, HOLD_PRIORITY[LeasePriority.POWER_SAVER]),
        "o3": (HoldMode.AWAKE, 2),  # operator holds sit below every lease, as before
        "o4": (HoldMode.SLEEP, 1),
    }
    assert [is_lease_priority(p) for _, p in (got["o2"], got["o3"])] == [True, False]
    bad = proc.handle_payload(cmd(9, priority="urgent"), now=0.0)
    assert not bad.ok and "priority" in (bad.error or "")
