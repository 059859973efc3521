"""Rebuild the corpus logs from their public sources (see each PROVENANCE.md).

Not run by the tests: the shipped `drive.log` files are its output. Needs the two source
repositories checked out (paths as arguments) and the `opendbc` package (for the DBCs).

    python tests/data/corpus/build_corpus.py VERIFIEDCAN_CHECKOUT COMMA2K19_CHECKOUT
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cantools
import numpy as np
from opendbc.dbc.generator.generator import generate_all

HERE = Path(__file__).parent


def _line(t: float, arbitration_id: int, data: bytes) -> str:
    ident = f"{arbitration_id:08X}" if arbitration_id > 0x7FF else f"{arbitration_id:03X}"
    return f"({t:.6f}) can0 {ident}#{data.hex().upper()}\n"


def verifiedcan(checkout: Path) -> None:
    out = HERE / "toyota_rav4_2019_verifiedcan"
    src = checkout / "Toyota/Acceleration/2020-02-03-14-31-11-510096__CAN_Message_.csv"
    with src.open(newline="") as f, (out / "drive.log").open("w") as log:
        for row in csv.DictReader(f):
            if row["Bus"] == "0":  # bus 0: the powertrain bus; 1 is the radar's
                log.write(_line(float(row["Time"]), int(row["MessageID"]), bytes.fromhex(row["Message"])))
    (out / "toyota_nodsu_pt_generated.dbc").write_text(generate_all()["toyota_nodsu_pt_generated"])


def comma2k19(checkout: Path) -> None:
    out = HERE / "toyota_rav4_2018_comma2k19"
    seg = checkout / "Example_1/b0c9d2329ad1606b|2018-08-02--08-34-47/40/processed_log/CAN/raw_can"
    address, data, src, t = (np.load(seg / name) for name in ("address", "data", "src", "t"))
    dbc_text = generate_all()["toyota_new_mc_pt_generated"]
    (out / "toyota_new_mc_pt_generated.dbc").write_text(dbc_text)
    lengths = {m.frame_id: m.length for m in cantools.database.load_string(dbc_text, strict=False).messages}
    t0 = 1533198887.0  # 2018-08-02 08:34:47 UTC, the route's start: the arrays hold seconds since boot
    with (out / "drive.log").open("w") as log:
        for a, d, s, ts in zip(address, data, src, t, strict=True):
            if int(s) != 0:  # bus 0 only (1: radar, 128/129: the panda's own sends)
                continue
            # numpy's S8 dtype drops trailing NUL bytes: restore the DBC's length (zeros).
            raw = bytes(d).ljust(lengths.get(int(a), len(bytes(d))), b"\0")
            log.write(_line(t0 + float(ts), int(a), raw))


if __name__ == "__main__":
    verifiedcan(Path(sys.argv[1]))
    comma2k19(Path(sys.argv[2]))
