"""A scene set on disk: rendered tabletop images labelled by the simulator, for vision-language pretraining.

Under ``root/``:
    data/chunk-CCC.parquet   one row per scene: index, split ("train" | "val"), seed, image (PNG bytes),
                             state (7 floats: the tip's proprio state), names (object labels, e.g. "red cube"),
                             positions (3 floats per object: x, y, z in metres, table frame)
    meta.json                config, scene counts per split, the tasks' instruction templates (with {target} and
                             {base}: what a model pretrained on the set will be asked); written LAST, so its presence
                             marks a complete set

Chunks are written atomically, so an interrupted generation resumes from the chunks already on disk.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from store.errors import UsageError
from store.files import write_json, write_parquet
from store.intact import read_json, read_parquet, reading

META_FILE = "meta.json"
FIX = "delete the set and generate it again with scripts/generate_scenes.py"
CHUNK_PATH = "data/chunk-{:03d}.parquet"
SCHEMA = pa.schema([
    ("index", pa.int64()), ("split", pa.string()), ("seed", pa.int64()), ("image", pa.binary()),
    ("state", pa.list_(pa.float32())), ("names", pa.list_(pa.string())), ("positions", pa.list_(pa.float32())),
])


class SceneSetError(UsageError):
    """A scene set on disk is missing, incomplete or corrupt; the message names the fix."""


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_chunk(root: Path, chunk: int, rows: list[dict]) -> None:
    """Rows of {"index", "split", "seed", "image" (H, W, 3) uint8, "state" (7,), "names" [N], "positions" (N, 3)}."""
    columns = {
        "index": [r["index"] for r in rows], "split": [r["split"] for r in rows], "seed": [r["seed"] for r in rows],
        "image": [encode_png(r["image"]) for r in rows],
        "state": [np.asarray(r["state"], np.float32).tolist() for r in rows],
        "names": [list(r["names"]) for r in rows],
        "positions": [np.asarray(r["positions"], np.float32).ravel().tolist() for r in rows],
    }
    write_parquet(root / CHUNK_PATH.format(chunk), pa.table(columns, schema=SCHEMA))


def done_chunks(root: Path) -> set[int]:
    """The chunks on disk, each checked to be whole (its parquet footer reads)."""
    done = set()
    for path in (root / "data").glob("chunk-*.parquet"):
        with reading(path, f"delete it (and {META_FILE}, if the set is complete) and rerun "
                           "scripts/generate_scenes.py, which renders it again"):
            pq.read_metadata(path)
        done.add(int(path.stem.split("-")[1]))
    return done


def finalize(root: Path, config: dict, counts: dict[str, int], templates: list[str]) -> dict:
    meta = {"config": config, "counts": counts, "templates": templates, "chunks": len(done_chunks(root))}
    write_json(root / META_FILE, meta)
    return meta


def stored_config(root: Path) -> dict | None:
    """The config of the complete set at ``root`` (None: nothing complete there)."""
    if not (root / META_FILE).is_file():
        return None
    with reading(root / META_FILE, FIX, (KeyError, TypeError)):
        return read_json(root / META_FILE, FIX)["config"]


class SceneSet:
    """Reader: every scene's labels in memory, images decoded on access; ``split(name)`` lists its scene indices."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / META_FILE).is_file():
            raise SceneSetError(f"{self.root} holds no complete scene set ({META_FILE} is missing); generate it with "
                                "scripts/generate_scenes.py (rerun the same command to resume)")
        self.meta = read_json(self.root / META_FILE, FIX)
        with reading(self.root / META_FILE, FIX, (KeyError, TypeError)):
            self.templates: list[str] = self.meta["templates"]
            chunks = range(self.meta["chunks"])
        tables = [read_parquet(self.root / CHUNK_PATH.format(c), FIX) for c in chunks]
        table = pa.concat_tables(tables)
        self._images = table["image"].combine_chunks()
        self.splits = np.asarray(table["split"].to_pylist())
        self.states = np.asarray(table["state"].to_pylist(), np.float32)  # (N, 7)
        self.names = table["names"].to_pylist()
        self.positions = [np.asarray(p, np.float32).reshape(-1, 3) for p in table["positions"].to_pylist()]

    def __len__(self) -> int:
        return len(self.splits)

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8."""
        return np.asarray(Image.open(io.BytesIO(self._images[i].as_py())).convert("RGB"))

    def split(self, name: str) -> list[int]:
        return np.flatnonzero(self.splits == name).tolist()
