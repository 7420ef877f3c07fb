"""Atomic writes, the one place for them: a reader sees the old file (or directory) or the new one, never half."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then move it onto ``path`` with os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON indented by 2 (the run summaries, metrics, state files)."""
    write_text(path, json.dumps(obj, indent=2))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda p: pq.write_table(table, p))


def write_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    """The directory variant: call ``write(tmp)`` on ``.tmp-<name>`` beside ``target``, fsync its files, then move
    it onto ``target`` (replacing a directory already there)."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for file in tmp.iterdir():
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
    if target.exists():  # a stale directory of our own run: os.replace cannot replace a non-empty one
        stale = target.with_name(f".tmp-stale-{target.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        shutil.rmtree(stale)
    os.replace(tmp, target)
