"""Who may claim what on the lease socket, by the peer's uid and gid.

The kernel tells a Unix-socket server who is on the other end (`SO_PEERCRED`: pid, uid, gid of
the process that connected); the client cannot lie about it. `[leases] rules` map those to the
priorities, modes and caps the peer may use, the way power-profiles-daemon asks polkit before a
profile switch. The first rule that matches a peer decides; a claim outside its rule is refused
with error `not_permitted` and the reason.

Default map (no `rules` configured): uid 0 may claim every priority and mode; everyone else
`normal` and `power_saver`, both modes. So an unprivileged process that can open the socket can
no longer claim `safety` (a safety sleep lease denies normal wakes and outranks operator holds).

User and group names in rules are resolved once, at start, off the event loop (NSS lookups may
block); an unknown name fails the start with a clear error.

Groups: SO_PEERCRED reports one gid (the peer's effective gid), not its supplementary groups,
so `gid`/`group` match that gid only.
"""

from __future__ import annotations

import asyncio
import grp
import pwd
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import LeaseRuleConfig


@dataclass(frozen=True, slots=True)
class Peer:
    """Credentials of a socket peer; None where the platform cannot tell."""

    pid: int | None
    uid: int | None
    gid: int | None

    def describe(self) -> str:
        return f"uid {self.uid} gid {self.gid}" if self.uid is not None else "an unidentified peer"


UNKNOWN_PEER = Peer(None, None, None)
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_of(sock: socket.socket | None) -> Peer:
    """SO_PEERCRED of a connected Unix socket (Linux); UNKNOWN_PEER elsewhere."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if sock is None or opt is None:
        return UNKNOWN_PEER
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size)
    except OSError:
        return UNKNOWN_PEER
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule with its names resolved to ids."""

    uid: int | None
    gid: int | None
    priorities: frozenset[str]
    modes: frozenset[str]
    max_duration_s: float | None
    max_energy_wh: float | None
    next_wake: bool
    label: str

    def matches(self, peer: Peer) -> bool:
        if self.uid is not None and peer.uid != self.uid:
            return False
        return self.gid is None or peer.gid == self.gid


ALL_PRIORITIES = frozenset({"safety", "normal", "power_saver"})
ALL_MODES = frozenset({"awake", "sleep"})

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(0, None, ALL_PRIORITIES, ALL_MODES, None, None, True, "default rule for uid 0"),
    Rule(None, None, frozenset({"normal", "power_saver"}), ALL_MODES, None, None, True, "default rule"),
)


class AccessError(ValueError):
    """A claim outside the peer's rule; the message says what and why."""


class AccessPolicy:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def rule_for(self, peer: Peer) -> Rule | None:
        return next((r for r in self.rules if r.matches(peer)), None)

    def check(self, peer: Peer, *, priority: str, mode: str, max_duration_s: float | None,
              max_energy_wh: float | None) -> Rule:
        """The peer's rule, if it permits this claim; AccessError otherwise."""
        rule = self._rule(peer)
        if priority not in rule.priorities:
            raise AccessError(f"{peer.describe()} may not claim priority {priority} "
                              f"(allowed: {', '.join(sorted(rule.priorities)) or 'none'}; {rule.label})")
        if mode not in rule.modes:
            raise AccessError(f"{peer.describe()} may not claim mode {mode} "
                              f"(allowed: {', '.join(sorted(rule.modes)) or 'none'}; {rule.label})")
        if rule.max_duration_s is not None and max_duration_s is not None and max_duration_s > rule.max_duration_s:
            raise AccessError(f"{peer.describe()} may ask for max_duration_s up to {rule.max_duration_s:g} "
                              f"({rule.label})")
        if rule.max_energy_wh is not None and max_energy_wh is not None and max_energy_wh > rule.max_energy_wh:
            raise AccessError(f"{peer.describe()} may ask for max_energy_wh up to {rule.max_energy_wh:g} "
                              f"({rule.label})")
        return rule

    def check_next_wake(self, peer: Peer) -> None:
        rule = self._rule(peer)
        if not rule.next_wake:
            raise AccessError(f"{peer.describe()} may not request a next wake ({rule.label})")

    def _rule(self, peer: Peer) -> Rule:
        rule = self.rule_for(peer)
        if rule is None:
            raise AccessError(f"no [leases] rule admits {peer.describe()}")
        return rule


def _resolve(rules: Sequence[LeaseRuleConfig]) -> list[Rule]:
    """Blocking: user and group names through NSS."""
    out = []
    for i, r in enumerate(rules):
        uid, gid = r.uid, r.gid
        if r.user is not None:
            try:
                uid = pwd.getpwnam(r.user).pw_uid
            except KeyError:
                raise ValueError(f"[leases] rules[{i}]: no user {r.user!r}") from None
        if r.group is not None:
            try:
                gid = grp.getgrnam(r.group).gr_gid
            except KeyError:
                raise ValueError(f"[leases] rules[{i}]: no group {r.group!r}") from None
        who = " ".join(x for x in (f"uid {uid}" if uid is not None else "", f"gid {gid}" if gid is not None else "")
                       if x) or "everyone"
        out.append(Rule(uid, gid, frozenset(r.priorities), frozenset(r.modes), r.max_duration_s, r.max_energy_wh,
                        r.next_wake, f"rule {i} ({who})"))
    return out


async def async_access_policy(rules: Sequence[LeaseRuleConfig] | None) -> AccessPolicy:
    """The policy of `[leases] rules` (None: DEFAULT_RULES); names resolved off the loop."""
    if rules is None:
        return AccessPolicy(DEFAULT_RULES)
    if not any(r.user or r.group for r in rules):
        return AccessPolicy(_resolve(rules))
    return AccessPolicy(await asyncio.to_thread(_resolve, rules))
