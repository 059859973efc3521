"""Per-message signal extractors compiled once from a cantools message: only the signals asked
for, as straight integer shifts and masks over the frame's payload.

Why not `Message.decode`: it unpacks every signal of the message through bitstruct, builds a
dict and scales each value (3 to 4 µs per frame here), while the daemon wants one or two signals
of most messages. An extractor returns exactly what `Message.decode(data, decode_choices=False)`
would return for the signals asked for (same values, same int/float types, the same frames
refused), in the order asked:

- little endian (Intel) and big endian (Motorola) bit layouts, as cantools numbers them;
- unsigned and two's-complement signed integers, IEEE 754 float32/float64 signals;
- cantools' own conversion object for scale and offset (`raw * scale + offset`, or the raw value
  where cantools returns it as is), so the arithmetic and result types match; choices are
  never applied (`decode_choices=False`);
- a payload shorter than the message raises `ValueError` (cantools: `DecodeError`); a longer one
  is cut to the message length (cantools' `allow_excess=True`).

`compile_extractor` returns None where a message is not one of these plain cases (multiplexed,
a container, overlapping or out-of-frame signals, float sizes other than 32/64 bits): callers
fall back to cantools there. As a last guard, every compiled extractor is checked against
cantools on fixed probe payloads (all zeros, all ones, alternating bits, a few seeded random
ones) before it is returned; any disagreement also means None.

Each signal is a small closure over the integers computed here (shift, mask, sign bit) and
cantools' scale and offset; no source is generated (the project uses no `exec`/`eval`).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

from cantools.database.can import Message, Signal
from cantools.database.conversion import BaseConversion, IdentityConversion

#: Values of the signals asked for, in that order.
Extractor = Callable[[bytes | bytearray], tuple[int | float, ...]]

_FLOAT_FORMATS = {32: struct.Struct(">f").unpack, 64: struct.Struct(">d").unpack}


class NotCompilable(ValueError):
    """A message or signal outside the plain cases this module compiles."""


def _network_start(signal: Signal) -> int:
    """Big endian: the MSB's position counted from the first byte's MSB (cantools' start bit
    is in its 'sawtooth' numbering)."""
    return 8 * (signal.start // 8) + (7 - signal.start % 8)


def _bit_span(signal: Signal, length_bits: int) -> set[int]:
    """The payload bits a signal occupies, in little-endian bit numbers (byte i holds bits
    8i..8i+7, LSB first); raises NotCompilable when it leaves the frame."""
    if signal.byte_order == "little_endian":
        lo = signal.start
        bits = set(range(lo, lo + signal.length))
    else:
        msb = _network_start(signal)
        network = range(msb, msb + signal.length)
        bits = {8 * (n // 8) + 7 - n % 8 for n in network}
        if msb + signal.length > length_bits:
            raise NotCompilable(f"signal {signal.name} runs past the frame")
    if not bits or min(bits) < 0 or max(bits) >= length_bits:
        raise NotCompilable(f"signal {signal.name} lies outside the frame")
    return bits


def _conversion(signal: Signal) -> BaseConversion:
    """cantools' conversion with choices off (what `decode_choices=False` applies)."""
    conv = signal.conversion
    if conv.choices is None:
        return conv
    return BaseConversion.factory(scale=conv.scale, offset=conv.offset, choices=None, is_float=conv.is_float)


RawGetter = Callable[[int, int], int | float]


def _raw_getter(signal: Signal, length_bytes: int) -> tuple[RawGetter, bool, bool]:
    """(the raw value from the payload read as a little- and a big-endian integer, needs the
    little-endian one, needs the big-endian one)."""
    n = signal.length
    mask = (1 << n) - 1
    little = signal.byte_order == "little_endian"
    shift = signal.start if little else 8 * length_bytes - (_network_start(signal) + n)
    if signal.conversion.is_float:
        if n not in _FLOAT_FORMATS:
            raise NotCompilable(f"signal {signal.name}: float of {n} bits")
        unpack, size = _FLOAT_FORMATS[n], n // 8
        # The bits read as an integer are the IEEE pattern, MSB first, for both byte orders.
        if little:
            def raw(le: int, be: int) -> int | float:
                return float(unpack(((le >> shift) & mask).to_bytes(size, "big"))[0])
        else:
            def raw(le: int, be: int) -> int | float:
                return float(unpack(((be >> shift) & mask).to_bytes(size, "big"))[0])
    elif signal.is_signed:
        half = 1 << (n - 1)
        if little:
            def raw(le: int, be: int) -> int | float:
                return (((le >> shift) & mask) ^ half) - half
        else:
            def raw(le: int, be: int) -> int | float:
                return (((be >> shift) & mask) ^ half) - half
    elif little:
        def raw(le: int, be: int) -> int | float:
            return (le >> shift) & mask
    else:
        def raw(le: int, be: int) -> int | float:
            return (be >> shift) & mask
    return raw, little, not little


def _scaled(raw: RawGetter, scale: int | float, offset: int | float) -> RawGetter:
    def value(le: int, be: int) -> int | float:
        return raw(le, be) * scale + offset

    return value


def compile_extractor(message: Message, signals: Sequence[str]) -> Extractor:
    """An extractor for `signals` (names in `message`); raises NotCompilable where cantools
    must decode instead (see the module's docstring)."""
    if message.is_container:
        raise NotCompilable("container message")
    if message.is_multiplexed():
        raise NotCompilable("multiplexed message")
    length = message.length
    if length <= 0:
        raise NotCompilable("message without payload")
    occupied: set[int] = set()
    for sig in message.signals:  # overlaps shift bitstruct's layout: leave those to cantools
        span = _bit_span(sig, 8 * length)
        if span & occupied:
            raise NotCompilable(f"signal {sig.name} overlaps another")
        occupied |= span
    getters: list[RawGetter] = []
    need_le = need_be = False
    for name in signals:
        try:
            sig = message.get_signal_by_name(name)
        except KeyError:
            raise NotCompilable(f"no signal {name}") from None
        raw, le, be = _raw_getter(sig, length)
        need_le |= le
        need_be |= be
        conv = _conversion(sig)
        if isinstance(conv, IdentityConversion):
            getters.append(raw)
            continue
        for factor in (conv.scale, conv.offset):
            if not isinstance(factor, int | float) or not math.isfinite(factor):
                raise NotCompilable(f"signal {name}: scale/offset {factor!r}")
        getters.append(_scaled(raw, conv.scale, conv.offset))
    from_bytes = int.from_bytes
    fields = tuple(getters)

    def extract(data: bytes | bytearray) -> tuple[int | float, ...]:
        if len(data) != length:
            if len(data) < length:
                raise ValueError(f"{len(data)} bytes instead of {length}")
            data = data[:length]
        le = from_bytes(data, "little") if need_le else 0
        be = from_bytes(data, "big") if need_be else 0
        return tuple([get(le, be) for get in fields])

    _check_against_cantools(message, tuple(signals), extract)
    return extract


def try_compile(message: Message, signals: Sequence[str]) -> Extractor | None:
    """`compile_extractor`, or None where the message is left to cantools."""
    try:
        return compile_extractor(message, signals)
    except NotCompilable:
        return None


def same_value(a: object, b: object) -> bool:
    """Equal in type and value; floats compared bit for bit (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def cantools_values(message: Message, signals: Sequence[str], data: bytes) -> tuple[Any, ...] | None:
    """What cantools decodes for `signals` (None where it refuses the frame)."""
    try:
        decoded = message.decode(data, decode_choices=False)
    except Exception:  # DecodeError, ValueError, ...: cantools refuses the frame
        return None
    assert isinstance(decoded, dict)
    return tuple(decoded.get(name) for name in signals)


def _probes(length: int) -> list[bytes]:
    rng = random.Random(length)
    return [bytes(length), b"\xff" * length, b"\x55" * length, b"\xaa" * length,
            *(rng.randbytes(length) for _ in range(4)), bytes(length - 1), b"\x5a" * (length + 3)]


def _check_against_cantools(message: Message, signals: tuple[str, ...], extract: Extractor) -> None:
    for data in _probes(message.length):
        want = cantools_values(message, signals, data)
        try:
            got: tuple[int | float, ...] | None = extract(data)
        except ValueError:
            got = None
        if (want is None) != (got is None) or (
                want is not None and got is not None and not all(map(same_value, got, want))):
            raise NotCompilable(f"disagrees with cantools on {data.hex()}")
