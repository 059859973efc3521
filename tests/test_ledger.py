"""The energy ledger's split of the accelerator's domain by reason (daemon/ledger.py): each
interval goes to the reason in force while it was used, open-ended reasons keep the label set
bounded, and a domain added by a part itself (a rail map) is split too."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cerebellumd.config import DomainConfig
from cerebellumd.daemon.ledger import EnergyLedger, reason_label
from cerebellumd.daemon.metrics import Metrics


def by_reason(metrics: Metrics) -> dict[str, float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "cerebellumd_accelerator_energy_joules")
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_each_interval_goes_to_the_reason_in_force_while_the_energy_was_used() -> None:
    watts = {"w": 10.0}
    domains = [DomainConfig(name="npu", source="model"), DomainConfig(name="gateway", source="constant", watts=3.5)]
    metrics = Metrics(domains=["npu", "gateway"])
    ledger = EnergyLedger(domains, metrics, lambda: watts["w"], accelerator_domain="npu")
    ledger.integrate(0.0)                         # start
    ledger.integrate(2.0, "demand:urban")         # 0-2 s: start, 20 J
    watts["w"] = 5.0
    ledger.integrate(5.0, "rest:idle")            # 2-5 s: demand:urban at 5 W, 15 J
    ledger.integrate(6.0, "hold:app:ota")         # 5-6 s: rest:idle, 5 J
    ledger.integrate(8.0, "learned:speed=3")      # 6-8 s: hold (the owner is not a label), 10 J
    ledger.integrate(9.0)                         # 8-9 s: learned, 5 J; the reason stays
    ledger.add_energy("npu", 2.0)                 # a rail map's own integration: learned
    assert by_reason(metrics) == {"start": 20.0, "demand:urban": 15.0, "rest:idle": 5.0, "hold": 10.0,
                                  "learned": 7.0}
    assert ledger.joules["npu"] == sum(by_reason(metrics).values())  # every joule once
    assert ledger.joules["gateway"] == 3.5 * 9  # other domains are not split


def test_no_accelerator_domain_no_split_and_a_reconfigure_moves_it() -> None:
    domains = [DomainConfig(name="npu", source="model")]
    metrics = Metrics(domains=["npu"])
    ledger = EnergyLedger(domains, metrics, lambda: 4.0, accelerator_domain="accelerator")  # no such domain
    ledger.integrate(0.0, "demand:x")
    ledger.integrate(1.0, "rest:sleep")
    assert by_reason(metrics) == {} and ledger.joules["npu"] == 4.0
    ledger.reconfigure(domains, accelerator_domain="npu")
    ledger.integrate(2.0)
    assert by_reason(metrics) == {"rest:sleep": 4.0}


def test_reason_labels() -> None:
    assert [reason_label(r) for r in ("hold:app:ota", "learned:speed=1", "hold:", "rest:sleep", "paused")] == [
        "hold", "learned", "hold", "rest:sleep", "paused"]
