"""The libraries' floor under `cerebellumd run`'s memory: the base install's libraries doing the
daemon's job in the fewest lines, with none of cerebellumd's code.

It loads the DBC with cantools, validates one pydantic model, opens the same python-can bus,
decodes every frame on an asyncio loop (`add_reader` + `recv(0)` + `decode_message`), counts
them in a prometheus-client counter served over HTTP, and tells systemd READY=1 through sdnotify.
It runs until SIGTERM. `bench/startup_memory.py` starts it beside the daemon, fed by the same
plant, and reports its RSS as the baseline measured in the same run.

    python bench/library_floor.py DBC INTERFACE CHANNEL UDP_PORT METRICS_PORT

Never imports cerebellumd: whatever RSS the daemon has above this is cerebellumd's own.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import can
import cantools
import prometheus_client
import pydantic
import sdnotify


class Bus(pydantic.BaseModel):
    """One model, validated once: what the daemon's config models cost above it is ours."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    interface: str = pydantic.Field(description="python-can interface")
    channel: str = pydantic.Field(description="python-can channel")
    port: int = pydantic.Field(ge=1, le=65535, description="UDP port")


async def serve(bus: can.BusABC, db: Any, frames: prometheus_client.Counter) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    values: dict[str, Any] = {}

    def on_readable() -> None:
        while (msg := bus.recv(0)) is not None:
            try:
                values.update(db.decode_message(msg.arbitration_id, msg.data))
            except (KeyError, ValueError):
                continue
            frames.inc()

    loop.add_reader(bus.fileno(), on_readable)
    sdnotify.SystemdNotifier().notify("READY=1")
    await stopping.wait()
    loop.remove_reader(bus.fileno())


def main(argv: list[str]) -> int:
    dbc, interface, channel, udp_port, metrics_port = argv
    cfg = Bus(interface=interface, channel=channel, port=int(udp_port))
    db = cantools.database.load_file(dbc)
    frames = prometheus_client.Counter("floor_frames", "frames decoded")
    prometheus_client.start_http_server(int(metrics_port), addr="127.0.0.1")
    bus = can.Bus(interface=cfg.interface, channel=cfg.channel, port=cfg.port)
    try:
        asyncio.run(serve(bus, db, frames))
    finally:
        bus.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
