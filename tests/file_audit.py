"""One audit hook (and ``forbidden`` loaders) for the tests that prove a folder is never opened or
listed (e.g. the weights before an input or a setting is refused): add the folder to ``WATCHED``,
read ``SEEN`` afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

WATCHED: list[str] = []  # folders nothing may open or list while a test runs
SEEN: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if WATCHED and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, Path)):
        path = os.path.abspath(os.fspath(args[0]))
        if any(path.startswith(folder) for folder in WATCHED):
            SEEN.append(f"{event} {path}")


sys.addaudithook(_audit)  # installed once per process, whichever test module imports this first


def forbidden(called: list[str], what: str, when: str):
    """A stand-in for a loader that must not run: records ``what`` in ``called`` and fails."""
    def fail(*args, **kwargs):
        called.append(what)
        raise AssertionError(f"{what} called {when}")
    return fail
