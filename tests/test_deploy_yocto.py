"""deploy/yocto: the recipe has what bitbake and the layer index require, installs files that
exist in this repository, and pulls in every runtime dependency of the Python package."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "deploy" / "yocto" / "cerebellumd_0.1.0.bb"
# What only the extras bring (evaluator, plots, udp_multicast): never in the image.
EXTRAS_ONLY = {"python3-numpy", "python3-matplotlib", "python3-rich", "python3-msgpack", "python3-dask"}
# PyPI name -> OpenEmbedded recipe name where it is not python3-<name>
RECIPE_NAMES = {"python-can": "python3-can"}


def variables(text: str) -> dict[str, str]:
    """NAME[:override] = "value" assignments, continuation lines joined."""
    text = text.replace("\\\n", " ")
    out: dict[str, str] = {}
    for m in re.finditer(r'^([A-Za-z_][\w:${}-]*)\s*(\+?=|\?=|:=|\.=)\s*"([^"]*)"', text, re.M):
        out[m.group(1)] = (out.get(m.group(1), "") + " " + m.group(3)).strip()
    return out


def test_required_variables() -> None:
    v = variables(RECIPE.read_text())
    for name in ("SUMMARY", "LICENSE", "LIC_FILES_CHKSUM", "SRC_URI", "SRCREV",
                 "SYSTEMD_SERVICE:${PN}", "RDEPENDS:${PN}", "USERADD_PARAM:${PN}"):
        assert v.get(name), name
    assert v["LICENSE"] == "Apache-2.0"
    assert re.search(r";md5=[0-9a-f]{32}$", v["LIC_FILES_CHKSUM"])
    assert v["SYSTEMD_SERVICE:${PN}"] == "cerebellumd.service"
    assert "cerebellumd" in v["USERADD_PARAM:${PN}"].split()


def test_license_matches_the_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert variables(RECIPE.read_text())["LICENSE"] == project["license"]["text"]


def test_inherits_pep517_systemd_and_useradd() -> None:
    (line,) = [ln for ln in RECIPE.read_text().splitlines() if ln.startswith("inherit ")]
    classes = set(line.split()[1:])
    assert classes & {"python_setuptools_build_meta", "setuptools3"}
    assert {"systemd", "useradd"} <= classes
    backend = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["build-backend"]
    if backend == "setuptools.build_meta":
        assert "python_setuptools_build_meta" in classes


def test_installed_files_exist_in_the_repo() -> None:
    text = RECIPE.read_text()
    sources = re.findall(r"\$\{S\}/(\S+)", text)
    assert "deploy/systemd/cerebellumd.service" in sources
    for rel in sources:
        assert (REPO / rel).is_file(), rel
    assert "${sysconfdir}/cerebellumd/cerebellumd.toml" in text
    assert "${systemd_system_unitdir}" in text


def test_unit_execstart_matches_the_installed_binary() -> None:
    unit = (REPO / "deploy" / "systemd" / "cerebellumd.service").read_text()
    assert "ExecStart=/usr/bin/cerebellumd run --config /etc/cerebellumd/cerebellumd.toml" in unit
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "cerebellumd" in scripts  # setuptools installs it to ${bindir} = /usr/bin


def test_every_python_dependency_is_a_runtime_dependency() -> None:
    rdepends = set(variables(RECIPE.read_text())["RDEPENDS:${PN}"].split())
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        recipe = RECIPE_NAMES.get(name, f"python3-{name}")
        assert recipe in rdepends, f"{dep} missing from RDEPENDS"


def test_image_carries_only_the_runtime() -> None:
    """The recipe's RDEPENDS are the base dependencies (+ the stdlib and paho-mqtt, aiomqtt's own
    dependency that meta-python does not pull by itself), nothing an extra brings."""
    rdepends = set(variables(RECIPE.read_text())["RDEPENDS:${PN}"].split())
    assert not rdepends & EXTRAS_ONLY, rdepends & EXTRAS_ONLY
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    expected = {RECIPE_NAMES.get(n, f"python3-{n}") for n in names}
    assert rdepends - expected <= {"python3-modules", "python3-paho-mqtt", "python3-pyserial"}, rdepends - expected


def test_readme_explains_layer_and_image() -> None:
    readme = (REPO / "deploy" / "yocto" / "README.md").read_text()
    for needle in ("layer.conf", "bitbake-layers add-layer", "IMAGE_INSTALL", "S32G", "bbappend"):
        assert needle in readme
