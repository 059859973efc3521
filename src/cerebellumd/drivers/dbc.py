"""Loading a DBC as the daemon, `check` and `replay` all do: `builtin:NAME` for a shipped one,
else a path (relative to the working directory)."""

from __future__ import annotations

from importlib import resources

import cantools
from cantools.database.can import Database


def load_dbc(spec: str, strict: bool = True) -> Database:
    """Blocking (file I/O): call it off the loop."""
    if spec.startswith("builtin:"):
        text = resources.files("cerebellumd").joinpath("data", spec.removeprefix("builtin:")).read_text("utf-8")
        db = cantools.database.load_string(text, database_format="dbc", strict=strict)
    else:
        db = cantools.database.load_file(spec, strict=strict)
    if not isinstance(db, Database):
        raise ValueError(f"{spec}: not a CAN database")
    return db
