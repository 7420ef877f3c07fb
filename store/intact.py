"""Reading files that may be truncated or corrupt: a JSON file that parses, a parquet table with its footer, a
safetensors file whose header covers it. A damaged file becomes one ``UsageError`` that names it, says what is wrong
and gives the caller's fix, instead of the library's traceback (json's, pyarrow's, safetensors')."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError, safe_open

from store.errors import UsageError

# What the readers raise for a damaged file: OSError (a short read, transformers' "not a valid JSON file"),
# ValueError (json's JSONDecodeError, pyarrow's ArrowInvalid), the rest of pyarrow's errors, safetensors' header error.
DAMAGE = (OSError, ValueError, pa.ArrowException, SafetensorError)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def reading(path: str | os.PathLike, fix: str, errors: tuple[type[BaseException], ...] = DAMAGE,
            error: type[UsageError] = UsageError) -> Iterator[None]:
    """Turn ``errors`` raised in the block, which reads ``path``, into an ``error`` (a UsageError) naming ``path``
    and ``fix``; a UsageError raised in it passes unchanged."""
    try:
        yield
    except UsageError:
        raise
    except errors as e:
        raise error(f"{path} is corrupt or truncated ({first_line(e)}); {fix}", path=path) from None


def read_json(path: str | os.PathLike, fix: str, error: type[UsageError] = UsageError) -> Any:
    """The parsed JSON file ``path``; a missing, truncated or corrupt one is refused with ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing; {fix}", path=path)
    with reading(path, fix, error=error):
        return json.loads(path.read_text())


def read_parquet(path: str | os.PathLike, fix: str, columns: list[str] | None = None,
                 error: type[UsageError] = UsageError) -> pa.Table:
    """The parquet table ``path`` (only ``columns``, when given); a missing, truncated or corrupt one (or one that
    lacks a column) is refused with ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing; {fix}", path=path)
    with reading(path, fix, error=error):
        return pq.read_table(path, columns=columns)


def check_files(root: str | os.PathLike, fix: str) -> None:
    """Refuse, with ``fix``, a directory (a checkpoint) holding a ``*.json`` that does not parse or a
    ``*.safetensors`` whose header is damaged or does not cover the file (one cut short). Reads the JSON files and
    the safetensors headers only."""
    root = Path(root)
    for file in sorted(root.glob("*.json")):
        read_json(file, fix)
    for file in sorted(root.glob("*.safetensors")):
        with reading(file, fix), safe_open(file, framework="numpy"):
            pass
