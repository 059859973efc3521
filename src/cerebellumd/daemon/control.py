"""Operator control: holds and commands (`hold`, `release`, `wake`, `sleep`), schema-checked,
deduplicated by id, rate-limited. Shared by MQTT, the CLI and the lease server.

`late` and `served` are not holds: the consumer of a challenge (the perception stack, a HIL rig)
reports that the accelerator was ready `late_ms` after that challenge's real deadline, or that it
was served on time and allowed `allowed_ms` from its onset. The policy's self-calibrating
readiness learns from both (`Inputs.late_reports`, `Inputs.served_reports`,
policies/calibration.py).

A command with a cap (`max_duration_s`, `max_energy_wh`, `min_budget_wh`) is garage-mode work
from a remote tool: it becomes a lease of the lease part (the handler it registers with
`set_lease_handler`), capped and ended like a socket lease; without `[leases]` it is refused."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..policies.types import Hold, HoldMode
from .leases import HOLD_PRIORITY, LeasePriority
from .metrics import CONSUMER_REPORTS

DEFAULT_TTL_S = {"hold": 600.0, "wake": 30.0, "sleep": 300.0}
#: Operator holds (no `priority`): below every lease, so a manual command does not silently
#: undo a running app (the lease service's override grace handles that instead).
OPERATOR_PRIORITY = {HoldMode.SLEEP: 1, HoldMode.AWAKE: 2}


def hold_priority(mode: HoldMode, priority: LeasePriority | None) -> int:
    """`Hold.priority` of a command: a lease's (daemon/leases.HOLD_PRIORITY) when the command
    names a lease priority, else the operator priority."""
    return OPERATOR_PRIORITY[mode] if priority is None else HOLD_PRIORITY[priority]


def is_lease_priority(priority: int) -> bool:
    """A hold ranked as a lease (a remote tool's), not as an operator's manual command."""
    return priority >= min(HOLD_PRIORITY.values())
MAX_PAYLOAD_BYTES = 4096
#: What the core does with a report: (kind, seconds).
ReportHandler = Callable[[str, float], None]


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["hold", "release", "wake", "sleep", "late", "served"] = Field(
        ..., description="hold: keep awake; wake: awake now for ttl_s; sleep: keep resting "
        "(critical demands still win); release: drop the owner's holds; late: the latest wake came "
        "late_ms after its challenge's real deadline; served: it was on time, and the challenge "
        "allowed allowed_ms from its onset (the policy learns from both).")
    owner: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$", description="Who asks.")
    reason: str = Field("", max_length=200, description="Why (shown in state and decision reasons).")
    ttl_s: float | None = Field(None, gt=0, le=86400, description="Expiry in seconds.")
    id: str = Field(..., min_length=1, max_length=64, description="Command id, echoed in the response.")
    priority: LeasePriority | None = Field(
        None, description="safety | normal | power_saver: the hold ranks as a Unix-socket lease of "
        "that priority (a remote tool). Absent: an operator hold, below every lease.")
    max_duration_s: float | None = Field(
        None, gt=0, description="Hard cap (s): the command becomes a capped lease (priority normal unless given), "
                                "ended at the cap by the daemon.")
    max_energy_wh: float | None = Field(
        None, gt=0, description="Energy cap (Wh of the accelerator domain) of the capped lease.")
    min_budget_wh: float | None = Field(
        None, ge=0, description="Grant and keep the capped lease only while the 12 V budget is at least this (Wh).")
    late_ms: float | None = Field(
        None, gt=0, le=600_000, description="With command late: how long after its challenge's deadline the "
                                            "accelerator was ready (ms).")
    allowed_ms: float | None = Field(
        None, gt=0, le=600_000, description="With command served: how long the challenge served on time "
                                            "allowed from its onset to its real deadline (ms).")

    @model_validator(mode="after")
    def _report_fields_with_their_command_only(self) -> Command:
        for command, field in (("late", self.late_ms), ("served", self.allowed_ms)):
            if (self.command == command) != (field is not None):
                name = "late_ms" if command == "late" else "allowed_ms"
                raise ValueError(f"{name} goes with command {command}, and command {command} needs {name}")
        if self.command in CONSUMER_REPORTS and self.capped:
            raise ValueError(f"command {self.command} takes no cap")
        return self

    @property
    def capped(self) -> bool:
        return any(v is not None for v in (self.max_duration_s, self.max_energy_wh, self.min_budget_wh))


#: The lease part's handler of capped commands: None when applied, else the error text.
LeaseHandler = Callable[[Command, float], str | None]


@dataclass(frozen=True)
class CommandResult:
    id: str | None
    ok: bool
    error: str | None = None
    duplicate: bool = False
    holds: int = 0

    def to_json(self) -> str:
        body: dict[str, Any] = {"id": self.id, "ok": self.ok, "holds": self.holds}
        if self.error:
            body["error"] = self.error
        if self.duplicate:
            body["duplicate"] = True
        return json.dumps(body)


class HoldLimitError(ValueError):
    pass


class HoldStore:
    """Holds by id; expired ones drop out on every read. Bounded in total, so a chatty or
    hostile operator cannot grow it without limit (operator commands also replace their
    owner's previous hold of the same mode instead of adding one)."""

    def __init__(self, *, max_total: int = 256) -> None:
        self._holds: dict[str, Hold] = {}
        self.max_total = max_total

    def add(self, hold: Hold, now: float | None = None) -> None:
        if now is not None:
            self.active(now)
        if hold.id not in self._holds and len(self._holds) >= self.max_total:
            raise HoldLimitError(f"too many holds ({self.max_total})")
        self._holds[hold.id] = hold

    def remove_owner(self, owner: str) -> int:
        gone = [k for k, h in self._holds.items() if h.owner == owner]
        for k in gone:
            del self._holds[k]
        return len(gone)

    def remove(self, hold_id: str) -> bool:
        return self._holds.pop(hold_id, None) is not None

    def active(self, now: float) -> tuple[Hold, ...]:
        expired = [k for k, h in self._holds.items() if h.expires_at <= now]
        for k in expired:
            del self._holds[k]
        return tuple(self._holds.values())


class CommandProcessor:
    def __init__(
        self,
        holds: HoldStore,
        *,
        operators: frozenset[str] = frozenset(),
        rate_per_minute: int = 60,
        remember: int = 1024,
        report: ReportHandler | None = None,
    ) -> None:
        self.holds = holds
        self._report = report
        self.operators = operators
        self.rate_per_minute = rate_per_minute
        self._recent: collections.OrderedDict[str, CommandResult] = collections.OrderedDict()
        self._remember = remember
        self._times: collections.deque[float] = collections.deque()
        self._lease_handler: LeaseHandler | None = None

    def set_lease_handler(self, handler: LeaseHandler) -> Callable[[], None]:
        """The lease part takes capped commands (and `release`) while it runs; returns the undo."""
        self._lease_handler = handler

        def undo() -> None:
            if self._lease_handler is handler:
                self._lease_handler = None

        return undo

    def reconfigure(self, *, operators: frozenset[str], rate_per_minute: int) -> None:
        """A reloaded `[mqtt]`: who may command and how often (ids already seen stay remembered)."""
        self.operators = operators
        self.rate_per_minute = rate_per_minute

    def handle_payload(self, payload: bytes | str, now: float) -> CommandResult:
        """Parse, check and apply one command; never raises on bad input."""
        if isinstance(payload, bytes):
            if len(payload) > MAX_PAYLOAD_BYTES:
                return CommandResult(None, False, f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
            try:
                payload = payload.decode("utf-8")
            except UnicodeDecodeError:
                return CommandResult(None, False, "payload is not UTF-8")
        try:
            raw = json.loads(payload)
        except json.JSONDecodeError as exc:
            return CommandResult(None, False, f"not JSON: {exc.msg}")
        cmd_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        try:
            cmd = Command.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            return CommandResult(cmd_id, False, f"{where}: {first['msg']}")
        return self.apply(cmd, now)

    def apply(self, cmd: Command, now: float) -> CommandResult:
        seen = self._recent.get(cmd.id)
        if seen is not None:
            return CommandResult(cmd.id, seen.ok, seen.error, duplicate=True, holds=seen.holds)
        if self.operators and cmd.owner not in self.operators:
            return self._remember_result(CommandResult(cmd.id, False, f"owner {cmd.owner!r} is not an operator"))
        while self._times and now - self._times[0] > 60.0:
            self._times.popleft()
        if len(self._times) >= self.rate_per_minute:
            return CommandResult(cmd.id, False, "rate limit: too many commands in the last minute")
        self._times.append(now)
        if cmd.command in CONSUMER_REPORTS:  # reports on a challenge, not holds
            if self._report is None:
                return self._remember_result(CommandResult(cmd.id, False, "no policy takes reports here"))
            ms = cmd.late_ms if cmd.command == "late" else cmd.allowed_ms
            assert ms is not None
            self._report(cmd.command, ms / 1000)
        elif cmd.command == "release":
            self.holds.remove_owner(cmd.owner)
            if self._lease_handler is not None:
                self._lease_handler(cmd, now)  # and the owner's capped leases
        elif cmd.capped:
            if self._lease_handler is None:
                return self._remember_result(CommandResult(
                    cmd.id, False, "max_duration_s, max_energy_wh and min_budget_wh need [leases] enabled"))
            error = self._lease_handler(cmd, now)
            if error is not None:
                return self._remember_result(CommandResult(cmd.id, False, error))
        else:
            ttl = cmd.ttl_s if cmd.ttl_s is not None else DEFAULT_TTL_S[cmd.command]
            mode = HoldMode.SLEEP if cmd.command == "sleep" else HoldMode.AWAKE
            try:
                self.holds.add(Hold(
                    id=f"{cmd.owner}:{mode.value}", owner=cmd.owner, reason=cmd.reason or cmd.command,
                    mode=mode, expires_at=now + ttl, priority=hold_priority(mode, cmd.priority),
                ), now)
            except HoldLimitError as exc:
                return self._remember_result(CommandResult(cmd.id, False, str(exc)))
        return self._remember_result(CommandResult(cmd.id, True, holds=len(self.holds.active(now))))

    def _remember_result(self, result: CommandResult) -> CommandResult:
        if result.id is not None:
            self._recent[result.id] = result
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
        return result
