"""A plain install must work without the source tree: the wheel carries the drive cycles with
their provenance, the DBC, the accelerator profiles and the example configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_wheel_ships_every_data_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob("cerebellumd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "cerebellumd"
    expected = {
        "cerebellumd/" + str(p.relative_to(package))
        for p in package.rglob("*")
        if p.is_file() and p.suffix in {".csv", ".md", ".dbc", ".toml"} and "__pycache__" not in p.parts
    }
    assert expected, "no data files found in the source tree"
    assert expected <= names, sorted(expected - names)
    assert {"cerebellumd/sim/cycles/PROVENANCE.md", "cerebellumd/examples/demo.toml",
            "cerebellumd/data/vehicle.dbc", "cerebellumd/data/profiles/orin_nano.toml"} <= names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cerebellumd = cerebellumd.cli:main" in entry_points
