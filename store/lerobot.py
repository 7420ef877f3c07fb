"""The LeRobot v3.0 dataset layout (written without the `lerobot` package), its episodes and its reader.

On disk, under `root/`:
    meta/info.json                              totals, fps, features, path templates; written LAST, so its
                                                presence marks a complete dataset
    meta/stats.json                             min/max/mean/std/count/q01/q99 per feature
    meta/tasks.parquet                          task_index, task (the language instruction)
    meta/episodes/chunk-000/file-000.parquet    one row per episode (frame range, seed, success, safety/*)
    data/chunk-CCC/file-FFF.parquet             one row per frame; images are PNG bytes in a `datasets.Image` struct
    .staging/                                   only while writing: config.json + one parquet per finished episode

`store.writer.DatasetWriter` writes it crash-safely, `LeRobotDataset` reads it, `store.validate` checks it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from store import intact
from store.errors import UsageError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory
VIDEO_FILES_SIZE_IN_MB = 500
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
IMAGE_KEY = "observation.images.front"
FEATURE_KEYS = (IMAGE_KEY, "observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                "task_index", "next.done")
OBJECTS_KEY = "observation.object_positions"  # optional: every object's (x, y, z) per frame, OBJECT_SLOTS slots
OBJECT_SLOTS = 6  # object positions per frame; an episode with fewer objects pads with zeros
STAT_KEYS = ("min", "max", "mean", "std", "count", "q01", "q99")
FIX = "regenerate the dataset or run scripts/validate_dataset.py"


class DatasetError(UsageError):
    """A dataset on disk (or an episode handed to the writer) is wrong; the message names the problem and the fix."""


@dataclass
class Episode:
    """One recorded demonstration; T frames, state size S, action size A."""

    task: str  # task name, e.g. "pick"
    instruction: str  # language instruction, e.g. "pick up the red cube"
    seed: int
    success: bool
    images: np.ndarray  # (T, H, W, 3) uint8, front camera
    states: np.ndarray  # (T, S) float32 proprio state
    actions: np.ndarray  # (T, A) float32 action taken at each frame
    safety: dict[str, float] = field(default_factory=dict)  # episode totals of safety events
    # Optional simulator labels of the scene, for grounding: the objects' labels ("red cube"), their positions per
    # frame (T, N, 3) in metres and which of them the instruction names.
    objects: list[str] = field(default_factory=list)
    object_positions: np.ndarray | None = None
    target_index: int | None = None


def is_complete(root: str | Path) -> bool:
    """True when `root` holds a finalized dataset (meta/info.json is written last)."""
    return (Path(root) / "meta/info.json").is_file()


def compute_stats(array: np.ndarray) -> dict[str, list]:
    """Per-dimension min, max, mean, std, q01, q99 of `array` (N, D) or (N,), as lists of D floats; count is [N]."""
    a = np.asarray(array, dtype=np.float64)
    a = a[:, None] if a.ndim == 1 else a
    if a.ndim != 2 or len(a) == 0:
        raise DatasetError(f"compute_stats needs a non-empty (N, D) array, got shape {a.shape}; stack frames first")
    return {
        "min": a.min(0).tolist(), "max": a.max(0).tolist(), "mean": a.mean(0).tolist(), "std": a.std(0).tolist(),
        "count": [len(a)], "q01": np.quantile(a, 0.01, axis=0).tolist(), "q99": np.quantile(a, 0.99, axis=0).tolist(),
    }


def read_json(path: Path) -> Any:
    return intact.read_json(path, FIX, DatasetError)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    return intact.read_parquet(path, FIX, columns, DatasetError)


def to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column of N rows as an (N, D) array; a scalar column as (N,)."""
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return np.asarray(arr.flatten()).reshape(len(arr), arr.type.list_size)
    return np.asarray(arr)


class LeRobotDataset:
    """Frame-indexed reader of a finalized dataset; states/actions are held in memory, images decoded on access."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} is not a directory; check the path or generate the dataset first")
        if not is_complete(self.root):
            raise DatasetError(f"{self.root / 'meta/info.json'} is missing, so the dataset is incomplete; "
                               "rerun generation with the same config to resume, or run scripts/validate_dataset.py")
        self.info: dict = read_json(self.root / "meta/info.json")
        self.stats: dict = read_json(self.root / "meta/stats.json")
        for name, meta in (("info", self.info), ("stats", self.stats)):
            if not isinstance(meta, dict):
                raise DatasetError(f"{self.root / f'meta/{name}.json'} holds no JSON object; {FIX}",
                                   path=self.root / f"meta/{name}.json")
        lacking = [k for k in ("data_path", "features", "fps") if k not in self.info]
        if lacking:
            raise DatasetError(f"{self.root / 'meta/info.json'} lacks keys {lacking}; {FIX}",
                               path=self.root / "meta/info.json")
        tasks = sorted(read_parquet(self.root / "meta/tasks.parquet", ["task_index", "task"]).to_pylist(),
                       key=lambda r: r["task_index"])
        self._instructions = [r["task"] for r in tasks]
        self.episodes: list[dict] = read_parquet(self.root / EPISODES_PATH).to_pylist()
        files = sorted({(e["data/chunk_index"], e["data/file_index"]) for e in self.episodes})
        self._files = [self.root / self.info["data_path"].format(chunk_index=c, file_index=f) for c, f in files]
        names = ["observation.state", "action", "episode_index", "frame_index", "index", "task_index"]
        names += [OBJECTS_KEY] if OBJECTS_KEY in self.info["features"] else []
        tables = [read_parquet(p, names) for p in self._files]
        self._file_starts = np.cumsum([0] + [t.num_rows for t in tables])  # (files + 1,)
        # Every frame's state, action and indices, held in memory: (N, S), (N, A) and (N,) arrays.
        self.columns: dict[str, np.ndarray] = {k: to_numpy(pa.chunked_array([c for t in tables for c in t[k].chunks],
                                                       type=tables[0].schema.field(k).type)) for k in names}
        self._images: dict[int, pa.BinaryArray] = {}

    def __len__(self) -> int:
        return int(self._file_starts[-1])

    def _png(self, i: int) -> bytes:
        f = int(np.searchsorted(self._file_starts, i, side="right")) - 1
        if f not in self._images:
            self._images[f] = read_parquet(self._files[f], [IMAGE_KEY])[IMAGE_KEY].combine_chunks().field("bytes")
        return self._images[f][i - int(self._file_starts[f])].as_py()

    def __getitem__(self, i: int) -> dict:
        """Frame i: image (H, W, 3) uint8, state (S,) float32, action (A,) float32, instruction, indices, and for a
        dataset with object labels ``object_positions`` (N, 3) of the episode's N objects."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        i %= len(self)
        cols = self.columns
        item = {
            "image": np.asarray(Image.open(io.BytesIO(self._png(i))).convert("RGB")),
            "state": cols["observation.state"][i].copy(), "action": cols["action"][i].copy(),
            "instruction": self._instructions[cols["task_index"][i]],
            "episode_index": int(cols["episode_index"][i]), "frame_index": int(cols["frame_index"][i]),
        }
        if OBJECTS_KEY in cols:
            n = len(self.episodes[item["episode_index"]]["objects"])
            item["object_positions"] = cols[OBJECTS_KEY][i].reshape(OBJECT_SLOTS, 3)[:n].copy()
        return item

    def episode_frames(self, ep: int) -> range:
        """Global frame indices of episode `ep`."""
        row = self.episodes[ep]
        return range(row["dataset_from_index"], row["dataset_to_index"])

    @property
    def instructions(self) -> list[str]:
        """Unique instructions, ordered by task_index."""
        return list(self._instructions)
