"""Crash-safe, resumable writing of the LeRobot v3.0 layout (see store.lerobot).

Episodes are staged one parquet file each, in any order; ``finalize`` packs them into data/ and meta/ and writes
meta/info.json last. Every file is written to a temp file in its own directory and moved into place with
`os.replace`, so a reader never sees a half-written file, and an interrupted generation resumes from the episodes
already staged.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from store.errors import require_dir
from store.files import write_parquet, write_text
from store.intact import read_parquet
from store.lerobot import (
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_PATH,
    EPISODES_PATH,
    IMAGE_KEY,
    OBJECT_SLOTS,
    OBJECTS_KEY,
    VIDEO_FILES_SIZE_IN_MB,
    DatasetError,
    Episode,
    compute_stats,
    is_complete,
    read_json,
    to_numpy,
)

_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_EPISODE_META = b"tabletop_vla_episode"


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


def _write_json(path: Path, obj: Any) -> None:
    """LeRobot's meta JSON: indented by 4, non-ASCII characters kept, a trailing newline."""
    write_text(path, json.dumps(obj, indent=4, ensure_ascii=False) + "\n")


def _features(image_shape: list[int], state_names: list[str], action_names: list[str], objects: bool,
              ) -> dict[str, dict]:
    """LeRobot `features` for info.json; shapes are lists, scalars have shape [1]."""
    def scalar(dtype: str) -> dict:
        return {"dtype": dtype, "shape": [1], "names": None}

    labels = {OBJECTS_KEY: {"dtype": "float32", "shape": [3 * OBJECT_SLOTS],
                            "names": [f"{a}{k}" for k in range(OBJECT_SLOTS) for a in "xyz"]}} if objects else {}
    return {**labels,
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
    columns = {}
    if ep.object_positions is not None:
        positions = np.asarray(ep.object_positions, dtype=np.float32)
        if positions.shape != (T, len(ep.objects), 3) or len(ep.objects) > OBJECT_SLOTS or not \
                (ep.target_index is None or 0 <= ep.target_index < len(ep.objects)):
            raise DatasetError(f"episode object_positions have shape {positions.shape}, expected ({T}, "
                               f"{len(ep.objects)} objects <= {OBJECT_SLOTS}, 3), with target_index among them")
        padded = np.zeros((T, OBJECT_SLOTS, 3), np.float32)
        padded[:, : len(ep.objects)] = positions
        columns[OBJECTS_KEY] = pa.FixedSizeListArray.from_arrays(padded.ravel(), 3 * OBJECT_SLOTS)
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    hist = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)])  # (3, 256)
    meta = {"task": ep.task, "instruction": ep.instruction, "seed": int(ep.seed), "success": bool(ep.success),
            "safety": {k: float(v) for k, v in ep.safety.items()}, "image_shape": list(images.shape[1:]),
            "image_hist": hist.tolist(), "objects": list(ep.objects) if columns else None,
            "target_index": ep.target_index}
    return pa.table({
        IMAGE_KEY: pa.array(pngs, type=_IMAGE_TYPE),
        "observation.state": pa.FixedSizeListArray.from_arrays(arrays["states"].ravel(), state_dim),
        "action": pa.FixedSizeListArray.from_arrays(arrays["actions"].ravel(), action_dim),
        "timestamp": (np.arange(T) / fps).astype(np.float32),  # seconds
        "frame_index": np.arange(T, dtype=np.int64),
        "next.done": np.arange(T) == T - 1,
        **columns,
    }).replace_schema_metadata({_EPISODE_META: json.dumps(meta)})


class DatasetWriter:
    """Stages episodes one file each (crash-safe, any order), then `finalize()` packs them into the v3.0 layout.

    A new writer on a root that already holds the same dataset (by config, fps, names and robot type) resumes;
    a different one raises DatasetError and touches nothing.
    """

    def __init__(self, root: str | Path, *, fps: int, state_names: list[str], action_names: list[str],
                 config: dict, robot_type: str = "franka_panda", data_files_size_in_mb: int = 100):
        self.root = require_dir(root)
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
            info = read_json(self.root / "meta/info.json")
            feats = info.get("features", {})  # .get: a foreign dataset must fail as "different", not KeyError
            return {"config": info.get("tabletop_vla", {}).get("config", {}), "fps": info.get("fps"),
                    "robot_type": info.get("robot_type"),
                    "state_names": feats.get("observation.state", {}).get("names"),
                    "action_names": feats.get("action", {}).get("names")}
        if (self._staging / "config.json").is_file():
            return read_json(self._staging / "config.json")
        return None

    def _staged_path(self, index: int) -> Path:
        return self._staging / f"episode-{index:06d}.parquet"

    def done_indices(self) -> set[int]:
        """Episode indices already safely written (staged, or packed into a finalized dataset)."""
        if is_complete(self.root):
            return set(range(read_json(self.root / "meta/info.json")["total_episodes"]))
        return {int(p.stem.split("-")[1]) for p in self._staging.glob("episode-*.parquet")}

    def write_episode(self, index: int, episode: Episode) -> None:
        """Stage episode `index` atomically; rewriting an index replaces it. Indices may arrive in any order."""
        if is_complete(self.root):
            raise DatasetError(f"{self.root} is already finalized; write new episodes to another output_dir")
        if index < 0:
            raise DatasetError(f"episode index must be >= 0, got {index}; number episodes 0..N-1")
        table = _episode_table(episode, self.spec["fps"], len(self.spec["state_names"]), len(self.spec["action_names"]))
        write_parquet(self._staged_path(index), table)

    def finalize(self) -> dict:
        """Pack staged episodes 0..N-1 into data/ and meta/, write meta/info.json last, drop staging; return info."""
        if is_complete(self.root):  # already done; a crash may have left the staging dir behind
            shutil.rmtree(self._staging, ignore_errors=True)
            return read_json(self.root / "meta/info.json")
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
            write_parquet(self.root / DATA_PATH.format(chunk_index=chunk, file_index=file), pa.concat_tables(pending))

        for index in staged:
            table = read_parquet(self._staged_path(index), "delete it and rerun generation, which writes that "
                                 "episode again")
            meta = json.loads(table.schema.metadata[_EPISODE_META])
            if features is None:
                features = _features(meta["image_shape"], spec["state_names"], spec["action_names"],
                                     meta.get("objects") is not None)
                schema = _data_schema(features)
            elif meta["image_shape"] != features[IMAGE_KEY]["shape"]:
                raise DatasetError(f"episode {index} has images {meta['image_shape']} but episode 0 has "
                                   f"{features[IMAGE_KEY]['shape']}; render every episode at one camera resolution")
            elif (meta.get("objects") is not None) != (OBJECTS_KEY in features):
                raise DatasetError(f"episode {index} and episode 0 differ in having object labels; label all or none")
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
            states.append(to_numpy(table["observation.state"]))
            actions.append(to_numpy(table["action"]))
            hist += np.asarray(meta["image_hist"], np.int64)
            episodes.append({
                "episode_index": index, "tasks": [meta["instruction"]], "length": T,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": start, "dataset_to_index": start + T,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                "task_name": meta["task"], "instruction": meta["instruction"], "seed": meta["seed"],
                "success": meta["success"], "safety": meta["safety"],
                **({"objects": meta["objects"], "target_index": meta["target_index"]} if OBJECTS_KEY in features
                   else {}),
            })
            start += T
        flush()

        safety_keys = sorted({k for ep in episodes for k in ep["safety"]})
        rows = [{**{k: v for k, v in ep.items() if k != "safety"},
                 **{f"safety/{k}": ep["safety"].get(k) for k in safety_keys}} for ep in episodes]
        write_parquet(self.root / EPISODES_PATH, pa.Table.from_pylist(rows))
        write_parquet(self.root / "meta/tasks.parquet", _tasks_table(list(tasks)))
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
