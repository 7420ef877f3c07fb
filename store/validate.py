"""Check a LeRobot v3.0 dataset on disk against its own metadata: what ``scripts/validate_dataset.py`` prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store.lerobot import CODEBASE_VERSION, FEATURE_KEYS, IMAGE_KEY, STAT_KEYS, DatasetError, LeRobotDataset


def validate_dataset(root: str | Path, image_samples: int = 8) -> list[str]:
    """Problems found in the dataset at `root` ([] = valid): meta fields, totals, indices, stats, values, images."""
    try:
        ds = LeRobotDataset(root)
    except DatasetError as e:
        return [str(e)]
    info, eps, cols, problems = ds.info, ds.episodes, ds.columns, []
    if info.get("codebase_version") != CODEBASE_VERSION:
        problems.append(f"info.json codebase_version is {info.get('codebase_version')!r}, "
                        f"expected {CODEBASE_VERSION!r}")
    required = ["robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size", "splits"]
    problems += [f"info.json lacks {k!r}" for k in required if k not in info]
    problems += [f"info.json features lack {k!r}" for k in FEATURE_KEYS if k not in info["features"]]
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
