"""Smoke run of every bench script in its short mode: each must run to the end as a real
process and print one JSON object with exactly the documented keys and sane types.

The numbers themselves are never asserted (CI machines are slow and noisy): only that they are
measurements at all (non-negative, ordered percentiles, counts that match what was asked).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Generous: a quick run takes 3-15 s on a quiet 2-core machine; a loaded CI runner may be
# several times slower, and a hang must still fail inside pytest-timeout's budget.
RUN_TIMEOUT_S = 100.0


def run_bench(name: str, *extra: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"{name}: expected one JSON line, got stdout:\n{proc.stdout[-3000:]}"
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    return result


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def assert_percentiles(r: dict[str, Any], prefix: str = "") -> None:
    p50, p99, mx = r[f"{prefix}p50_us"], r[f"{prefix}p99_us"], r[f"{prefix}max_us"]
    assert all(is_num(v) and v >= 0 for v in (p50, p99, mx)), r
    assert p50 <= p99 <= mx, r


def test_tick_jitter_quick() -> None:
    r = run_bench("tick_jitter")
    assert set(r) == {"period_ms", "ticks", "p50_us", "p99_us", "max_us", "overruns",
                      "load_frames_per_s", "cyclictest_p50_us", "cyclictest_p99_us",
                      "cyclictest_max_us", "ratio_p99"}
    assert r["period_ms"] == 10.0 and r["load_frames_per_s"] == 500.0
    # 3 s at 10 ms: ~300 ticks; missed periods are skipped (counted as overruns), not replayed.
    assert isinstance(r["ticks"], int) and isinstance(r["overruns"], int)
    assert 0 < r["ticks"] <= 310 and r["overruns"] >= 0
    assert r["ticks"] + r["overruns"] >= 250, r
    assert_percentiles(r)
    if shutil.which("cyclictest") is None:  # the bench reports nulls without rt-tests
        assert r["cyclictest_p99_us"] is None and r["ratio_p99"] is None
    else:
        assert_percentiles(r, "cyclictest_")
        ct99 = r["cyclictest_p99_us"]
        if ct99 > 0:
            assert is_num(r["ratio_p99"]) and r["ratio_p99"] == pytest.approx(
                r["p99_us"] / ct99, abs=0.01)


def test_ingest_quick() -> None:
    r = run_bench("ingest", "--floor", "--thread-floor")
    assert set(r) == {"frames", "daemon_frames_per_s", "bare_frames_per_s", "cpu_ratio", "floor_frames_per_s",
                      "floor_cpu_ratio", "thread_floor_frames_per_s", "thread_floor_cpu_ratio"}
    assert r["frames"] == 5000
    for key in ("daemon_frames_per_s", "bare_frames_per_s", "floor_frames_per_s", "thread_floor_frames_per_s"):
        assert isinstance(r[key], int) and r[key] > 0, key
    assert is_num(r["cpu_ratio"]) and r["cpu_ratio"] > 0
    assert is_num(r["thread_floor_cpu_ratio"]) and r["thread_floor_cpu_ratio"] > 0
    # the floor ratio is the floor's CPU per frame over the bare loop's, as cpu_ratio is the daemon's
    assert r["floor_cpu_ratio"] == pytest.approx(r["bare_frames_per_s"] / r["floor_frames_per_s"], rel=0.02, abs=0.01)


def test_drain_cost_quick() -> None:
    r = run_bench("drain_cost")
    assert set(r) == {"frames_per_round", "rounds", "bare_us_per_frame_median", "daemon_us_per_frame_median",
                      "ratio", "ratio_median", "ratio_min", "ratio_max", "frames_not_drained", "samples"}
    assert r["frames_per_round"] == 1000 and r["rounds"] == 2 and len(r["ratio"]) == 2
    assert r["frames_not_drained"] == 0, r  # 100 frames fit any loopback socket buffer
    assert r["samples"] > 0  # the drain decoded the demo's signals, not just counted frames
    per_frame = (r["bare_us_per_frame_median"], r["daemon_us_per_frame_median"], *r["ratio"])
    assert all(is_num(v) and v > 0 for v in per_frame)
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]


def test_wake_latency_quick() -> None:
    r = run_bench("wake_latency")
    assert set(r) == {"samples", "transport", "lost", "p50_us", "p99_us", "max_us"}
    # udp_multicast may lose a critical frame on a loaded machine: counted, not a failure.
    assert isinstance(r["lost"], int) and r["samples"] + r["lost"] == 20
    assert r["samples"] > 0 and r["transport"] == "udp_multicast"
    assert_percentiles(r)
    assert r["p50_us"] > 0  # stamped before the send: a wake cannot precede its frame


def test_keyon_ready_quick() -> None:
    r = run_bench("keyon_ready")
    assert set(r) == {"speedup", "rows"}
    assert [(row["profile"], row["parked_state"]) for row in r["rows"]] == [("hailo8", "off"), ("hailo8", "sleep")]
    for row in r["rows"]:
        assert set(row) == {"profile", "parked_state", "cycles", "ready_p50_s", "ready_max_s", "profile_exit_s",
                            "ratio_to_exit", "parked_w"}
        assert row["cycles"] == 2
        assert 0 < row["ready_p50_s"] <= row["ready_max_s"]  # counted from the key-on's first evidence
        assert is_num(row["profile_exit_s"]) and is_num(row["parked_w"])


def test_memory_quick() -> None:
    r = run_bench("memory")
    assert set(r) == {"rss_mb", "peak_rss_mb", "run_s", "rss_samples"}
    assert is_num(r["rss_mb"]) and 0 < r["rss_mb"] <= r["peak_rss_mb"]
    assert isinstance(r["rss_samples"], int) and r["rss_samples"] > 0
    assert is_num(r["run_s"]) and r["run_s"] > 0


def test_evaluator_quick() -> None:
    r = run_bench("evaluator")
    assert set(r) == {
        "cycle", "duration_s", "tick_ms", "setup_s", "policies", "evaluate_all_s", "evaluate_contract_s",
        "per_policy_speedup_all", "per_policy_speedup_contract", "policies_all",
    }
    assert r["policies_all"] > 4 and r["per_policy_speedup_contract"] > 0 and r["per_policy_speedup_all"] > 0
    assert r["cycle"] == "udds" and r["tick_ms"] == 10 and r["duration_s"] > 1000
    assert set(r["policies"]) == {"cerebellum_first", "always_on", "timeout", "oracle"}
    for name, row in r["policies"].items():
        assert set(row) == {"wall_s", "steps", "speedup"}, name
        assert is_num(row["wall_s"]) and row["wall_s"] >= 0, name
        assert isinstance(row["steps"], int) and row["steps"] >= 0, name
        assert isinstance(row["speedup"], int) and row["speedup"] > 0, name
    # The oracle is not stepped; every real policy is.
    assert r["policies"]["oracle"]["steps"] == 0
    assert all(r["policies"][n]["steps"] > 0 for n in ("cerebellum_first", "always_on", "timeout"))
    assert is_num(r["setup_s"]) and is_num(r["evaluate_all_s"])


@pytest.mark.timeout(180)
def test_soak_quick() -> None:
    r = run_bench("soak", timeout=150.0)
    assert set(r) == {"minutes", "rate", "frames", "dropped", "overruns", "rss_start_mb",
                      "rss_end_mb", "decisions", "errors", "details"}
    assert r["minutes"] == 0.1 and r["rate"] == 5000.0
    assert isinstance(r["frames"], int) and r["frames"] > 0
    assert isinstance(r["decisions"], int) and r["decisions"] > 0
    assert all(isinstance(r[k], int) and r[k] >= 0 for k in ("dropped", "overruns", "errors"))
    assert is_num(r["rss_start_mb"]) and r["rss_start_mb"] > 0
    assert is_num(r["rss_end_mb"]) and r["rss_end_mb"] > 0
    d = r["details"]
    assert d["exit_code"] == 0  # SIGTERM ended the daemon cleanly
    assert d["critical_fired"] >= 1  # quick mode fires every 3 s over 8 s
    assert d["scrape_errors"] == 0 and d["log_errors"] == [], d


def test_startup_memory_quick() -> None:
    r = run_bench("startup_memory")
    assert set(r) == {"rss_mb", "rss_max_mb", "rss_samples", "pss_mb", "uss_mb", "sim_rss_mb", "start_to_ready_s",
                      "start_to_first_tick_s", "frames", "optimize", "bytecode_warmup_s", "import_ms_total",
                      "import_ms", "imported_modules", "floor_rss_mb", "floor_frames", "rss_over_floor_mb"}
    assert r["optimize"] == 0 and is_num(r["bytecode_warmup_s"]) and r["bytecode_warmup_s"] > 0
    assert is_num(r["rss_mb"]) and 0 < r["rss_mb"] <= r["rss_max_mb"]
    assert isinstance(r["rss_samples"], int) and r["rss_samples"] > 0
    assert is_num(r["uss_mb"]) and 0 < r["uss_mb"] <= r["pss_mb"] <= r["rss_max_mb"]
    assert is_num(r["sim_rss_mb"]) and r["sim_rss_mb"] > 0
    # the baseline of the same run: the same libraries without cerebellumd's code, fed by the plant
    assert isinstance(r["floor_frames"], int) and r["floor_frames"] > 0
    assert is_num(r["floor_rss_mb"]) and 0 < r["floor_rss_mb"] < r["rss_mb"]
    assert r["rss_over_floor_mb"] == round(r["rss_mb"] - r["floor_rss_mb"], 1)
    # READY=1 is sent once the tickers start: the first tick can only follow it
    assert is_num(r["start_to_ready_s"]) and 0 < r["start_to_ready_s"] <= r["start_to_first_tick_s"]
    assert isinstance(r["frames"], int) and r["frames"] > 0  # the plant really fed the daemon
    assert isinstance(r["imported_modules"], int) and r["imported_modules"] > 0
    assert "cerebellumd" in r["import_ms"] and all(is_num(v) and v >= 0 for v in r["import_ms"].values())
    assert r["import_ms_total"] >= max(r["import_ms"].values())
    # the lean install: `run` imports none of the evaluator's packages
    assert not {"numpy", "matplotlib", "rich"} & set(r["import_ms"])


def test_startup_memory_runs_the_daemon_without_docstrings_and_asserts() -> None:
    """PYTHONOPTIMIZE=2 (docs/PERFORMANCE.md: less RSS where installed bytecode is -OO): `run`
    still starts, decodes the plant's frames and decides."""
    r = run_bench("startup_memory", "--optimize", "2")
    assert r["optimize"] == 2 and r["frames"] > 0
    assert is_num(r["start_to_first_tick_s"]) and r["start_to_first_tick_s"] > 0


def test_tick_jitter_runs_report_median_and_spread() -> None:
    r = run_bench("tick_jitter", "--runs", "2", timeout=2 * RUN_TIMEOUT_S)
    assert set(r) == {"runs", "ratio_p99", "ratio_p99_median", "ratio_p99_min", "ratio_p99_max"}
    assert len(r["runs"]) == 2 and [x["ratio_p99"] for x in r["runs"]] == r["ratio_p99"]
    if shutil.which("cyclictest") is not None and all(is_num(x) for x in r["ratio_p99"]):
        assert r["ratio_p99_min"] <= r["ratio_p99_median"] <= r["ratio_p99_max"]
        assert r["ratio_p99_min"] == min(r["ratio_p99"]) and r["ratio_p99_max"] == max(r["ratio_p99"])
