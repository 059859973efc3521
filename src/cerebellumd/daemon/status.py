"""`cerebellumd status`: what a running daemon is doing, read the way an operator can reach it,
from its Prometheus endpoint or from the retained MQTT `state`/`status` messages.

Both sources give the same document (keys a source cannot know are null), printed as a rich
table or as JSON."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URL = "http://127.0.0.1:9108/metrics"
DEFAULT_WAIT_S = 5.0


class StatusError(Exception):
    """The daemon's state could not be read (shown to the user as is)."""


def empty_status(source: str) -> dict[str, Any]:
    return {"source": source, "online": None, "state": None, "target": None, "reason": None,
            "active_demands": [], "stale_signals": [], "watts": {}, "joules": {}, "holds": None,
            "hold_details": None, "wakes": None, "sleeps": None, "mqtt_connected": None, "can_connected": {}}


# -- Prometheus ----------------------------------------------------------------------------------


def fetch_metrics(url: str, timeout_s: float = DEFAULT_WAIT_S) -> str:
    """Blocking HTTP GET of the exposition text."""
    if not url.startswith(("http://", "https://")):
        raise StatusError(f"not an http(s) URL: {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (scheme checked above)
            return bytes(response.read()).decode("utf-8")
    except OSError as exc:
        raise StatusError(f"cannot read {url}: {exc}") from None


def status_from_metrics(text: str) -> dict[str, Any]:
    out = empty_status("metrics")
    wakes = sleeps = 0.0
    seen = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "cerebellumd_accelerator_state":
                seen = True
                if value == 1:
                    out["state"] = labels["state"]
            elif name == "cerebellumd_domain_power_watts":
                out["watts"][labels["domain"]] = value
            elif name == "cerebellumd_domain_energy_joules_total":
                out["joules"][labels["domain"]] = value
            elif name == "cerebellumd_wakes_total":
                wakes += value
            elif name == "cerebellumd_sleeps_total":
                sleeps += value
            elif name == "cerebellumd_demand_active" and value == 1:
                out["active_demands"].append(labels["demand"])
            elif name == "cerebellumd_signal_stale" and value == 1:
                out["stale_signals"].append(labels["signal"])
            elif name == "cerebellumd_holds_active":
                out["holds"] = int(value)
            elif name == "cerebellumd_mqtt_connected":
                out["mqtt_connected"] = value == 1
            elif name == "cerebellumd_can_connected":
                out["can_connected"][labels["bus"]] = value == 1
    if not seen:
        raise StatusError("no cerebellumd_accelerator_state series: is this a cerebellumd metrics endpoint?")
    out.update(online=True, wakes=int(wakes), sleeps=int(sleeps))
    return out


# -- MQTT ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    node: str
    prefix: str = "cerebellumd"
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, host_port: str, **kwargs: Any) -> MqttTarget:
        host, sep, port = host_port.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise StatusError(f"--mqtt wants HOST:PORT, got {host_port!r}")
        return cls(host.strip("[]"), int(port), **kwargs)


def status_from_mqtt(state: Mapping[str, Any] | None, online: str | None) -> dict[str, Any]:
    out = empty_status("mqtt")
    out["online"] = None if online is None else online == "online"
    if state is not None:
        for key in ("state", "target", "reason", "active_demands", "stale_signals", "watts", "joules",
                    "wakes", "sleeps"):
            if key in state:
                out[key] = state[key]
        holds = state.get("holds")
        if isinstance(holds, list):
            out["holds"], out["hold_details"] = len(holds), holds
        can = state.get("can")
        if isinstance(can, dict):
            out["can_connected"] = {bus: bool(v.get("connected")) for bus, v in can.items() if isinstance(v, dict)}
    return out


async def fetch_mqtt(target: MqttTarget, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """Read the retained `state` and `status` of a node (retained: they arrive at once)."""
    import aiomqtt

    base = f"{target.prefix}/{target.node}"
    state: dict[str, Any] | None = None
    online: str | None = None
    client = aiomqtt.Client(target.host, target.port, username=target.username, password=target.password,
                            identifier=f"cerebellumd-status-{uuid.uuid4().hex[:8]}", timeout=wait_s)
    try:
        async with client:
            await client.subscribe(f"{base}/state", qos=1)
            await client.subscribe(f"{base}/status", qos=1)
            try:
                async with asyncio.timeout(wait_s):
                    async for message in client.messages:
                        raw = message.payload if isinstance(message.payload, bytes) else b""
                        if message.topic.matches(f"{base}/state"):
                            state = json.loads(raw)
                        elif message.topic.matches(f"{base}/status"):
                            online = raw.decode("utf-8", "replace")
                        if state is not None and online is not None:
                            break
            except TimeoutError:
                pass
    except aiomqtt.MqttError as exc:
        raise StatusError(f"MQTT {target.host}:{target.port}: {exc}") from None
    except ValueError as exc:
        raise StatusError(f"{base}/state is not JSON: {exc}") from None
    if state is None:
        raise StatusError(f"no retained state on {base}/state within {wait_s:g} s (node or prefix wrong?)")
    return status_from_mqtt(state, online)


# -- output --------------------------------------------------------------------------------------


def _title(status: Mapping[str, Any]) -> str:
    online = {True: "online", False: "OFFLINE", None: "?"}[status["online"]]
    return f"cerebellumd ({status['source']}, {online})"


def status_rows(status: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [("accelerator", str(status["state"]))]
    if status["target"] is not None:
        rows.append(("target", str(status["target"])))
    if status["reason"] is not None:
        rows.append(("reason", str(status["reason"])))
    rows.append(("active demands", ", ".join(status["active_demands"]) or "-"))
    rows.append(("stale signals", ", ".join(status["stale_signals"]) or "-"))
    for domain, watts in status["watts"].items():
        joules = status["joules"].get(domain)
        energy = f"  ({joules:.1f} J)" if joules is not None else ""
        rows.append((f"power {domain}", f"{watts:.2f} W{energy}"))
    details = status["hold_details"]
    holds = str(status["holds"]) if status["holds"] is not None else "?"
    if details:
        holds += ": " + "; ".join(f"{h['owner']} {h['mode']} ({h['reason']}, {h['expires_in_s']:.0f} s)"
                                  for h in details)
    rows.append(("holds", holds))
    rows.append(("wakes / sleeps", f"{status['wakes']} / {status['sleeps']}"))
    for bus, connected in status["can_connected"].items():
        rows.append((f"can {bus}", "connected" if connected else "DISCONNECTED (reopening)"))
    if status["mqtt_connected"] is not None:
        rows.append(("mqtt", "connected" if status["mqtt_connected"] else "DISCONNECTED"))
    return rows


def render_table(status: Mapping[str, Any]) -> Any:
    """A rich table (rich comes with the `sim` extra; `render_text` without it)."""
    from rich.table import Table

    table = Table(title=_title(status), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in status_rows(status):
        table.add_row(what, value)
    return table


def render_text(status: Mapping[str, Any]) -> str:
    """The same rows as plain text, for an install without rich (a gateway's base install)."""
    rows = status_rows(status)
    width = max(len(what) for what, _ in rows)
    return "\n".join([_title(status), *(f"  {what:<{width}}  {value}" for what, value in rows)])


def read_status(url: str | None, mqtt: MqttTarget | None, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """Blocking: the CLI's entry point (runs its own event loop for MQTT)."""
    if mqtt is not None:
        return asyncio.run(fetch_mqtt(mqtt, wait_s))
    return status_from_metrics(fetch_metrics(url or DEFAULT_URL, wait_s))
