"""Crash-safe writer, reader and validator for a LeRobot v3.0 layout dataset (without the `lerobot` package).

On disk, under `root/`:
    meta/info.json                              totals, fps, features, path templates; written LAST, so its
                                                presence marks a complete dataset
    meta/stats.json                             min/max/mean/std/count/q01/q99 per feature
    meta/tasks.parquet                          task_index, task (the language instruction)
    meta/episodes/chunk-000/file-000.parquet    one row per episode (frame range, seed, success, safety/*)
    data/chunk-CCC/file-FFF.parquet             one row per frame; images are PNG bytes in a `datasets.Image` struct
    .staging/                                   only while writing: config.json + one parquet per finished episode

Every file is written to a temp file in its own directory and moved into place with `os.replace`, so a reader
never sees a half-written file, and an interrupted generation resumes from the episodes already staged.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory
VIDEO_FILES_SIZE_IN_MB = 500
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
IMAGE_KEY = "observation.images.front"
_FEATURE_KEYS = (IMAGE_KEY, "observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                 "task_index", "next.done")
STAT_KEYS = ("min", "max", "mean", "std", "count", "q01", "q99")
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_EPISODE_META = b"tabletop_vla_episode"
_FIX = "regenerate the dataset or run scripts/validate_dataset.py"


class DatasetError(ValueError):
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


def _image_stats(hist: np.ndarray, frames: int) -> dict[str, list]:
    """Exact per-channel stats of pixel values scaled to [0, 1] from a (3, 256) histogram; values shaped [3, 1, 1].

    q01/q99 are the lower inverse-CDF quantiles (a pixel value, not interpolated); count is [frames].
    """
    values = np.arange(256) / 255.0
    n = hist.sum(1)  # (3,)
    mean = (hist * values).sum(1) / n
    std = np.sqrt(np.maximum((hist * values**2).sum(1) / n - mean**2, 0.0))
    cdf = np.cumsum(hist, 1) / n[:, None]  # (3, 256)
    out = {
        "min": values[np.argmax(hist > 0, 1)], "max": values[255 - np.argmax(hist[:, ::-1] > 0, 1)],
        "mean": mean, "std": std, "q01": values[np.argmax(cdf >= 0.01, 1)], "q99": values[np.argmax(cdf >= 0.99, 1)],
    }
    return {**{k: v.reshape(3, 1, 1).tolist() for k, v in out.items()}, "count": [frames]}


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then move it onto `path` with os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n"))


def _write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda p: pq.write_table(table, p))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing; {_FIX}") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is corrupt ({e}); {_FIX}") from None


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; {_FIX}")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); {_FIX}") from None


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column of N rows as an (N, D) array; a scalar column as (N,)."""
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return np.asarray(arr.flatten()).reshape(len(arr), arr.type.list_size)
    return np.asarray(arr)


def _features(image_shape: list[int], state_names: list[str], action_names: list[str]) -> dict[str, dict]:
    """LeRobot `features` for info.json; shapes are lists, scalars have shape [1]."""
    def scalar(dtype: str) -> dict:
        return {"dtype": dtype, "shape": [1], "names": None}

    return {
        IMAGE_KEY: {"dtype": "image", "shape": list(image_shape), "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)},
        "action": {"dtype": "float32", "shape": [len(action_names)], "names": list(action_names)},
        "timestamp": scalar("float32"), "frame_index": scalar("int64"), "episode_index": scalar("int64"),
        "index": scalar("int64"), "task_index": scalar("int64"), "next.done": scalar("bool"),
    }


def _data_schema(features: dict[str, dict]) -> pa.Schema:
    """Arrow schema of a data file, with the `datasets` feature JSON under b"huggingface" so images decode to PIL."""
    fields, hf = [], {}
    for key, ft in features.items():
        if ft["dtype"] == "image":
            fields.append(pa.field(key, _IMAGE_TYPE))
            hf[key] = {"_type": "Image"}
        elif ft["shape"] == [1]:
            fields.append(pa.field(key, pa.from_numpy_dtype(np.dtype(ft["dtype"]))))
            hf[key] = {"dtype": ft["dtype"], "_type": "Value"}
        else:  # "Sequence" with a length is read by datasets 3.x and 4.x+ alike (fixed_size_list in arrow)
            fields.append(pa.field(key, pa.list_(pa.from_numpy_dtype(np.dtype(ft["dtype"])), ft["shape"][0])))
            value = {"dtype": ft["dtype"], "_type": "Value"}
            hf[key] = {"_type": "Sequence", "feature": value, "length": ft["shape"][0]}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": hf}})})


def _episode_table(ep: Episode, fps: int, state_dim: int, action_dim: int) -> pa.Table:
    """Validate `ep` and turn it into the staged per-episode table (PNG images, per-frame columns, metadata)."""
    images = np.asarray(ep.images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise DatasetError(f"episode images must be (T, H, W, 3) uint8 with T >= 1, got {images.shape} {images.dtype}; "
                           "record RGB frames as uint8")
    T = len(images)
    arrays = {}
    for name, value, dim in (("states", ep.states, state_dim), ("actions", ep.actions, action_dim)):
        arrays[name] = np.asarray(value, dtype=np.float32)
        if arrays[name].shape != (T, dim):
            raise DatasetError(f"episode {name} have shape {arrays[name].shape}, expected ({T}, {dim}) "
                               f"(one row per image, {dim} names given to the writer); record one per frame")
        if not np.isfinite(arrays[name]).all():
            raise DatasetError(f"episode {name} contain NaN or inf; fix the recorder before writing")
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    hist = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)])  # (3, 256)
    meta = {"task": ep.task, "instruction": ep.instruction, "seed": int(ep.seed), "success": bool(ep.success),
            "safety": {k: float(v) for k, v in ep.safety.items()}, "image_shape": list(images.shape[1:]),
            "image_hist": hist.tolist()}
    return pa.table({
        IMAGE_KEY: pa.array(pngs, type=_IMAGE_TYPE),
        "observation.state": pa.FixedSizeListArray.from_arrays(arrays["states"].ravel(), state_dim),
        "action": pa.FixedSizeListArray.from_arrays(arrays["actions"].ravel(), action_dim),
        "timestamp": (np.arange(T) / fps).astype(np.float32),  # seconds
        "frame_index": np.arange(T, dtype=np.int64),
        "next.done": np.arange(T) == T - 1,
    }).replace_schema_metadata({_EPISODE_META: json.dumps(meta)})


class DatasetWriter:
    """Stages episodes one file each (crash-safe, any order), then `finalize()` packs them into the v3.0 layout.

    A new writer on a root that already holds the same dataset (by config, fps, names and robot type) resumes;
    a different one raises DatasetError and touches nothing.
    """

    def __init__(self, root: str | Path, *, fps: int, state_names: list[str], action_names: list[str],
                 config: dict, robot_type: str = "franka_panda", data_files_size_in_mb: int = 100):
        self.root = Path(root)
        self.data_files_size_in_mb = data_files_size_in_mb
        self._staging = self.root / ".staging"
        try:
            config = json.loads(json.dumps(config, sort_keys=True))
        except TypeError as e:
            raise DatasetError(f"config is not JSON-serialisable ({e}); pass plain data (dataclasses.asdict)") from None
        self.spec = {"config": config, "fps": fps, "robot_type": robot_type,
                     "state_names": list(state_names), "action_names": list(action_names)}
        stored = self._stored_spec()
        if stored is None:
            if (self.root / "data").exists() or (self.root / "meta").exists():
                raise DatasetError(f"{self.root} holds data/ or meta/ of an unknown dataset; "
                                   "choose another output_dir or delete it")
            _write_json(self._staging / "config.json", self.spec)
        elif stored != self.spec:
            diff = [k for k in sorted(set(config) | set(stored["config"])) if config.get(k) != stored["config"].get(k)]
            diff += [k for k in self.spec if k != "config" and self.spec[k] != stored[k]]
            raise DatasetError(f"{self.root} holds a different dataset (config differs in keys: {', '.join(diff)}); "
                               "choose another output_dir or delete it")

    def _stored_spec(self) -> dict | None:
        if is_complete(self.root):
            info = _read_json(self.root / "meta/info.json")
            feats = info.get("features", {})  # .get: a foreign dataset must fail as "different", not KeyError
            return {"config": info.get("tabletop_vla", {}).get("config", {}), "fps": info.get("fps"),
                    "robot_type": info.get("robot_type"),
                    "state_names": feats.get("observation.state", {}).get("names"),
                    "action_names": feats.get("action", {}).get("names")}
        if (self._staging / "config.json").is_file():
            return _read_json(self._staging / "config.json")
        return None

    def _staged_path(self, index: int) -> Path:
        return self._staging / f"episode-{index:06d}.parquet"

    def done_indices(self) -> set[int]:
        """Episode indices already safely written (staged, or packed into a finalized dataset)."""
        if is_complete(self.root):
            return set(range(_read_json(self.root / "meta/info.json")["total_episodes"]))
        return {int(p.stem.split("-")[1]) for p in self._staging.glob("episode-*.parquet")}

    def write_episode(self, index: int, episode: Episode) -> None:
        """Stage episode `index` atomically; rewriting an index replaces it. Indices may arrive in any order."""
        if is_complete(self.root):
            raise DatasetError(f"{self.root} is already finalized; write new episodes to another output_dir")
        if index < 0:
            raise DatasetError(f"episode index must be >= 0, got {index}; number episodes 0..N-1")
        table = _episode_table(episode, self.spec["fps"], len(self.spec["state_names"]), len(self.spec["action_names"]))
        _write_parquet(self._staged_path(index), table)

    def finalize(self) -> dict:
        """Pack staged episodes 0..N-1 into data/ and meta/, write meta/info.json last, drop staging; return info."""
        if is_complete(self.root):  # already done; a crash may have left the staging dir behind
            shutil.rmtree(self._staging, ignore_errors=True)
            return _read_json(self.root / "meta/info.json")
        staged = sorted(self.done_indices())
        missing = sorted(set(range(staged[-1] + 1)) - set(staged)) if staged else [0]
        if missing:
            raise DatasetError(f"cannot finalize {self.root}: episodes must be 0..N-1 but {missing[:10]} are missing; "
                               "write them first (rerun generation to resume)")
        for leftover in ("data", "meta"):  # from a finalize that was interrupted before info.json
            shutil.rmtree(self.root / leftover, ignore_errors=True)

        spec, tasks, episodes = self.spec, {}, []
        states, actions, hist = [], [], np.zeros((3, 256), np.int64)
        features = schema = None
        pending, pending_bytes, chunk, file, start = [], 0, 0, 0, 0

        def flush() -> None:
            _write_parquet(self.root / DATA_PATH.format(chunk_index=chunk, file_index=file), pa.concat_tables(pending))

        for index in staged:
            table = _read_parquet(self._staged_path(index))
            meta = json.loads(table.schema.metadata[_EPISODE_META])
            if features is None:
                features = _features(meta["image_shape"], spec["state_names"], spec["action_names"])
                schema = _data_schema(features)
            elif meta["image_shape"] != features[IMAGE_KEY]["shape"]:
                raise DatasetError(f"episode {index} has images {meta['image_shape']} but episode 0 has "
                                   f"{features[IMAGE_KEY]['shape']}; render every episode at one camera resolution")
            if pending and pending_bytes >= self.data_files_size_in_mb * 2**20:
                flush()
                pending, pending_bytes = [], 0
                chunk, file = (chunk + 1, 0) if file + 1 == CHUNKS_SIZE else (chunk, file + 1)
            T, task_index = table.num_rows, tasks.setdefault(meta["instruction"], len(tasks))
            columns = {k: table[k] for k in table.column_names}
            columns.update(episode_index=np.full(T, index, np.int64), index=np.arange(start, start + T, dtype=np.int64),
                           task_index=np.full(T, task_index, np.int64))
            pending.append(pa.table({k: columns[k] for k in schema.names}, schema=schema))
            pending_bytes += pending[-1].nbytes
            states.append(_to_numpy(table["observation.state"]))
            actions.append(_to_numpy(table["action"]))
            hist += np.asarray(meta["image_hist"], np.int64)
            episodes.append({
                "episode_index": index, "tasks": [meta["instruction"]], "length": T,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": start, "dataset_to_index": start + T,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                "task_name": meta["task"], "instruction": meta["instruction"], "seed": meta["seed"],
                "success": meta["success"], "safety": meta["safety"],
            })
            start += T
        flush()

        safety_keys = sorted({k for ep in episodes for k in ep["safety"]})
        rows = [{**{k: v for k, v in ep.items() if k != "safety"},
                 **{f"safety/{k}": ep["safety"].get(k) for k in safety_keys}} for ep in episodes]
        _write_parquet(self.root / EPISODES_PATH, pa.Table.from_pylist(rows))
        _write_parquet(self.root / "meta/tasks.parquet", _tasks_table(list(tasks)))
        _write_json(self.root / "meta/stats.json", {
            "observation.state": compute_stats(np.concatenate(states)),
            "action": compute_stats(np.concatenate(actions)),
            IMAGE_KEY: _image_stats(hist, start),
        })
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": spec["robot_type"],
            "total_episodes": len(episodes), "total_frames": start, "total_tasks": len(tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": self.data_files_size_in_mb,
            "video_files_size_in_mb": VIDEO_FILES_SIZE_IN_MB, "fps": spec["fps"],
            "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH, "video_path": None,
            "features": features, "tabletop_vla": {"config": spec["config"]},
        }
        _write_json(self.root / "meta/info.json", info)
        shutil.rmtree(self._staging)
        return info


def _tasks_table(instructions: list[str]) -> pa.Table:
    """meta/tasks.parquet: columns task_index, task; pandas metadata makes `task` the index, as LeRobot reads it."""
    pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": [
        {"name": n, "field_name": n, "pandas_type": pandas_type, "numpy_type": numpy_type, "metadata": None}
        for n, pandas_type, numpy_type in (("task_index", "int64", "int64"), ("task", "unicode", "object"))
    ]}
    table = pa.table({"task_index": pa.array(range(len(instructions)), pa.int64()), "task": instructions})
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


class LeRobotDataset:
    """Frame-indexed reader of a finalized dataset; states/actions are held in memory, images decoded on access."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} is not a directory; check the path or generate the dataset first")
        if not is_complete(self.root):
            raise DatasetError(f"{self.root / 'meta/info.json'} is missing, so the dataset is incomplete; "
                               "rerun generation with the same config to resume, or run scripts/validate_dataset.py")
        self.info: dict = _read_json(self.root / "meta/info.json")
        self.stats: dict = _read_json(self.root / "meta/stats.json")
        lacking = [k for k in ("data_path", "features", "fps") if k not in self.info]
        if lacking:
            raise DatasetError(f"{self.root / 'meta/info.json'} lacks keys {lacking}; {_FIX}")
        tasks = sorted(_read_parquet(self.root / "meta/tasks.parquet", ["task_index", "task"]).to_pylist(),
                       key=lambda r: r["task_index"])
        self._instructions = [r["task"] for r in tasks]
        self.episodes: list[dict] = _read_parquet(self.root / EPISODES_PATH).to_pylist()
        files = sorted({(e["data/chunk_index"], e["data/file_index"]) for e in self.episodes})
        self._files = [self.root / self.info["data_path"].format(chunk_index=c, file_index=f) for c, f in files]
        names = ["observation.state", "action", "episode_index", "frame_index", "index", "task_index"]
        tables = [_read_parquet(p, names) for p in self._files]
        self._file_starts = np.cumsum([0] + [t.num_rows for t in tables])  # (files + 1,)
        self._columns = {k: _to_numpy(pa.chunked_array([c for t in tables for c in t[k].chunks],
                                                       type=tables[0].schema.field(k).type)) for k in names}
        self._images: dict[int, pa.BinaryArray] = {}

    def __len__(self) -> int:
        return int(self._file_starts[-1])

    def _png(self, i: int) -> bytes:
        f = int(np.searchsorted(self._file_starts, i, side="right")) - 1
        if f not in self._images:
            self._images[f] = _read_parquet(self._files[f], [IMAGE_KEY])[IMAGE_KEY].combine_chunks().field("bytes")
        return self._images[f][i - int(self._file_starts[f])].as_py()

    def __getitem__(self, i: int) -> dict:
        """Frame i: image (H, W, 3) uint8, state (S,) float32, action (A,) float32, instruction, indices."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        i %= len(self)
        cols = self._columns
        return {
            "image": np.asarray(Image.open(io.BytesIO(self._png(i))).convert("RGB")),
            "state": cols["observation.state"][i].copy(), "action": cols["action"][i].copy(),
            "instruction": self._instructions[cols["task_index"][i]],
            "episode_index": int(cols["episode_index"][i]), "frame_index": int(cols["frame_index"][i]),
        }

    def episode_frames(self, ep: int) -> range:
        """Global frame indices of episode `ep`."""
        row = self.episodes[ep]
        return range(row["dataset_from_index"], row["dataset_to_index"])

    @property
    def instructions(self) -> list[str]:
        """Unique instructions, ordered by task_index."""
        return list(self._instructions)


def validate_dataset(root: str | Path, image_samples: int = 8) -> list[str]:
    """Problems found in the dataset at `root` ([] = valid): meta fields, totals, indices, stats, values, images."""
    try:
        ds = LeRobotDataset(root)
    except DatasetError as e:
        return [str(e)]
    info, eps, cols, problems = ds.info, ds.episodes, ds._columns, []
    if info.get("codebase_version") != CODEBASE_VERSION:
        problems.append(f"info.json codebase_version is {info.get('codebase_version')!r}, "
                        f"expected {CODEBASE_VERSION!r}")
    required = ["robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size", "splits"]
    problems += [f"info.json lacks {k!r}" for k in required if k not in info]
    problems += [f"info.json features lack {k!r}" for k in _FEATURE_KEYS if k not in info["features"]]
    for key, actual in (("total_episodes", len(eps)), ("total_frames", len(ds)), ("total_tasks", len(ds.instructions))):
        if info.get(key) != actual:
            problems.append(f"info.json {key} is {info.get(key)} but the files hold {actual}")
    if info.get("splits", {}).get("train") != f"0:{len(eps)}":
        problems.append(f"info.json splits.train is {info.get('splits', {}).get('train')!r}, expected '0:{len(eps)}'")
    if [e["episode_index"] for e in eps] != list(range(len(eps))):
        problems.append("episode_index in meta/episodes is not 0..N-1 in order")
    bounds = [0] + [e["dataset_to_index"] for e in eps]
    if [e["dataset_from_index"] for e in eps] != bounds[:-1] or any(e["length"] != b - a for e, a, b in
                                                                      zip(eps, bounds, bounds[1:])):
        problems.append("episode frame ranges (dataset_from_index/to_index/length) are not contiguous")
    elif bounds[-1] != len(ds):
        problems.append(f"episodes cover {bounds[-1]} frames but data files hold {len(ds)}")
    else:
        lengths = [e["length"] for e in eps]
        if not np.array_equal(cols["episode_index"], np.repeat(np.arange(len(eps)), lengths)):
            problems.append("data episode_index column does not match the episode frame ranges")
        if not np.array_equal(cols["frame_index"], np.concatenate([np.arange(n) for n in lengths])):
            problems.append("data frame_index column does not count 0..length-1 within each episode")
    if not np.array_equal(cols["index"], np.arange(len(ds))):
        problems.append("data index column is not 0..total_frames-1")
    if len(ds) and not 0 <= cols["task_index"].min() <= cols["task_index"].max() < len(ds.instructions):
        problems.append("data task_index refers to a task missing from meta/tasks.parquet")
    for key in ("observation.state", "action"):
        dim = info["features"].get(key, {}).get("shape", [None])[0]
        if cols[key].shape[1] != dim:
            problems.append(f"{key} has {cols[key].shape[1]} values per frame but info.json declares {dim}")
        if not np.isfinite(cols[key]).all():
            problems.append(f"{key} contains NaN or inf")
        stats = ds.stats.get(key, {})
        for stat in STAT_KEYS:
            want = 1 if stat == "count" else dim
            if stat not in stats:
                problems.append(f"stats.json lacks {key}/{stat}")
            elif np.shape(stats[stat]) != (want,):
                problems.append(f"stats.json {key}/{stat} has shape {np.shape(stats[stat])}, expected ({want},)")
    shape = tuple(info["features"].get(IMAGE_KEY, {}).get("shape", ()))
    for i in sorted({int(i) for i in np.linspace(0, len(ds) - 1, min(image_samples, len(ds)))}):
        try:
            got = ds[i]["image"].shape
        except (OSError, ValueError) as e:  # PIL decode errors, DatasetError from a corrupt image column
            problems.append(f"image of frame {i} does not decode ({e})")
            continue
        if got != shape:
            problems.append(f"image of frame {i} has shape {got}, info.json declares {shape}")
    return problems
