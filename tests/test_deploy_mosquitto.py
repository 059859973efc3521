"""deploy/mosquitto: a real mosquitto with the shipped config and ACL (a temp copy with paths
and port rewritten) enforces the roles: the operator's commands reach the daemon, a viewer's do
not, viewers can watch status/state, anonymous and wrong-password clients are refused."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .helpers import free_port

paho = pytest.importorskip("paho.mqtt.client")

REPO = Path(__file__).resolve().parents[1]
MQ = REPO / "deploy" / "mosquitto"
PASSWORDS = {"cerebellumd": "daemon-secret", "operator": "operator-secret", "viewer": "viewer-secret"}
DEADLINE_S = 10.0

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None,
    reason="mosquitto / mosquitto_passwd not installed")




def rewrite_conf(text: str, tmp: Path, port: int) -> str:
    out = []
    for line in text.splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            assert line.split()[1:] == ["1883", "127.0.0.1"], line
            line = f"listener {port} 127.0.0.1"
        elif key == "password_file":
            line = f"password_file {tmp / 'passwd'}"
        elif key == "acl_file":
            line = f"acl_file {tmp / 'acl'}"
        out.append(line)
    if os.geteuid() == 0:
        # As root, mosquitto switches to user `mosquitto`, which cannot enter pytest's 0700
        # temp dirs; stay root for the test only.
        out.append("user root")
    return "\n".join(out) + "\n"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    text = (MQ / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in text
    (tmp_path / "mosquitto.conf").write_text(rewrite_conf(text, tmp_path, port))
    shutil.copy(MQ / "acl", tmp_path / "acl")
    env = {**os.environ, **{"CEREBELLUMD_PASSWORD": PASSWORDS["cerebellumd"],
                            "OPERATOR_PASSWORD": PASSWORDS["operator"],
                            "VIEWER_PASSWORD": PASSWORDS["viewer"]}}
    # the shipped helper, in batch mode (it calls mosquitto_passwd -b)
    subprocess.run([str(MQ / "make-passwd.sh"), str(tmp_path / "passwd")], env=env, check=True,
                   capture_output=True, timeout=30)
    log = (tmp_path / "mosquitto.log").open("wb")
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf"), "-v"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert proc.poll() is None, (tmp_path / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # poll interval of the deadline loop
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@dataclass
class Peer:
    client: Any
    connected: queue.Queue[Any]
    messages: queue.Queue[tuple[str, bytes]]
    subscribed: queue.Queue[Any]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=DEADLINE_S)  # PUBACK: the broker has processed it
        assert info.is_published()

    def subscribe(self, topic: str) -> list[Any]:
        self.client.subscribe(topic, qos=1)
        return list(self.subscribed.get(timeout=DEADLINE_S))

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=DEADLINE_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(port: int, user: str | None, password: str | None = None) -> tuple[Peer, Any]:
    """Connect and return the peer and the CONNACK reason code."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{uuid.uuid4().hex[:6]}",
                    protocol=paho.MQTTv311)
    peer = Peer(c, queue.Queue(), queue.Queue(), queue.Queue())
    if user is not None:
        c.username_pw_set(user, password if password is not None else PASSWORDS[user])
    c.on_connect = lambda _c, _u, _f, rc, _p: peer.connected.put(rc)
    c.on_message = lambda _c, _u, m: peer.messages.put((m.topic, m.payload))
    c.on_subscribe = lambda _c, _u, _mid, rcs, _p: peer.subscribed.put(rcs)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    rc = peer.connected.get(timeout=DEADLINE_S)
    return peer, rc


@pytest.fixture
def peers(broker: int) -> Iterator[dict[str, Peer]]:
    out: dict[str, Peer] = {}
    try:
        for user in PASSWORDS:
            peer, rc = connect(broker, user)
            out[user] = peer
            assert not rc.is_failure, f"{user}: {rc}"
        yield out
    finally:
        for p in out.values():
            p.close()


def test_operator_commands_reach_the_daemon_viewer_commands_do_not(peers: dict[str, Peer]) -> None:
    daemon, operator, viewer = peers["cerebellumd"], peers["operator"], peers["viewer"]
    daemon.subscribe("cerebellumd/+/set")
    # The viewer's command is acknowledged but must be dropped by the ACL. The broker handles
    # it before the operator's (PUBACK first), and delivers to one subscriber in order: if the
    # viewer's message got through, the daemon would see it before the operator's.
    viewer.publish("cerebellumd/gw1/set", b'{"command": "wake", "owner": "viewer", "id": "v"}')
    operator.publish("cerebellumd/gw1/set", b'{"command": "hold", "owner": "op", "id": "o"}')
    topic, payload = daemon.next_message()
    assert topic == "cerebellumd/gw1/set"
    assert b'"id": "o"' in payload, f"got {payload!r}: a viewer's command was delivered"
    assert daemon.messages.empty()


def test_daemon_publishes_state_that_viewers_read_and_replies_operators_read(
        peers: dict[str, Peer]) -> None:
    daemon, operator, viewer = peers["cerebellumd"], peers["operator"], peers["viewer"]
    viewer.subscribe("cerebellumd/#")
    operator.subscribe("cerebellumd/+/response")
    daemon.publish("cerebellumd/gw1/response", b'{"id": "o", "ok": true}')
    daemon.publish("cerebellumd/gw1/state", b'{"state": "sleep"}', retain=True)
    assert viewer.next_message() == ("cerebellumd/gw1/state", b'{"state": "sleep"}'), \
        "viewers must not read command responses"
    assert operator.next_message() == ("cerebellumd/gw1/response", b'{"id": "o", "ok": true}')


def test_daemon_cannot_command_itself_or_others(peers: dict[str, Peer]) -> None:
    daemon, operator = peers["cerebellumd"], peers["operator"]
    operator.subscribe("cerebellumd/+/set")
    daemon.publish("cerebellumd/gw2/set", b"forged")
    operator.publish("cerebellumd/gw2/set", b"sentinel")
    assert operator.next_message() == ("cerebellumd/gw2/set", b"sentinel")


def test_anonymous_is_refused(broker: int) -> None:
    peer, rc = connect(broker, None)
    try:
        assert rc.is_failure
        assert rc.getName() == "Not authorized"
    finally:
        peer.close()


def test_wrong_password_is_refused(broker: int) -> None:
    peer, rc = connect(broker, "operator", "not-the-password")
    try:
        assert rc.is_failure
    finally:
        peer.close()
