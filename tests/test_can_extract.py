"""Compiled signal extractors (drivers/can_extract.py) against cantools, value for value and type
for type: on every opendbc DBC that loads, on hand-written corner cases (floats, signed
big-endian across bytes, 64-byte CAN FD, choices) and with hypothesis. A frame the two judge
differently (values, int/float type, or one refusing what the other accepts) fails the test."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import cantools
import pytest
from cantools.database.can import Database, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebellumd.drivers.can_extract import (
    NotCompilable,
    cantools_values,
    compile_extractor,
    same_value,
    try_compile,
)

PAYLOADS_PER_MESSAGE = 40


def judged_alike(message: Message, signals: tuple[str, ...], extract, data: bytes) -> bool:
    want = cantools_values(message, signals, data)
    try:
        got = extract(data)
    except ValueError:
        got = None
    if want is None or got is None:
        return want is None and got is None
    return len(got) == len(want) and all(map(same_value, got, want))


def opendbc_databases() -> list[tuple[str, Database]]:
    opendbc = pytest.importorskip("opendbc", reason="opendbc (real-vehicle DBCs) is not installed")
    out = []
    for path in sorted((Path(opendbc.__file__).parent / "dbc").rglob("*.dbc")):
        for strict in (True, False):
            try:
                db = cantools.database.load_file(path, strict=strict)
            except Exception:
                continue
            assert isinstance(db, Database)
            out.append((path.name, db))
            break
    return out


def payloads(rng: random.Random, length: int) -> list[bytes]:
    """Random payloads of the message's length, plus too short and too long ones."""
    sizes = [length] * (PAYLOADS_PER_MESSAGE - 6) + [0, max(0, length - 1), length + 1, length + 7, 8, 64]
    return [rng.randbytes(n) for n in sizes]


@pytest.mark.timeout(300)
def test_every_opendbc_message_decodes_as_cantools_does() -> None:
    databases = opendbc_databases()
    assert len(databases) >= 80, "opendbc should bring more than 80 loadable DBCs"
    compiled = frames = 0
    left_to_cantools: Counter[str] = Counter()
    mismatches: list[str] = []
    for name, db in databases:
        rng = random.Random(name)
        for message in db.messages:
            all_signals = tuple(s.name for s in message.signals)
            if not all_signals:
                continue
            # All signals, and a random subset in a random order (what a config wants).
            subset = tuple(rng.sample(all_signals, rng.randint(1, len(all_signals))))
            for signals in (all_signals, subset):
                try:
                    extract = compile_extractor(message, signals)
                except NotCompilable as exc:
                    left_to_cantools[str(exc).split(" ")[-1]] += 1
                    continue
                compiled += 1
                for data in payloads(rng, message.length):
                    frames += 1
                    if not judged_alike(message, signals, extract, data):
                        mismatches.append(f"{name} {message.name} {data.hex()}")
    assert not mismatches, mismatches[:10]
    # What is left to cantools is left for the documented reasons only, and is the exception.
    assert set(left_to_cantools) <= {"message", "another", "frame"}, left_to_cantools
    assert compiled > 10 * sum(left_to_cantools.values()), (compiled, left_to_cantools)
    assert frames > 100_000


CORNER_DBC = """VERSION ""
BS_:
BU_: ECU
BO_ 256 Floats: 24 ECU
 SG_ LeF32 : 3|32@1- (1,0) [0|0] "" ECU
 SG_ BeF32 : 47|32@0- (0.5,-3) [0|0] "" ECU
 SG_ LeF64 : 72|64@1- (1,0) [0|0] "" ECU
BO_ 257 Ints: 8 ECU
 SG_ BeSigned : 5|13@0- (0.25,-1.5) [-100|100] "" ECU
 SG_ LeSigned : 24|7@1- (3,2) [0|0] "" ECU
 SG_ OneBitSigned : 31|1@1- (1,0) [0|0] "" ECU
 SG_ IntScale : 32|16@1+ (2,-7) [0|0] "" ECU
 SG_ Choice : 16|4@1+ (1,0) [0|15] "" ECU
 SG_ BeLong : 55|12@0+ (0.001,100) [0|0] "" ECU
BO_ 258 FdWide: 64 ECU
 SG_ Head : 0|8@1+ (1,0) [0|0] "" ECU
 SG_ Across : 250|37@1+ (0.5,1) [0|0] "" ECU
 SG_ BeTail : 447|60@0- (1,0) [0|0] "" ECU
 SG_ LastBit : 511|1@1+ (1,0) [0|0] "" ECU
BO_ 2566834709 Extended: 3 ECU
 SG_ Odd : 2|19@1+ (0.1,0) [0|0] "" ECU
VAL_ 257 Choice 0 "Off" 1 "On" 15 "Invalid" ;
"""
CORNER = cantools.database.load_string(CORNER_DBC, database_format="dbc")


@pytest.mark.parametrize("message", CORNER.messages, ids=lambda m: m.name)
def test_corner_cases_compile_and_agree(message: Message) -> None:
    signals = tuple(s.name for s in message.signals)
    extract = compile_extractor(message, signals)
    rng = random.Random(message.name)
    for data in payloads(rng, message.length) * 25:
        assert judged_alike(message, signals, extract, data), data.hex()


def test_choices_are_never_applied_and_types_follow_cantools() -> None:
    message = CORNER.get_message_by_name("Ints")
    signals = ("Choice", "IntScale", "BeLong")
    values = compile_extractor(message, signals)(bytes.fromhex("00000f00050f0000"))
    assert values[0] == 15 and type(values[0]) is int  # "Invalid" stays the number
    assert values[1] == 0x0F05 * 2 - 7 and type(values[1]) is int  # integer scale: int, as cantools
    assert type(values[2]) is float


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CORNER.messages), st.binary(max_size=70), st.data())
def test_hypothesis_payloads_and_subsets(message: Message, data: bytes, draw: st.DataObject) -> None:
    names = [s.name for s in message.signals]
    signals = tuple(draw.draw(st.permutations(names)))[: draw.draw(st.integers(1, len(names)))]
    assert judged_alike(message, signals, compile_extractor(message, signals), data)


def test_multiplexed_overlapping_and_containers_are_left_to_cantools() -> None:
    opendbc = pytest.importorskip("opendbc", reason="opendbc (real-vehicle DBCs) is not installed")
    folder = Path(opendbc.__file__).parent / "dbc"
    tesla = cantools.database.load_file(folder / "tesla_model3_party.dbc")
    mux = tesla.get_message_by_name("VCFRONT_LVPowerState")
    assert try_compile(mux, ("VCFRONT_vehiclePowerState",)) is None
    gwm = cantools.database.load_file(folder / "gwm_haval_h6_phev_2024.dbc", strict=False)
    overlapping = gwm.get_message_by_name("CAR_OVERALL_SIGNALS")  # 64 bytes, two signals share bits
    assert try_compile(overlapping, (overlapping.signals[0].name,)) is None
    speed = gwm.get_message_by_name("SPEED")  # 64 bytes, plain: compiled
    assert try_compile(speed, ("SPEED",)) is not None


def test_unknown_signal_is_not_compilable() -> None:
    with pytest.raises(NotCompilable):
        compile_extractor(CORNER.get_message_by_name("Ints"), ("NoSuchSignal",))
