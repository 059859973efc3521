"""Sweeps: grid expansion, Pareto front, parallel and dask runs give the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cerebellumd.sim.sweep import aggregate, load_sweep, pareto, points, run_sweep, write_rows


def _spec(tmp_path: Path) -> Path:
    f = tmp_path / "sweep.toml"
    f.write_text('scenarios = ["us06"]\nseeds = [1]\n[grid]\nrelease_ms = [1000, 6000]\n', encoding="utf-8")
    return f


def test_grid_points_and_unknown_keys(tmp_path: Path) -> None:
    spec = load_sweep(_spec(tmp_path))
    assert points(spec) == [{"release_ms": 1000}, {"release_ms": 6000}]
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nrelese_ms = [1]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="relese_ms"):
        load_sweep(bad)


def test_pareto_keeps_only_undominated_points() -> None:
    pts = [
        {"accelerator_energy_j": 10, "readiness": 0.9},
        {"accelerator_energy_j": 12, "readiness": 1.0},
        {"accelerator_energy_j": 13, "readiness": 0.95},  # dominated by the 12 J point
        {"accelerator_energy_j": 9, "readiness": 0.5},
    ]
    assert [p["accelerator_energy_j"] for p in pareto(pts)] == [9, 10, 12]


def test_parallel_sweep_matches_serial_and_writes_rows(tmp_path: Path) -> None:
    spec = load_sweep(_spec(tmp_path))
    serial = run_sweep(spec, workers=1)
    parallel = run_sweep(spec, workers=2)
    assert serial == parallel
    by_release = {r["release_ms"]: r for r in serial}
    # Staying awake longer after each demand can only cost energy.
    assert by_release[6000]["accelerator_energy_j"] > by_release[1000]["accelerator_energy_j"]
    assert len(aggregate(serial, ["release_ms"])) == 2
    csv_path, json_path = write_rows(serial, tmp_path / "out")
    assert csv_path.read_text(encoding="utf-8").startswith("release_ms,")
    assert json.loads(json_path.read_text(encoding="utf-8")) == serial


def test_dask_sweep_matches_serial(tmp_path: Path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    spec = load_sweep(_spec(tmp_path))
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        rows = run_sweep(spec, dask_address=cluster.scheduler_address)
    assert rows == run_sweep(spec, workers=1)
