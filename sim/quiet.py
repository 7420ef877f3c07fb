"""Silence what C code prints: PyBullet writes ``pybullet build time: ...`` to stderr when imported and ``argv[0]=``
to stdout on every connect, with ``printf`` in its extension module; no PyBullet option turns either off."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager


def _flush() -> None:
    """Write out Python's and C's buffers (C's stdout to a pipe is block-buffered: it would flush much later)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    ctypes.CDLL(None).fflush(None)


@contextmanager
def _to_devnull(fd: int) -> Iterator[None]:
    try:
        saved = os.dup(fd)
    except OSError:  # the descriptor is closed: there is nothing to print to
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        _flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


@contextmanager
def quiet(*fds: int) -> Iterator[None]:
    """Send file descriptors ``fds`` (1: stdout, 2: stderr) to /dev/null while the block runs; restored on exit,
    on error too.

    Everything written to them in the block is lost, Python's own prints (of any thread) included, so keep the
    block to the C call that needs it. An exception raised in the block still shows: it is printed after.
    """
    _flush()
    with ExitStack() as stack:
        for fd in fds:
            stack.enter_context(_to_devnull(fd))
        yield
