"""`cerebellumd replay LOG --dbc FILE [--config FILE]`: a recorded CAN log through decoding
and the same pure policy as the daemon, in fast-forward.

Any format python-can's `can.LogReader` reads (candump `.log`, `.asc`, `.blf`, `.trc`, `.csv`,
...). Policy time is the frames' timestamps: the policy steps at each frame (after its samples
are applied) and on a 10 ms grid between frames, as the daemon's ticker would; the accelerator
is the evaluator's `SimAccelerator` (model latencies). Counts, per frame:

- `unknown_ids`: its (ID, extended) is not in the DBC;
- `decode_errors`: its ID is known but the data does not decode (short frame, bad multiplexer);
- `decoded`: decoded; `signals` lists every DBC signal name seen decoded;
- `error_frames`: error frames (never decoded);
- `transport_frames`: J1939 protocol frames (TP.CM, TP.DT, Address Claimed) taken by the J1939
  receiver; the PGs they carry are counted in `j1939`.

J1939 (`drivers/j1939.py`, the daemon's code): with `j1939="auto"` (the default) the DBC
messages cantools marks J1939 (`VFrameFormat` J1939PG) or all extended ones of a DBC whose
`ProtocolType` is J1939, with `"on"` every extended message, match frames by PGN (priority and
source address masked) instead of by exact ID. Multi-packet PGs (BAM, RTS/CTS) are reassembled
and decoded whole (a reassembled PG shorter than its DBC message decodes the signals it holds:
J1939 PG lengths vary); a half one never reaches the policy. The JSON's `j1939` object counts
the messages routed by PGN, reassembled PGs (decoded, without a DBC message), transport errors
by kind, and the address claims seen (address -> NAME).

Without `--config` there is no policy: `wakes` is 0. With one, the config's signals whose
`can = "Message.Signal"` exists in the DBC are fed (whatever their `bus`; a log is one bus).

With `[nm] enabled = true` the log's frames (whatever their ID: any frame is bus activity)
also step the daemon's CanNm (`policies/nm_replay.py`, the same replayer as
`daemon/nm_frames.replay_nm_log`), and the JSON gets an `nm` object: its transitions (seconds
from the first frame), when the bus went to sleep, PDUs, nodes and malformed NM frames. KL15
comes from `nm.ignition_signal` when the DBC decodes it (fresh within its `max_age_ms`). After
the last frame the NM timers run on until the network sleeps: a log that ends in silence shows
when the bus would have slept. The replayed policy is not clamped by NM (the daemon's
bus-sleep clamp) and the gateway's own network request (leases, demands) is not modelled.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import can
import cantools
from cantools.database.can import Database, Message

from ..accel import AccelState
from ..config import Config, policy_params
from ..drivers.j1939 import J1939_MODES, J1939Receiver, PgnRoutes, is_j1939_message
from ..policies.cerebellum import CerebellumFirst, PolicyState
from ..policies.nm import NmMode
from ..policies.nm_replay import NmReplay, NmReplayer
from ..policies.types import Inputs, Sample
from ..profiles import load_profile
from .accelerator import SimAccelerator

GRID_S = 0.010
#: Kept samples per fed signal for the plot: at least this far apart unless the value changed.
SERIES_STEP_S = 0.05


class ReplayError(ValueError):
    """The log or the DBC cannot be used; the message says which and why."""


def load_replay_dbc(path: str | Path) -> Database:
    """Non-strict (overlap checks off): many real DBCs, opendbc's among them, need it."""
    try:
        db = cantools.database.load_file(str(path), strict=False)
    except Exception as exc:  # cantools raises parser-specific types; all mean "cannot use it"
        raise ReplayError(f"{path}: DBC does not load: {exc}") from exc
    if not isinstance(db, Database):
        raise ReplayError(f"{path}: not a CAN database")
    return db


class FrameDecoder:
    """One bus's frames -> the DBC messages they carry, as `replay` decodes them: by exact (ID,
    extended), or (J1939, `j1939` mode) by PGN with transport-protocol reassembly. `counts`
    tallies `decoded`, `decode_errors`, `unknown_ids`, `error_frames`, `transport_frames`,
    `pgn_routed`, `tp_messages`, `tp_decoded`, `tp_decoded_errors`, `tp_unknown_pgn`;
    `tp_errors` the transport errors by kind."""

    def __init__(self, db: Database, j1939: str = "auto") -> None:
        if j1939 not in J1939_MODES:
            raise ReplayError(f"j1939 must be one of {', '.join(J1939_MODES)}, not {j1939!r}")
        self.by_pgn = [m for m in db.messages if is_j1939_message(m, db, j1939)]
        routed = {id(m) for m in self.by_pgn}
        self.by_id: dict[tuple[int, bool], Message] = {
            (m.frame_id, m.is_extended_frame): m for m in db.messages if id(m) not in routed}
        self.rx: J1939Receiver[Message] | None = (
            J1939Receiver(PgnRoutes((m.frame_id, m) for m in self.by_pgn)) if self.by_pgn else None)
        self.counts: Counter[str] = Counter()
        self.tp_errors: Counter[str] = Counter()

    def _decode(self, message: Message, data: bytes, counter: str, *,
                truncated: bool = False) -> Mapping[str, Any] | None:
        try:
            # Plain decode (no multiplexer container) returns a dict of numbers.
            values = cast(Mapping[str, Any], message.decode(data, decode_choices=False, allow_truncated=truncated))
        except Exception:  # cantools raises several types for bad frames; all are bad input
            self.counts[f"{counter}_errors" if counter != "decoded" else "decode_errors"] += 1
            return None
        self.counts[counter] += 1
        return values

    def feed(self, msg: can.Message) -> list[tuple[Message, Mapping[str, Any], float]]:
        """The (message, decoded values, time) this frame completes: none (unknown ID, bad
        data, error or transport frame), one, or the PGs a transport frame completes."""
        t = float(msg.timestamp)
        if msg.is_error_frame:
            self.counts["error_frames"] += 1
            return []
        message = self.by_id.get((msg.arbitration_id, msg.is_extended_id))
        rx = self.rx
        if message is None and rx is not None and msg.is_extended_id:
            message = rx.feed(msg.arbitration_id, bytes(msg.data), t)
            for error in rx.errors:
                self.tp_errors[error.kind] += 1
            rx.errors.clear()
            if message is not None:
                self.counts["pgn_routed"] += 1
            elif rx.consumed:
                self.counts["transport_frames"] += 1
                out: list[tuple[Message, Mapping[str, Any], float]] = []
                for routed, pg in rx.messages:
                    self.counts["tp_messages"] += 1
                    if routed is None:
                        self.counts["tp_unknown_pgn"] += 1
                        continue
                    values = self._decode(routed, pg.data, "tp_decoded", truncated=True)
                    if values is not None:
                        out.append((routed, values, pg.time))
                rx.messages.clear()
                return out
        if message is None:
            self.counts["unknown_ids"] += 1
            return []
        values = self._decode(message, bytes(msg.data), "decoded")
        return [] if values is None else [(message, values, t)]

    def close(self) -> None:
        """End of the log: a transfer still open is a transport error."""
        if self.rx is not None:
            self.rx.close()
            for error in self.rx.errors:
                self.tp_errors[error.kind] += 1
            self.rx.errors.clear()


@dataclass
class _Policy:
    core: CerebellumFirst
    accelerator: SimAccelerator
    state: PolicyState
    routes: dict[str, list[tuple[str, str]]]  # DBC message name -> [(DBC signal, our name)]
    samples: dict[str, Sample] = field(default_factory=dict)
    commanded: AccelState = AccelState.IDLE
    last_step: float = -math.inf
    wakes: int = 0
    sleeps: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    # For people and plots: what was fed, the wakes with their times, the demands' active spans.
    fed: Counter[str] = field(default_factory=Counter)
    ranges: dict[str, list[float]] = field(default_factory=dict)
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    wake_log: list[tuple[float, str]] = field(default_factory=list)
    spans: dict[str, list[list[float]]] = field(default_factory=dict)
    active: frozenset[str] = frozenset()

    def feed(self, ours: str, value: float, t: float) -> None:
        self.samples[ours] = Sample(value, t)
        self.fed[ours] += 1
        r = self.ranges.setdefault(ours, [value, value])
        r[0], r[1] = min(r[0], value), max(r[1], value)
        ts, vs = self.series.setdefault(ours, ([], []))
        if not ts or t - ts[-1] >= SERIES_STEP_S or vs[-1] != value:
            ts.append(t)
            vs.append(value)

    def step(self, now: float) -> None:
        self.accelerator.advance(now)
        inputs = Inputs(samples=self.samples, actual=self.accelerator.state)
        self.state, d = self.core.step(self.state, inputs, now)
        self.last_step = now
        active = frozenset(d.active_demands)
        if active != self.active:
            for name in active - self.active:
                self.spans.setdefault(name, []).append([now, now])
            for name in self.active - active:
                self.spans[name][-1][1] = now
            self.active = active
        if d.changed and d.wake:
            self.wakes += 1
            self.reasons[d.reason] += 1
            self.wake_log.append((now, d.reason))
        elif d.changed and d.target is not AccelState.ACTIVE and self.commanded is AccelState.ACTIVE:
            self.sleeps += 1
        if d.target is not self.commanded:
            self.accelerator.command(now, d.target)
            self.commanded = d.target

    def step_until(self, t: float) -> None:
        """Grid steps strictly between the last step and t."""
        k = math.floor(self.last_step / GRID_S) + 1
        while k * GRID_S < t:
            self.step(k * GRID_S)
            k += 1


def _policy(config: Config, db: Database, t0: float) -> _Policy:
    names = {m.name: m for m in db.messages}
    routes: dict[str, list[tuple[str, str]]] = {}
    for ours, signal in config.signals.items():
        if not signal.can:
            continue
        message, dbc_signal = signal.can.split(".", 1)
        if message in names and any(s.name == dbc_signal for s in names[message].signals):
            routes.setdefault(message, []).append((dbc_signal, ours))
    model = load_profile(config.accelerator.profile)
    core = CerebellumFirst(policy_params(config), model)
    initial = AccelState(config.daemon.initial_state)
    return _Policy(core, SimAccelerator(model, initial, since=t0), core.initial_state(t0, initial), routes,
                   commanded=initial, last_step=t0)


def _nm_replayer(config: Config | None) -> NmReplayer | None:
    if config is None or not config.nm.enabled:
        return None
    return NmReplayer(config.nm.params(), config.nm.layout())


def _ignition(config: Config, samples: Mapping[str, Sample], now: float) -> bool | None:
    """KL15 as the daemon's NM service reads it: unknown without a fresh sample."""
    name = config.nm.ignition_signal
    sample = samples.get(name) if name is not None else None
    spec = config.signals.get(name) if name is not None else None
    if sample is None or spec is None or now - sample.time > spec.max_age_ms / 1000:
        return None
    return sample.value != 0


def _nm_json(out: NmReplay, t0: float) -> dict[str, Any]:
    def rel(t: float) -> float:
        return round(t - t0, 6)

    # The last entry into bus sleep from prepare-bus-sleep (not the log-start state).
    sleeps = [e.time for e in out.events if e.mode is NmMode.BUS_SLEEP and e.reason != "log_start"]
    return {
        "transitions": [
            {"t": rel(e.time), "state": e.mode.value, "reason": e.reason}
            | ({"nodes": list(e.nodes)} if e.nodes else {})
            for e in out.events
        ],
        "bus_sleep_at": rel(sleeps[-1]) if sleeps else None,
        "final_state": out.final.mode.value if out.final is not None else None,
        "pdus": out.nm_pdus,
        "nodes": sorted(out.nodes),
        "malformed": out.malformed,
        "wake_validations": {
            "validated": sum(e.wakeup_validated for e in out.events),
            "expired": sum(e.wakeup_expired for e in out.events),
        },
    }


def replay(log: str | Path, dbc: str | Path, config: Config | None = None, *,
           plot: str | Path | None = None, j1939: str = "auto") -> dict[str, Any]:
    """Replay `log`; the JSON result. With `plot`, also draw the configured signals, the demands
    and the accelerator state over the recording's time to that PNG. `j1939`: match the DBC's
    J1939 messages by PGN and reassemble transport-protocol messages (docs/j1939.md)."""
    if plot is not None and config is None:
        raise ReplayError("--plot needs --config: it draws the configured signals, demands and accelerator")
    if j1939 not in J1939_MODES:
        raise ReplayError(f"j1939 must be one of {', '.join(J1939_MODES)}, not {j1939!r}")
    db = load_replay_dbc(dbc)
    decoder = FrameDecoder(db, j1939)
    last_values: dict[str, float] = {}
    changes: Counter[str] = Counter()
    counts = decoder.counts
    seen: set[str] = set()
    policy: _Policy | None = None
    nm = _nm_replayer(config)
    first: float | None = None
    last: float | None = None

    try:
        reader = can.LogReader(str(log))
    except Exception as exc:  # unknown suffix, unreadable file
        raise ReplayError(f"{log}: cannot read: {exc}") from exc
    for msg in reader:
        counts["frames"] += 1
        t = float(msg.timestamp)
        if first is None:
            first = t
            policy = _policy(config, db, t) if config is not None else None
        last = t
        if policy is not None:
            policy.step_until(t)
        if nm is not None:
            # Before this frame's samples: the daemon steps NM with what it knew at the tick.
            if config is not None and policy is not None:
                nm.ignition = _ignition(config, policy.samples, t)
            nm.feed(msg)
        for message, values, at in decoder.feed(msg):
            seen.update(values)
            for name, value in values.items():
                key = f"{message.name}.{name}"
                if isinstance(value, int | float) and last_values.get(key, value) != value:
                    changes[key] += 1
                last_values[key] = value
            if policy is not None:
                for dbc_signal, ours in policy.routes.get(message.name, ()):
                    value = values.get(dbc_signal)
                    if isinstance(value, int | float):
                        policy.feed(ours, float(value), at)
                policy.step(at)
    by_pgn, rx, tp_errors = decoder.by_pgn, decoder.rx, decoder.tp_errors
    result: dict[str, Any] = {
        "log": str(log),
        "dbc": str(dbc),
        "frames": counts["frames"],
        "decoded": counts["decoded"],
        "unknown_ids": counts["unknown_ids"],
        "decode_errors": counts["decode_errors"],
        "error_frames": counts["error_frames"],
        "transport_frames": counts["transport_frames"],
        "signals": sorted(seen),
        "duration_s": round(last - first, 6) if first is not None and last is not None else 0.0,
        "policy": config.policy.name if config is not None else None,
        "wakes": policy.wakes if policy else 0,
        "sleeps": policy.sleeps if policy else 0,
        "wake_reasons": dict(sorted(policy.reasons.items())) if policy else {},
    }
    if policy is not None and last is not None:
        policy.accelerator.finish(last)
        result["accelerator_energy_j"] = round(policy.accelerator.energy_j, 3)
        result["fed_signals"] = sorted(ours for routes in policy.routes.values() for _, ours in routes)
        t0 = first if first is not None else 0.0
        can_signals = sorted(n for n, spec in config.signals.items() if spec.can) if config is not None else []
        result["signal_feeds"] = {
            name: {"count": policy.fed[name], "min": policy.ranges.get(name, [None, None])[0],
                   "max": policy.ranges.get(name, [None, None])[1]}
            for name in can_signals
        }
        result["never_fed"] = [name for name in can_signals if policy.fed[name] == 0]
        result["wake_times"] = [{"t": round(t - t0, 3), "reason": r} for t, r in policy.wake_log]
        if plot is not None:
            _plot(policy, t0, last, str(log), plot)
    if nm is not None:
        result["nm"] = _nm_json(nm.finish(), first if first is not None else 0.0)
    if rx is not None:
        decoder.close()
        result["j1939"] = {
            "mode": j1939,
            "pgn_messages": len(by_pgn),
            "pgn_routed_frames": counts["pgn_routed"],
            "tp_messages": counts["tp_messages"],
            "tp_decoded": counts["tp_decoded"],
            "tp_decode_errors": counts["tp_decoded_errors"],
            "tp_unknown_pgn": counts["tp_unknown_pgn"],
            "tp_errors": dict(sorted(tp_errors.items())),
            "address_claims": {f"{a:#04x}": f"{n:016x}" for a, n in sorted(rx.addresses.names.items())},
        }
    duration = result["duration_s"] or 0.0
    result["top_signals"] = [
        {"signal": k, "changes": n, "changes_per_s": round(n / duration, 3) if duration > 0 else 0.0}
        for k, n in changes.most_common(15)]
    return result


_LEVEL = {AccelState.OFF: 0.0, AccelState.SLEEP: 1.0, AccelState.IDLE: 2.0, AccelState.WAKING: 2.5,
          AccelState.SUSPENDING: 2.5, AccelState.ACTIVE: 3.0}


def _plot(policy: _Policy, t0: float, t_end: float, title: str, path: str | Path) -> None:
    """The configured signals (one panel each, at most 6), the demands' active spans and the
    accelerator state over the recording's time (s from its first frame)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    names = [n for n in sorted(policy.series) if policy.series[n][0]][:6]
    rows = len(names) + 2
    fig, axes = plt.subplots(rows, 1, figsize=(12, 1.6 * rows + 1), sharex=True, squeeze=False)
    ax_list = [a[0] for a in axes]
    for ax, name in zip(ax_list, names, strict=False):
        ts, vs = policy.series[name]
        ax.step([t - t0 for t in ts], vs, where="post", lw=0.8)
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=8)
    ax = ax_list[-2]
    demand_names = sorted(policy.spans)
    for i, name in enumerate(demand_names):
        bars = [(a - t0, max(b - a, GRID_S)) for a, b in policy.spans[name]]
        ax.broken_barh(bars, (i - 0.4, 0.8), color=f"C{i % 10}")
    ax.set_yticks(range(len(demand_names)), demand_names, fontsize=8)
    ax.set_ylabel("demands", rotation=0, ha="right", fontsize=8)
    ax = ax_list[-1]
    xs: list[float] = []
    ys: list[float] = []
    for a, b, state in policy.accelerator.segments:
        xs += [a - t0, b - t0]
        ys += [_LEVEL.get(state, 0.0)] * 2
    ax.plot(xs, ys, lw=0.9, color="black")
    for t, _reason in policy.wake_log:
        ax.axvline(t - t0, color="tab:red", lw=0.6, alpha=0.6)
    ax.set_yticks([0, 1, 2, 3], ["off", "sleep", "idle", "active"])
    ax.set_ylabel("accelerator", rotation=0, ha="right", fontsize=8)
    ax.set_xlabel("time s (from the first frame)")
    ax_list[0].set_title(f"{Path(title).name}: {policy.wakes} wakes")
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
    plt.close(fig)


def format_replay(result: Mapping[str, Any]) -> str:
    """The replay result for people: counts, the busiest signals, the configured signals as fed,
    the wakes with their reasons and times (the full lists are in `--json`)."""
    lines = [
        f"{result['log']}: {result['frames']} frames in {result['duration_s']:.1f} s: {result['decoded']} decoded, "
        f"{result['decode_errors']} decode errors, {result['unknown_ids']} of IDs not in the DBC, "
        f"{result['error_frames']} error frames; {len(result['signals'])} DBC signals seen",
    ]
    top = result.get("top_signals") or []
    if top:
        lines.append("most active signals (changes/s): " + ", ".join(
            f"{t['signal']} {t['changes_per_s']:g}" for t in top[:8]))
    feeds = result.get("signal_feeds")
    if result.get("policy") is None:
        lines.append("no --config: decoding only, no policy")
        return "\n".join(lines)
    lines.append(f"policy {result['policy']}: {result['wakes']} wakes, {result['sleeps']} sleeps, "
                 f"accelerator {result.get('accelerator_energy_j', 0.0):g} J")
    if feeds:
        lines.append("configured signals (fed, min..max):")
        width = max(len(n) for n in feeds)
        for name, f in feeds.items():
            shown = f"{f['min']:g}..{f['max']:g}" if f["count"] else "NEVER FED"
            lines.append(f"  {name:<{width}}  {f['count']:>7}  {shown}")
    never = result.get("never_fed") or []
    if never:
        lines.append(f"warning: never fed during this log: {', '.join(never)} "
                     "(not sent in this recording; with on_stale = wake they would keep the accelerator awake)")
    wakes = result.get("wake_times") or []
    if wakes:
        lines.append("wakes (s from the first frame: reason):")
        lines += [f"  {w['t']:9.3f}  {w['reason']}" for w in wakes[:20]]
        if len(wakes) > 20:
            lines.append(f"  ... {len(wakes) - 20} more in --json")
    return "\n".join(lines)
