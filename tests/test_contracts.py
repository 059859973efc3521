"""The code against docs/contracts.md: metric families with their types and labels, the fixed
label values, the MQTT topics and documents, the CLI commands and the evaluation JSON. The
running-daemon scrape is checked against the same tables in tests/test_metrics_contract.py."""

from __future__ import annotations

import argparse
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cerebellumd.accel import ALL_STATES
from cerebellumd.cli import build_parser
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.daemon.control import Command, CommandResult
from cerebellumd.daemon.host import Snapshot
from cerebellumd.daemon.metrics import CAN_ERROR_KINDS, CONSUMER_REPORTS, RELOAD_RESULTS, Metrics
from cerebellumd.daemon.mqtt import Topics, state_payload
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import evaluate
from cerebellumd.sim.events import build_scenario

from . import contracts


def test_the_tables_parse() -> None:
    """Guard the parser: a table it silently skipped would make every check below vacuous."""
    assert len(contracts.metrics()) == 22
    assert "cerebellumd_wakes" in contracts.metrics()
    assert contracts.mqtt_topics() == ("status", "state", "set", "response")
    assert len(contracts.cli_commands()) >= 8 and len(contracts.evaluation_row_keys()) == 8


def test_metric_families_have_the_contract_types_and_labels() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics(domains=["accelerator"], demands=["d"], signals=["s"], buses=["vehicle"],
                      loops=("decision", "telemetry"), mqtt=True)
    metrics.wake_latency.observe(0.1)
    metrics.decision_seconds.observe(0.0001)
    metrics.tick_lateness.labels("decision").observe(0.001)
    metrics.wakes.labels("demand:d").inc()
    metrics.accelerator_energy.labels("demand:d").inc(1.0)
    metrics.sleeps.labels("sleep", "release").inc()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    for name, (kind, labels) in contracts.metrics().items():
        assert name in families, f"{name} not exported"
        family = families[name]
        assert family.type == kind, name
        seen = {k for s in family.samples for k in s.labels if k not in ("le", "quantile")}
        assert seen == labels, f"{name}: labels {seen} != {set(labels)}"


def test_fixed_label_values_are_the_contract_sets() -> None:
    values = contracts.label_values()
    assert values["`state` (accelerator)"] == tuple(s.value for s in ALL_STATES)
    assert values["`kind` (CAN errors)"] == CAN_ERROR_KINDS
    assert values["`result` (config reloads)"] == RELOAD_RESULTS
    assert values["`loop`"] == ("decision", "telemetry")
    assert values["`kind` (consumer reports)"] == CONSUMER_REPORTS


def test_mqtt_topics_state_and_commands() -> None:
    topics = Topics("cerebellumd", "gw")
    assert tuple(vars(topics)) == contracts.mqtt_topics()
    assert all(getattr(topics, t) == f"cerebellumd/gw/{t}" for t in contracts.mqtt_topics())
    snap = Snapshot(time=0.0, state=ALL_STATES[0], target=ALL_STATES[0], reason="start", active_demands=(),
                    stale_signals=(), watts={"gateway": 1.0}, joules={"gateway": 2.0}, signals={}, holds=(),
                    wakes=0, sleeps=0, frames=0, can_errors=0)
    body = json.loads(state_payload(snap))
    assert set(contracts.mqtt_state_keys()) <= set(body)
    assert tuple(Command.model_fields) == contracts.mqtt_command_keys()
    reply = json.loads(CommandResult("x", False, "no").to_json())
    assert {"id", "ok", "holds", "error"} == set(reply)


def test_cli_commands() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(contracts.cli_commands()) <= set(sub.choices)


@pytest.mark.timeout(60)
def test_evaluation_json_keys() -> None:
    result = evaluate(parse_config(builtin_example()), build_scenario(load_cycle("us06"), 1))
    assert tuple(result)[: len(contracts.evaluation_keys())] == contracts.evaluation_keys()
    assert tuple(r["policy"] for r in result["results"])[:4] == contracts.evaluation_policies()
    for row in result["results"]:
        assert set(contracts.evaluation_row_keys()) <= set(row)
