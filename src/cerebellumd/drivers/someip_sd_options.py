"""The SOME/IP-SD client's configuration (`[someip.sd]`) and the error kinds it counts: what the
config and the metrics need, without the SD codec and client state machine
(drivers/someip_sd.py), which a gateway without SOME/IP-SD never imports."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TTL_INFINITE = 0xFFFFFF
ANY_INSTANCE = 0xFFFF
ANY_MAJOR = 0xFF

#: Bad SD input by kind (the keys of `SdClient.errors`; `nack` is a refused subscription).
SD_ERROR_KINDS: tuple[str, ...] = (
    "malformed", "protocol_version", "interface_version", "length", "option", "entry", "nack",
)


class SdServiceSpec(BaseModel):
    """One service instance to find and the eventgroups of it to subscribe to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_id: int = Field(..., ge=0, le=0xFFFE, description="SOME/IP service id.")
    instance_id: int = Field(
        ANY_INSTANCE, ge=0, le=0xFFFF,
        description="Instance id to find; 0xFFFF (default) takes the first instance offered.")
    major_version: int = Field(
        ANY_MAJOR, ge=0, le=0xFF, description="Major interface version; 0xFF (default) accepts any.")
    eventgroups: list[int] = Field(
        ..., min_length=1, description="Eventgroup ids to subscribe to (each 0..0xFFFF).")
    ttl_s: int = Field(
        3, ge=1, le=TTL_INFINITE - 1,
        description="TTL (s) of our FindService and SubscribeEventgroup entries; subscriptions are renewed "
                    "before half of it has run out.")

    @field_validator("eventgroups")
    @classmethod
    def _eventgroup_ids(cls, value: list[int]) -> list[int]:
        if any(not 0 <= g <= 0xFFFF for g in value) or len(set(value)) != len(value):
            raise ValueError("eventgroup ids must be distinct and in 0..0xFFFF")
        return value


class SdOptions(BaseModel):
    """SOME/IP-SD client of a `[[someip]]` endpoint (`[someip.sd]`): finds the services and
    subscribes to their eventgroups with the endpoint's host and port as our event endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    multicast: str = Field(
        "224.224.224.245",
        description="SD multicast group (vsomeip's default): FindService goes there and offers are received "
                    "from it, joined on the endpoint's `host` interface.")
    unicast_only: bool = Field(
        False, description="SD over unicast only: no multicast socket, FindService goes to `peers` only.")
    port: int = Field(30490, ge=0, le=65535, description="SD UDP port (unicast and multicast), 30490 by the spec.")
    peers: list[str] = Field(
        default_factory=list,
        description="Unicast SD partners 'address:port' that FindService is also sent to (an ECU that does not "
                    "listen to multicast, or SD without multicast).")
    initial_delay_min_ms: int = Field(0, ge=0, description="INITIAL_DELAY_MIN (ms).")
    initial_delay_max_ms: int = Field(3000, ge=0, description="INITIAL_DELAY_MAX (ms); the delay is random "
                                                               "between min and max.")
    repetitions_base_delay_ms: int = Field(10, ge=1, description="REPETITIONS_BASE_DELAY (ms).")
    repetitions_max: int = Field(3, ge=0, le=16, description="REPETITIONS_MAX: FindService repetitions.")
    subscribe_retry_ms: int = Field(
        1000, ge=1,
        description="A SubscribeEventgroup not acknowledged (or refused) is sent again after this long.")
    services: list[SdServiceSpec] = Field(..., min_length=1, description="Services to find and subscribe to.")

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: list[str]) -> list[str]:
        for peer in value:
            parse_peer(peer)
        return value

    @model_validator(mode="after")
    def _check(self) -> SdOptions:
        if self.initial_delay_min_ms > self.initial_delay_max_ms:
            raise ValueError("initial_delay_min_ms must not exceed initial_delay_max_ms")
        if self.unicast_only and not self.peers:
            raise ValueError("unicast-only SD needs at least one peer")
        if not ipaddress.IPv4Address(self.multicast).is_multicast:
            raise ValueError(f"{self.multicast} is not an IPv4 multicast address")
        return self

    @property
    def multicast_group(self) -> str | None:
        return None if self.unicast_only else self.multicast

    def peer_addresses(self) -> list[tuple[str, int]]:
        return [parse_peer(p) for p in self.peers]


def parse_peer(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"peer {text!r}: expected 'address:port'")
    return str(ipaddress.IPv4Address(host)), int(port)
