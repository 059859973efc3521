"""The SOME/IP receiver's configuration (`[[someip]]` endpoints and their payload fields) and
the error kinds it counts: what the config and the metrics need, without the codec and the
receiver (drivers/someip.py), which a gateway without SOME/IP never imports."""

from __future__ import annotations

import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Error kinds counted by the decoder and the receiver (the keys of their `counters`).
ERROR_KINDS: tuple[str, ...] = (
    "short",
    "length",
    "version",
    "type",
    "unknown_message",
    "field_out_of_range",
    "non_finite",
)


FieldType = Literal["u8", "i8", "u16", "i16", "u32", "i32", "f32", "f64"]
FIELD_FORMATS: dict[str, str] = {
    "u8": "B",
    "i8": "b",
    "u16": "H",
    "i16": "h",
    "u32": "I",
    "i32": "i",
    "f32": "f",
    "f64": "d",
}


class SomeIpFieldSpec(BaseModel):
    """One payload field of one notification, mapped to the signal `notification.field`.

    value = raw * scale + offset_value (as a DBC signal's factor and offset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    notification: str = Field(
        ..., pattern=r"^\w+$", description="Notification name (first part of the signal key).")
    service_id: int = Field(..., ge=0, le=0xFFFF, description="SOME/IP service id.")
    event_id: int = Field(..., ge=0, le=0xFFFF, description="Event (method) id, usually >= 0x8000.")
    field: str = Field(..., pattern=r"^\w+$", description="Field name (second part of the key).")
    offset: int = Field(..., ge=0, description="Byte offset of the field in the payload.")
    type: FieldType = Field(..., description="Encoding: u8/i8/u16/i16/u32/i32/f32/f64.")
    endianness: Literal["big", "little"] = Field(
        "big", description="Byte order (SOME/IP serialises big-endian by default).")
    scale: float = Field(1.0, description="Factor applied to the raw value.")
    offset_value: float = Field(0.0, description="Added after scaling.")

    @property
    def signal(self) -> str:
        return f"{self.notification}.{self.field}"

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct(("<" if self.endianness == "little" else ">") + FIELD_FORMATS[self.type])


class SomeIpOptions(BaseModel):
    """Options of the SOME/IP receiver (config section of an Ethernet source)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        "127.0.0.1",
        description="Local address to bind: the gateway's address on the vehicle network. Never "
        "0.0.0.0 on a gateway with cellular/Wi-Fi/diagnostic interfaces: anyone who reaches the port "
        "could inject signal values.")
    port: int = Field(30490, ge=0, le=65535, description="UDP port (0 = any free port).")
    multicast_group: str | None = Field(
        None, description="IPv4 multicast group to join (events sent to a group).")
    multicast_interface: str = Field(
        "0.0.0.0", description="Local interface address for the multicast join.")
    fields: list[SomeIpFieldSpec] = Field(
        default_factory=list, description="Payload fields mapped to signals.")
