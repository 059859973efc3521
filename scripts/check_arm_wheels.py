"""Does every base dependency install on arm without a compiler?

For manylinux aarch64 and armv7l (glibc up to 2.36, Debian bookworm / Raspberry Pi OS 12) and
CPython 3.11, 3.12 and 3.13, asks the package index (pip download --only-binary=:all:
--platform ... --python-version ... --no-deps) for each package of the base install's closure
and reports it as

- wheel: a binary wheel for that platform and Python exists,
- pure: a py3-none-any wheel exists,
- pure-sdist: only an sdist, which builds to a py3-none-any wheel here (no compiler needed),
- missing: neither: pip would compile it on the target.

The closure is what pip resolves for `pip install .` from pyproject's [project].dependencies on
this machine (`pip install --dry-run --ignore-installed --report`), pinned, so every target is
asked about the same versions. Needs the package index (network).

    python scripts/check_arm_wheels.py [--json] [--python 3.11 3.12 3.13] [--arch aarch64 armv7l]
    python scripts/check_arm_wheels.py --with numpy msgpack    # what the [sim] extra would add

Exit status 1 when a dependency is missing somewhere.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GLIBC_MINORS = range(17, 37)  # manylinux_2_17 (= manylinux2014) .. 2_36 (bookworm)
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def base_requirements() -> list[str]:
    deps: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return deps


def closure(requirements: list[str]) -> dict[str, str]:
    """name -> version of what `pip install` resolves for the requirements here."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([*PIP, "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
                        *requirements], check=True, capture_output=True, text=True)
        items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in items}


def platform_args(arch: str, python: str) -> list[str]:
    args = ["--only-binary=:all:", "--no-deps", "--implementation", "cp", "--python-version", python,
            "--abi", "cp" + python.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    tags = [f"manylinux_2_{m}_{arch}" for m in GLIBC_MINORS] + [f"manylinux2014_{arch}"]
    for tag in tags:
        args += ["--platform", tag]
    return args


def _missing_name(stderr: str) -> str | None:
    m = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", stderr)
    return m.group(1).lower().replace("_", "-") if m else None


def check_target(pins: dict[str, str], arch: str, python: str) -> dict[str, str]:
    """package -> wheel | pure | missing for one (arch, python)."""
    result: dict[str, str] = {}
    todo = dict(pins)
    with tempfile.TemporaryDirectory() as tmp:
        while todo:
            cmd = [*PIP, "download", "--quiet", "-d", tmp, *platform_args(arch, python),
                   *(f"{n}=={v}" for n, v in todo.items())]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                break
            name = _missing_name(proc.stderr)
            if name is None or name not in todo:
                raise RuntimeError(f"pip download failed for {arch} {python}: {proc.stderr.strip()[-800:]}")
            result[name] = "missing"
            del todo[name]
        for wheel in Path(tmp).glob("*.whl"):
            name = wheel.name.split("-", 1)[0].lower().replace("_", "-")
            result[name] = "pure" if wheel.name.endswith("-none-any.whl") else "wheel"
    return result


def sdist_is_pure(name: str, version: str) -> bool:
    """Only an sdist on the index: build it here; a py3-none-any wheel means pure Python."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([*PIP, "wheel", "--quiet", "--no-deps", "--no-binary", name, "-w", tmp,
                               f"{name}=={version}"], capture_output=True, text=True)
        return proc.returncode == 0 and all(w.name.endswith("-none-any.whl") for w in Path(tmp).glob("*.whl")) \
            and any(Path(tmp).glob("*.whl"))


def run(arches: list[str], pythons: list[str], extra: list[str]) -> dict[str, Any]:
    pins = closure(base_requirements() + extra)
    pins.pop("cerebellumd", None)
    targets = [(a, p) for a in arches for p in pythons]
    with ThreadPoolExecutor(max_workers=3) as pool:
        found = dict(zip(targets, pool.map(lambda t: check_target(pins, *t), targets), strict=True))
    pure_sdist = {n: sdist_is_pure(n, pins[n]) for n in sorted({n for r in found.values() for n, k in r.items()
                                                               if k == "missing"})}
    table: dict[str, dict[str, str]] = {}
    for name, version in sorted(pins.items()):
        row = {}
        for (arch, python), r in found.items():
            kind = r.get(name, "missing")
            if kind == "missing" and pure_sdist.get(name):
                kind = "pure-sdist"  # builds to a pure wheel: no compiler on the target
            row[f"{arch}/cp{python}"] = kind
        table[f"{name}=={version}"] = row
    missing = sorted(f"{n} ({t})" for n, row in table.items() for t, k in row.items() if k == "missing")
    return {"dependencies": len(table), "targets": [f"{a}/cp{p}" for a, p in targets], "table": table,
            "missing": missing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["aarch64", "armv7l"])
    p.add_argument("--python", nargs="+", default=["3.11", "3.12", "3.13"])
    p.add_argument("--with", dest="extra", nargs="+", default=[], metavar="REQ",
                   help="also check these requirements (e.g. an extra's: numpy msgpack)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a.arch, a.python, a.extra)
    if a.json:
        print(json.dumps(r))
    else:
        width = max(len(n) for n in r["table"])
        print(f"{'dependency':<{width}}  " + "  ".join(f"{t:<16}" for t in r["targets"]))
        for name, row in r["table"].items():
            print(f"{name:<{width}}  " + "  ".join(f"{row[t]:<16}" for t in r["targets"]))
        print(f"{r['dependencies']} dependencies; missing: {', '.join(r['missing']) or 'none'}")
    return 1 if r["missing"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
