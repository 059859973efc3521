"""The optional parts of the install (pyproject's extras) and the one message a command gives
when the part it needs is missing.

The base install carries what `cerebellumd run` imports on a gateway. The fast-forward evaluator,
the virtual vehicle of `demo`/`sim`, plots and dask sweeps come with extras; a command that needs
one checks for it first (`require`) instead of failing deep inside an import.
"""

from __future__ import annotations

import importlib
import sys

#: extra -> the top-level modules it provides (pyproject.toml [project.optional-dependencies]).
EXTRAS: dict[str, tuple[str, ...]] = {
    "sim": ("numpy", "rich"),
    "plot": ("matplotlib",),
    "dask": ("distributed",),
    "multicast": ("msgpack",),
}


class MissingExtra(Exception):
    """A command needs an extra that is not installed."""


def require(extra: str, command: str) -> None:
    """Import the extra's modules; MissingExtra naming the pip command if one is absent.

    Only the absence of exactly those modules is turned into the message: an ImportError from
    inside an installed module (a broken install, a bug) propagates unchanged."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise MissingExtra(
                f"cerebellumd {command} needs {module}, which is not installed: "
                f"pip install 'cerebellumd[{extra}]'") from None


def installed(*needs: tuple[str, str]) -> bool:
    """True when every (extra, command) need is installed; else the pip command on stderr."""
    try:
        for extra, command in needs:
            require(extra, command)
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return False
    return True
