"""Tests for store/lerobot.py, store/writer.py and store/validate.py on tiny synthetic episodes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store.lerobot import IMAGE_KEY, DatasetError, Episode, LeRobotDataset, compute_stats, is_complete
from store.validate import validate_dataset
from store.writer import DatasetWriter

REPO = Path(__file__).resolve().parents[2]
H, W, S, A, FPS = 6, 8, 4, 3, 10
STATE_NAMES = [f"s{i}" for i in range(S)]
ACTION_NAMES = [f"a{i}" for i in range(A)]
CONFIG = {"task": "pick", "num_episodes": 5, "seed_start": 0, "camera": {"width": W, "height": H}}
INSTRUCTIONS = ["pick up the red cube", "pick up the blue cube"]


def make_episode(i: int) -> Episode:
    """Episode i: 3 + i frames, random images; instruction alternates between two strings."""
    rng = np.random.default_rng(i)
    T = 3 + i
    return Episode(
        task="pick", instruction=INSTRUCTIONS[i % 2], seed=100 + i, success=i % 3 != 0,
        images=rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
        states=rng.normal(size=(T, S)).astype(np.float32),
        actions=rng.normal(size=(T, A)).astype(np.float32),
        safety={"fragile_contact": float(i), "collision": 0.0},
    )


def make_writer(root: Path, config: dict = CONFIG, **kwargs) -> DatasetWriter:
    return DatasetWriter(root, fps=FPS, state_names=STATE_NAMES, action_names=ACTION_NAMES, config=config, **kwargs)


def write_dataset(root: Path, n: int = 5, **kwargs) -> dict:
    writer = make_writer(root, **kwargs)
    for i in range(n):
        writer.write_episode(i, make_episode(i))
    return writer.finalize()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "ds")
    return tmp_path / "ds"


@pytest.mark.parametrize("file_mb", [100, 0])  # 0: every episode rolls over into its own data file
def test_round_trip(tmp_path: Path, file_mb: float):
    info = write_dataset(tmp_path, data_files_size_in_mb=file_mb)
    ds = LeRobotDataset(tmp_path)
    episodes = [make_episode(i) for i in range(5)]
    assert len(ds) == info["total_frames"] == sum(len(e.images) for e in episodes)
    assert len(list((tmp_path / "data").rglob("*.parquet"))) == (1 if file_mb else 5)
    assert ds.instructions == INSTRUCTIONS
    assert not (tmp_path / ".staging").exists() and is_complete(tmp_path)
    for ep_idx, ep in enumerate(episodes):
        frames = ds.episode_frames(ep_idx)
        assert len(frames) == len(ep.images)
        row = ds.episodes[ep_idx]
        assert (row["seed"], row["success"], row["instruction"], row["task_name"]) == (
            ep.seed, ep.success, ep.instruction, ep.task)
        assert row["safety/fragile_contact"] == ep.safety["fragile_contact"] and row["tasks"] == [ep.instruction]
        for t, i in enumerate(frames):
            item = ds[i]
            assert item["image"].dtype == np.uint8 and np.array_equal(item["image"], ep.images[t])
            assert item["state"].dtype == np.float32 and np.array_equal(item["state"], ep.states[t])
            assert np.array_equal(item["action"], ep.actions[t])
            assert (item["instruction"], item["episode_index"], item["frame_index"]) == (ep.instruction, ep_idx, t)
    states = np.concatenate([e.states for e in episodes])
    assert ds.stats["observation.state"]["mean"] == pytest.approx(states.mean(0).tolist(), abs=1e-6)
    pixels = np.concatenate([e.images for e in episodes]).reshape(-1, 3) / 255.0
    assert np.array(ds.stats[IMAGE_KEY]["mean"]).shape == (3, 1, 1)
    assert np.ravel(ds.stats[IMAGE_KEY]["std"]) == pytest.approx(pixels.std(0), abs=1e-9)
    assert validate_dataset(tmp_path) == []


def test_loads_with_datasets_and_pandas(dataset_root: Path, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    pd = pytest.importorskip("pandas")
    hf = datasets.load_dataset("parquet", data_files=str(dataset_root / "data/*/*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    ds = LeRobotDataset(dataset_root)
    assert len(hf) == len(ds)
    row = hf[4]
    assert row[IMAGE_KEY].size == (W, H)  # PIL size is (width, height)
    assert np.array_equal(np.asarray(row[IMAGE_KEY]), ds[4]["image"])
    assert np.array_equal(np.asarray(row["action"], np.float32), ds[4]["action"])
    tasks = pd.read_parquet(dataset_root / "meta/tasks.parquet")  # LeRobot indexes tasks by their string
    assert tasks.index.name == "task" and tasks.loc[INSTRUCTIONS[1]].task_index == 1


def test_resume_gives_identical_bytes(tmp_path: Path):
    write_dataset(tmp_path / "straight")
    root = tmp_path / "resumed"
    first = make_writer(root)
    for i in (4, 1):  # out of order, then "crash" with a half-written temp file left behind
        first.write_episode(i, make_episode(i))
    (root / ".staging" / ".episode-000002.parquet.999.tmp").write_bytes(b"PAR1 half")
    writer = make_writer(root)
    assert writer.done_indices() == {1, 4}
    for i in sorted(set(range(5)) - writer.done_indices()):
        writer.write_episode(i, make_episode(i))
    writer.finalize()
    assert snapshot(root) == snapshot(tmp_path / "straight")
    again = make_writer(root)  # a finished dataset with the same config: nothing left to do
    assert again.done_indices() == set(range(5))
    assert again.finalize()["total_episodes"] == 5 and snapshot(root) == snapshot(tmp_path / "straight")


@pytest.mark.parametrize("finished", [True, False])
def test_different_config_refused_and_nothing_deleted(tmp_path: Path, finished: bool):
    writer = make_writer(tmp_path)
    writer.write_episode(0, make_episode(0))
    if finished:
        writer.finalize()
    before = snapshot(tmp_path)
    with pytest.raises(DatasetError, match="holds a different dataset.*seed_start"):
        make_writer(tmp_path, config={**CONFIG, "seed_start": 7})
    with pytest.raises(DatasetError, match="fps"):
        DatasetWriter(tmp_path, fps=FPS + 1, state_names=STATE_NAMES, action_names=ACTION_NAMES, config=CONFIG)
    assert snapshot(tmp_path) == before


def test_finalize_needs_contiguous_indices(tmp_path: Path):
    writer = make_writer(tmp_path)
    for i in (0, 2):
        writer.write_episode(i, make_episode(i))
    with pytest.raises(DatasetError, match=r"\[1\] are missing"):
        writer.finalize()
    assert not is_complete(tmp_path) and not (tmp_path / "data").exists()
    writer.write_episode(1, make_episode(1))
    assert writer.finalize()["total_episodes"] == 3


def test_write_episode_rejects_bad_arrays(tmp_path: Path):
    writer = make_writer(tmp_path)
    bad_state = make_episode(0)
    bad_state.states = bad_state.states[:, :2]
    with pytest.raises(DatasetError, match="states have shape"):
        writer.write_episode(0, bad_state)
    bad_image = make_episode(0)
    bad_image.images = bad_image.images.astype(np.float32)
    with pytest.raises(DatasetError, match="uint8"):
        writer.write_episode(0, bad_image)
    assert writer.done_indices() == set()


@pytest.mark.parametrize("rel", ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet",
                                 "meta/tasks.parquet"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_parquet_names_the_file(dataset_root: Path, rel: str, damage: str):
    path = dataset_root / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * len(data))
    with pytest.raises(DatasetError, match=f"{path}.*corrupt or truncated.*validate_dataset"):
        LeRobotDataset(dataset_root)
    assert any(str(path) in p for p in validate_dataset(dataset_root))


def test_incomplete_dataset_is_not_read(tmp_path: Path):
    writer = make_writer(tmp_path)
    writer.write_episode(0, make_episode(0))
    with pytest.raises(DatasetError, match="incomplete"):
        LeRobotDataset(tmp_path)
    with pytest.raises(DatasetError, match="not a directory"):
        LeRobotDataset(tmp_path / "nope")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, expected", [
    (lambda root: _edit_json(root / "meta/stats.json", lambda s: s["action"].pop("q99")), "lacks action/q99"),
    (lambda root: _edit_json(root / "meta/stats.json", lambda s: s["observation.state"]["min"].pop()),
     "observation.state/min has shape"),
    (lambda root: _edit_json(root / "meta/info.json", lambda i: i.update(total_frames=i["total_frames"] + 1)),
     "total_frames is"),
    (lambda root: _edit_json(root / "meta/info.json", lambda i: i.update(total_episodes=4)), "total_episodes is 4"),
    (lambda root: _edit_json(root / "meta/info.json", lambda i: i["features"][IMAGE_KEY].update(shape=[H, H, 3])),
     "declares"),
    (lambda root: _edit_json(root / "meta/info.json", lambda i: i.pop("robot_type")), "lacks 'robot_type'"),
    (lambda root: os.remove(root / "meta/stats.json"), "stats.json is missing"),
])
def test_validate_finds_injected_problems(dataset_root: Path, edit, expected: str):
    assert validate_dataset(dataset_root) == []
    edit(dataset_root)
    problems = validate_dataset(dataset_root)
    assert any(expected in p for p in problems), problems


def test_validate_finds_bad_values(dataset_root: Path):
    path = dataset_root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    actions = np.asarray(table["action"].combine_chunks().flatten()).copy()
    actions[5] = np.nan
    frames = np.asarray(table["frame_index"]).copy()
    frames[2] = 9
    table = table.set_column(table.schema.get_field_index("action"), "action",
                             pa.FixedSizeListArray.from_arrays(actions, A))
    table = table.set_column(table.schema.get_field_index("frame_index"), "frame_index", pa.array(frames))
    pq.write_table(table, path)
    problems = validate_dataset(dataset_root)
    assert "action contains NaN or inf" in problems
    assert any("frame_index" in p for p in problems), problems


def test_compute_stats_known_values():
    data = np.stack([np.arange(101.0), -2 * np.arange(101.0)], axis=1)  # (101, 2)
    stats = compute_stats(data)
    assert stats["q01"] == pytest.approx([1.0, -198.0]) and stats["q99"] == pytest.approx([99.0, -2.0])
    assert stats["min"] == [0.0, -200.0] and stats["max"] == [100.0, 0.0] and stats["count"] == [101]
    assert stats["mean"] == pytest.approx([50.0, -100.0]) and stats["std"] == pytest.approx([29.1548, 58.3095], 1e-5)


def test_cli_exit_codes(dataset_root: Path):
    cmd = [sys.executable, str(REPO / "scripts/validate_dataset.py"), str(dataset_root)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    (dataset_root / "meta/stats.json").unlink()
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "stats.json is missing" in bad.stdout
