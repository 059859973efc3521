"""Fuzzing the daemon's inputs with hypothesis: every parser of untrusted text or bytes raises
only its own documented error (or none), and every bounded memory stays bounded.

Inputs: config files (random text and random TOML structures), demand expressions (random text
and grammar-built ones, evaluated on random environments), CAN frames through CanIngest's
decode path, SOME/IP datagrams, the companion-MCU byte stream, MQTT command payloads. A short
atheris run on the expression compiler runs too when atheris is installed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from typing import Any

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cerebellumd.config import CanBusConfig, ConfigError, builtin_example, parse_config
from cerebellumd.daemon.control import CommandProcessor, CommandResult, HoldStore
from cerebellumd.daemon.ingest import CanIngest
from cerebellumd.daemon.metrics import Metrics
from cerebellumd.drivers import mcu_protocol
from cerebellumd.drivers.dbc import load_dbc
from cerebellumd.drivers.someip import (
    HEADER_SIZE,
    SomeIpDecoder,
    SomeIpError,
    SomeIpFieldSpec,
    build_notification,
    parse_packet,
)
from cerebellumd.policies.expr import ExpressionError, compile_expression

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEMO = builtin_example()
DB = load_dbc("builtin:vehicle.dbc")

# -- config loader ---------------------------------------------------------------------------

SECTION_KEYS = {
    "daemon": ["node", "tick_ms", "initial_state", "safe_state", "state_file", "persist_interval_s"],
    "accelerator": ["profile", "driver", "options", "command_timeout_ms", "retries"],
    "policy": ["release_ms", "min_dwell_ms", "max_wake_cycles_per_hour", "deepest_state"],
    "guards": ["battery_signal", "battery_min_v", "temperature_signal"],
    "prometheus": ["enabled", "address", "port"],
    "mqtt": ["enabled", "host", "port", "operators", "command_rate_per_minute"],
    "signals": ["speed", "x"],
    "demands": ["name", "when", "class", "confirm_ms"],
    "can": ["name", "interface", "channel", "dbc", "queue_size"],
}
scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.text(max_size=20), st.sampled_from(["idle", "off", "simulated", "virtual", "critical", "x > 1", "builtin:x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from([k for ks in SECTION_KEYS.values() for k in ks] + ["can", "when", "zz"]), inner, max_size=4),
    max_leaves=12,
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@FUZZ
@given(st.text(max_size=400))
def test_config_random_text_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert all(issue.file == "fuzz.toml" for issue in exc.issues)


@FUZZ
@given(st.dictionaries(st.sampled_from([*SECTION_KEYS, "zz"]), values, max_size=5))
def test_config_random_structures_raise_only_config_error(doc: dict[str, Any]) -> None:
    text = "\n".join(f"{k} = {toml_value(v)}" for k, v in doc.items())
    with contextlib.suppress(ConfigError):
        parse_config(text, "fuzz.toml")


@FUZZ
@given(st.integers(0, 200), st.text(min_size=1, max_size=30))
def test_config_mutated_demo_raises_only_config_error(cut: int, junk: str) -> None:
    """The real demo config with junk spliced in at a line: the realistic typo."""
    lines = DEMO.splitlines()
    i = cut % len(lines)
    with contextlib.suppress(ConfigError):
        parse_config("\n".join([*lines[:i], junk, *lines[i:]]), "fuzz.toml")


# -- expressions -----------------------------------------------------------------------------

NAMES = ["a", "b", "speed", "x1"]
atoms = st.one_of(
    st.sampled_from(NAMES), st.sampled_from(["true", "false", "True", "False", "0", "1e308", "-0.0"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr), st.integers(-(10**30), 10**30).map(str),
)


def _expr(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binop = st.sampled_from(["+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "and", "or"])
    return st.one_of(
        st.tuples(inner, binop, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"not {e}"),
        inner.map(lambda e: f"-{e}"),
        st.tuples(st.sampled_from(["abs", "min", "max"]), st.lists(inner, min_size=1, max_size=3)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.tuples(inner, inner, inner).map(lambda t: f"{t[0]} < {t[1]} <= {t[2]}"),
    )


expressions = st.recursive(atoms, _expr, max_leaves=30)
env_values = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(10**6), 10**6).map(float))


@FUZZ
@given(st.text(max_size=200))
def test_expression_random_text_raises_only_expression_error(source: str) -> None:
    with contextlib.suppress(ExpressionError):
        compile_expression(source, frozenset(NAMES))


@FUZZ
@given(st.text(alphabet="ab()<>=!+-*/%. 0123456789notrufeals,_xspmi[]{}:'\"\\@lambda", max_size=120))
def test_expression_python_ish_text_raises_only_expression_error(source: str) -> None:
    with contextlib.suppress(ExpressionError):
        compile_expression(source)


@FUZZ
@given(expressions, st.fixed_dictionaries({n: env_values for n in NAMES}))
def test_expression_evaluation_never_raises(source: str, env: dict[str, Any]) -> None:
    try:
        expression = compile_expression(source, frozenset(NAMES))
    except ExpressionError:
        return  # too many nodes, constant folding refused, ...: a documented rejection
    result = expression(env)
    assert result is None or isinstance(result, bool | int | float)


# -- CAN frames into the decoder -------------------------------------------------------------

frames = st.builds(
    lambda ext, arb, data, err, known: can.Message(
        arbitration_id=(known if known is not None else arb) & (0x1FFFFFFF if ext else 0x7FF),
        is_extended_id=ext and known is None, data=data, is_error_frame=err),
    st.booleans(), st.integers(0, 0x1FFFFFFF), st.binary(max_size=8), st.booleans(),
    st.one_of(st.none(), st.sampled_from([m.frame_id for m in DB.messages])),
)


@FUZZ
@given(st.lists(frames, min_size=1, max_size=60))
def test_can_decode_path_counts_and_never_raises(batch: list[can.Message]) -> None:
    metrics = Metrics(buses=["vehicle"])
    wanted = {(m.name, s.name): f"{m.name}.{s.name}" for m in DB.messages for s in m.signals}
    got: list[tuple[str, float]] = []
    ingest = CanIngest(CanBusConfig(name="vehicle", interface="virtual", channel="fuzz"), DB, wanted,
                       lambda samples, t: got.extend(samples), metrics)
    ingest._queue.extend(batch)
    ingest.drain(budget_s=math.inf)  # the loop-side decode path, as the reader thread schedules it (no time bound)
    assert ingest.frames == len(batch)
    assert not ingest._queue
    assert ingest.errors["error_frame"] == sum(m.is_error_frame for m in batch)
    assert all(math.isfinite(v) for _, v in got)
    assert metrics.registry.get_sample_value("cerebellumd_can_frames_total", {"bus": "vehicle"}) == len(batch)


# -- SOME/IP ---------------------------------------------------------------------------------

FIELDS = [
    SomeIpFieldSpec(notification="n", service_id=0x1234, event_id=0x8001, field="f", offset=0, type="f64"),
    SomeIpFieldSpec(notification="n", service_id=0x1234, event_id=0x8001, field="g", offset=6, type="i16",
                    endianness="little", scale=0.5),
    SomeIpFieldSpec(notification="n", service_id=0x1234, event_id=0x8001, field="h", offset=8, type="f32"),
]


@FUZZ
@given(st.binary(max_size=200))
def test_someip_random_datagrams(data: bytes) -> None:
    decoder = SomeIpDecoder(FIELDS)
    samples = decoder.decode(data)
    assert all(math.isfinite(v) for v in samples.values())
    with contextlib.suppress(SomeIpError):
        parse_packet(data)


@FUZZ
@given(st.binary(max_size=32), st.binary(max_size=40), st.integers(0, 2**16 - 1))
def test_someip_valid_header_random_payload(payload: bytes, tail: bytes, session: int) -> None:
    """A good header lets the fuzzer reach the field decoding (short payloads, NaN/inf floats)."""
    decoder = SomeIpDecoder(FIELDS)
    datagram = build_notification(0x1234, 0x8001, payload, session_id=session) + tail
    samples = decoder.decode(datagram)
    assert all(math.isfinite(v) for v in samples.values())
    assert decoder.counters["messages"] >= 1
    assert len(datagram) >= HEADER_SIZE


# -- companion MCU byte stream ---------------------------------------------------------------


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=80), st.just(mcu_protocol.SOF), st.just(mcu_protocol.SOF[:1])),
                max_size=40))
def test_mcu_parser_random_chunks_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    parser = mcu_protocol.FrameParser()
    for chunk in chunks:
        parser.feed(chunk)
        assert parser.buffered < mcu_protocol.MAX_FRAME
    assert sum(parser.counters.values()) >= 0


@FUZZ
@given(st.binary(max_size=60), st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_mcu_good_frame_survives_garbage_and_any_split(garbage: bytes, seq: int, uptime: int, split: int) -> None:
    frame = mcu_protocol.encode(mcu_protocol.Heartbeat(uptime_ms=uptime, status=0), seq)
    stream = garbage + frame
    parser = mcu_protocol.FrameParser()
    got = []
    for i in range(0, len(stream), split):
        got.extend(parser.feed(stream[i:i + split]))
    # Garbage may itself contain a frame by chance; ours is always the last one parsed.
    assert got and got[-1].seq == seq and got[-1].body == mcu_protocol.Heartbeat(uptime, 0)


# -- MQTT command payloads -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
commandish = st.fixed_dictionaries(
    {"command": st.sampled_from(["hold", "release", "wake", "sleep", "reboot", ""]),
     "owner": st.sampled_from(["ops", "", "a b", "x" * 70]), "id": st.text(max_size=70)},
    optional={"ttl_s": st.one_of(st.floats(), st.integers()), "reason": st.text(max_size=250), "extra": json_values},
)
payloads = st.one_of(
    st.binary(max_size=5000), json_values.map(lambda v: json.dumps(v).encode()),
    commandish.map(lambda v: json.dumps(v).encode()), commandish.map(json.dumps),
)


@FUZZ
@given(st.lists(payloads, max_size=60), st.floats(0, 1e6))
def test_command_payloads_never_raise_and_memory_stays_bounded(batch: list[bytes | str], t0: float) -> None:
    processor = CommandProcessor(HoldStore(), rate_per_minute=5, remember=16)
    for i, payload in enumerate(batch):
        result = processor.handle_payload(payload, t0 + i * 0.5)
        assert isinstance(result, CommandResult)
        json.loads(result.to_json())  # the reply is always valid JSON
        assert len(processor._recent) <= 16
        assert len(processor._times) <= 5
    # Rate limit: at most 5 applied commands in any minute (here all within 30 s).
    assert sum(1 for _ in processor._times) <= 5


def test_command_id_is_never_applied_twice() -> None:
    processor = CommandProcessor(HoldStore(), rate_per_minute=100)
    body = json.dumps({"command": "hold", "owner": "ops", "id": "same"})
    first = processor.handle_payload(body, 0.0)
    again = processor.handle_payload(body.encode(), 1.0)
    assert first.ok and not first.duplicate
    assert again.duplicate and again.ok
    assert len(processor._times) == 1


# -- atheris (coverage-guided) ---------------------------------------------------------------

ATHERIS_SCRIPT = textwrap.dedent("""
    import sys
    import atheris
    with atheris.instrument_imports():
        from cerebellumd.policies.expr import ExpressionError, compile_expression

    def one(data: bytes) -> None:
        text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(300)
        try:
            expr = compile_expression(text)
        except ExpressionError:
            return
        expr({name: 1.0 for name in expr.names})
        expr({})

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
""")


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed (pip install atheris)")
@pytest.mark.timeout(180)
def test_atheris_expression_compiler_short_run(tmp_path: Any) -> None:
    script = tmp_path / "fuzz_expr.py"
    script.write_text(ATHERIS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "-runs=30000", "-max_len=300"],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 30000 runs" in proc.stderr
