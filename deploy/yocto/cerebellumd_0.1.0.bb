SUMMARY = "Cerebellum-first power manager for a vehicle gateway's AI accelerator"
DESCRIPTION = "cerebellumd listens to CAN, automotive Ethernet (SOME/IP) and a companion MCU, \
wakes the AI accelerator only for challenges and puts it back to the deepest sleep that pays \
off, and exports per-domain power and energy to Prometheus and MQTT."
HOMEPAGE = "https://github.com/cerebellumd/cerebellumd"
SECTION = "console/utils"
LICENSE = "Apache-2.0"
# The project declares Apache-2.0 in pyproject.toml; until the source tree carries a LICENSE
# file, checksum the common licence text (switch to file://LICENSE;md5=... then).
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "git://github.com/cerebellumd/cerebellumd.git;protocol=https;branch=main"
# Pin the release commit (bitbake refuses AUTOREV in release builds of most distros).
SRCREV = "${AUTOREV}"
PV = "0.1.0+git"
S = "${WORKDIR}/git"

# pyproject.toml with setuptools.build_meta: a PEP 517 build into a wheel, then installed.
inherit python_setuptools_build_meta systemd useradd

DEPENDS += "python3-setuptools-native python3-wheel-native"

# Runtime: exactly pyproject.toml [project].dependencies, what `cerebellumd run` imports (recipes
# from meta-openembedded/meta-python unless noted; see README.md for the ones you may have to add).
# The extras stay off the target: numpy and rich ([sim]: evaluate, sweep, demo, sim),
# matplotlib ([plot]), dask, msgpack ([multicast]: python-can's udp_multicast, a bench transport).
# python3-modules = the whole standard library (asyncio, ctypes, tomllib, ...); trim it to the
# split packages your Python release has once the image is measured.
# ExecReload= uses /bin/kill (busybox, procps or util-linux provide it in any image).
RDEPENDS:${PN} += " \
    python3-modules \
    python3-can \
    python3-cantools \
    python3-aiomqtt \
    python3-paho-mqtt \
    python3-pyserial \
    python3-pyserial-asyncio-fast \
    python3-prometheus-client \
    python3-pydantic \
    python3-sdnotify \
"
# GPIO accelerator control (libgpiod v2 bindings) and uvloop are optional extras.
RRECOMMENDS:${PN} += "python3-gpiod python3-uvloop can-utils iproute2"

# The service user (the unit runs as User=cerebellumd) and the GPIO group it needs.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system gpio"
USERADD_PARAM:${PN} = "--system --user-group --groups gpio --home-dir /var/lib/cerebellumd \
    --no-create-home --shell /sbin/nologin cerebellumd"

SYSTEMD_SERVICE:${PN} = "cerebellumd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/deploy/systemd/cerebellumd.service ${D}${systemd_system_unitdir}/

    # The configuration: /etc/cerebellumd/cerebellumd.toml, readable by the service only.
    # Replace it from your BSP layer with a bbappend (FILESEXTRAPATHS + file://cerebellumd.toml).
    install -d -m 0750 ${D}${sysconfdir}/cerebellumd
    install -m 0640 ${S}/examples/demo.toml ${D}${sysconfdir}/cerebellumd/cerebellumd.toml
    chown -R root:cerebellumd ${D}${sysconfdir}/cerebellumd
}

FILES:${PN} += " \
    ${systemd_system_unitdir}/cerebellumd.service \
    ${sysconfdir}/cerebellumd \
"
CONFFILES:${PN} = "${sysconfdir}/cerebellumd/cerebellumd.toml"
