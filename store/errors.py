"""The one base class of every user-facing input error, and the checks that required settings are set and that an
output path can be a directory."""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(ValueError):
    """A problem with what the user passed (a config value, a path, a file on disk); the message names the fix.

    Scripts catch it once and print ``error: <message>``; any other exception is a bug and shows its traceback.
    ``path``: the damaged file, when the problem is one (the pipeline tells from it which stage to redo).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = path


MISSING = "???"  # omegaconf's MISSING: a required config value nobody set


def require(cfg: object, *names: str) -> None:
    """Refuse a config whose required path settings ``names`` are unset (MISSING or empty)."""
    for name in names:
        if getattr(cfg, name) in (MISSING, "", None):
            raise UsageError(f"{name} is required; pass {name}=PATH")


def require_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """``path`` as a Path, refused when it, or the nearest of its parents that exists, is not a directory (a file
    where a run would create its output directory)."""
    path = Path(path)
    there = next((p for p in (path, *path.parents) if p.exists()), None)
    if there is not None and not there.is_dir():
        raise UsageError(f"{key}={path}: {there} is a file, not a directory; choose another {key}, or move that "
                         "file away")
    return path
