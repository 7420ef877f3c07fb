"""Tests for tasks/demos.py and scripts/generate_demos.py: valid, resumable, worker-independent datasets."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.cli import register_configs
from store.errors import UsageError
from store.lerobot import DatasetError, LeRobotDataset
from store.validate import validate_dataset
from tasks import demos, make_env
from tasks.demos import DemoConfig, generate
from tasks.rollout import rollout

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "generate_demos.py")


def _digest(root: Path) -> str:
    """Hash of every data and meta file (the dataset's content), ignoring summary.json timings."""
    h = hashlib.sha256()
    for p in sorted((root / "data").rglob("*.parquet")) + sorted((root / "meta").rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cfg(tmp_path, name="d", **kw) -> DemoConfig:
    base = dict(task="reach", num_episodes=3, workers=1, image_size=48, output_dir=str(tmp_path / name))
    base.update(kw)
    return DemoConfig(**base)


def test_generates_a_valid_dataset_with_summary(tmp_path):
    summary = generate(_cfg(tmp_path, task="reach,pick", num_episodes=2))
    root = tmp_path / "d"
    assert validate_dataset(root) == []
    ds = LeRobotDataset(root)
    assert summary["episodes"] == 4 and summary["frames"] == len(ds) == ds.info["total_frames"]
    assert summary["expert_success_rate"] == 1.0 and summary["discarded"] == 0
    assert json.loads((root / "summary.json").read_text())["episodes"] == 4
    assert [e["task_name"] for e in ds.episodes] == ["reach", "reach", "pick", "pick"]
    assert all(e["success"] for e in ds.episodes)
    # each task draws its own block of seeds, so reach and pick start from different scenes
    reach_seeds, pick_seeds = ({e["seed"] for e in ds.episodes if e["task_name"] == t} for t in ("reach", "pick"))
    assert min(reach_seeds) >= demos.TASK_STRIDE * 3 > max(pick_seeds)  # sorted: pick, place, push, reach
    first = [ds[ds.episode_frames(e)[0]]["image"] for e in (0, 2)]
    assert not np.array_equal(*first)
    frame = ds[0]
    assert frame["image"].shape == (48, 48, 3) and frame["instruction"] in ds.instructions


def test_datasets_library_reads_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    generate(_cfg(tmp_path, num_episodes=2))
    files = sorted(str(p) for p in (tmp_path / "d" / "data").rglob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds[0]["observation.images.front"].size == (48, 48)
    assert len(ds[0]["action"]) == 7


def test_workers_do_not_change_the_result(tmp_path):
    generate(_cfg(tmp_path, "one", num_episodes=4))
    generate(_cfg(tmp_path, "two", num_episodes=4, workers=2))
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_dataset(tmp_path):
    args = ["task=pick", "num_episodes=6", "image_size=48"]
    subprocess.run([sys.executable, SCRIPT, *args, f"output_dir={tmp_path / 'straight'}"], check=True, capture_output=True)
    target = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, SCRIPT, *args, f"output_dir={target}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    staged = target / ".staging"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staged.glob("episode-*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (target / "meta" / "info.json").exists()  # it really was cut short
    subprocess.run([sys.executable, SCRIPT, *args, f"output_dir={target}"], check=True, capture_output=True)
    assert _digest(target) == _digest(tmp_path / "straight")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    out = _run("task=juggle", f"output_dir={tmp_path / 'x'}")
    assert out.returncode != 0 and "unknown task 'juggle'" in out.stderr
    out = _run("num_episodes=0", f"output_dir={tmp_path / 'x'}")
    assert out.returncode != 0 and "num_episodes=0 must be at least 1" in out.stderr
    out = _run("num_episode=5")
    assert out.returncode != 0 and "num_episode" in out.stderr
    assert not (tmp_path / "x").exists()


def test_an_output_dir_holding_another_dataset_is_left_untouched(tmp_path):
    generate(_cfg(tmp_path, num_episodes=2))
    before = _digest(tmp_path / "d")
    with pytest.raises(DatasetError, match="different dataset"):
        generate(_cfg(tmp_path, num_episodes=2, image_size=64))
    assert _digest(tmp_path / "d") == before
    again = generate(_cfg(tmp_path, num_episodes=2))  # same arguments: nothing to do, same figures
    assert again["episodes"] == 2 and _digest(tmp_path / "d") == before


def test_a_corrupt_data_file_is_named(tmp_path):
    generate(_cfg(tmp_path, num_episodes=2))
    data = next((tmp_path / "d" / "data").rglob("*.parquet"))
    data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
    with pytest.raises(DatasetError, match=data.name):
        LeRobotDataset(tmp_path / "d")


def test_hydra_config_matches_the_schema():
    register_configs("generate_demos_schema")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="generate_demos", overrides=["task=all", "num_episodes=3"])
        demo = OmegaConf.to_object(cfg)
    assert isinstance(demo, DemoConfig) and len(demo.tasks()) == 5 and demo.output_dir == "data/all"
    assert np.isclose(demo.noise, 0.003)


def test_min_distractors_mixes_clutter_by_seed(tmp_path):
    cfg = _cfg(tmp_path, num_episodes=4, min_distractors=0)
    counts = [demos.distractors(cfg, s) for s in range(60)]
    assert set(counts) == {0, 1, 2} and counts == [demos.distractors(cfg, s) for s in range(60)]
    assert {demos.distractors(_cfg(tmp_path), s) for s in range(20)} == {2}
    generate(cfg)
    ds = LeRobotDataset(tmp_path / "d")
    env = make_env("reach", image_size=48)
    for e, episode in enumerate(ds.episodes):  # each episode starts from its seed's scene with the drawn clutter
        obs, _ = env.reset(seed=episode["seed"], options={"distractors": demos.distractors(cfg, episode["seed"])})
        assert len(env.scene.objects) == 1 + demos.distractors(cfg, episode["seed"])
        np.testing.assert_array_equal(ds[ds.episode_frames(e)[0]]["image"], obs["image"])
    with pytest.raises(UsageError, match="min_distractors=3"):
        _cfg(tmp_path, min_distractors=3)


def test_paired_demos_share_a_scene_and_name_the_lookalike(tmp_path):
    summary = generate(_cfg(tmp_path, num_episodes=4, paired=True))
    ds = LeRobotDataset(tmp_path / "d")
    assert summary["discarded"] == 0 and summary["expert_success_rate"] == 1.0
    seeds = [e["seed"] for e in ds.episodes]
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    env = make_env("reach", image_size=48)
    for a, b in ((0, 1), (2, 3)):
        frames_a, frames_b = ds.episode_frames(a), ds.episode_frames(b)
        np.testing.assert_array_equal(ds[frames_a[0]]["image"], ds[frames_b[0]]["image"])  # the same scene
        env.reset(seed=seeds[a], options={"swap_target": False})
        target, lookalike = env.scene.get(env.scene.target).label, env.scene.get(env.scene.extra["other"]).label
        first_a, first_b = ds[frames_a[0]]["instruction"], ds[frames_b[0]]["instruction"]
        assert target in first_a and lookalike in first_b and target not in first_b
        assert not np.allclose(ds[frames_a[0]]["action"], ds[frames_b[0]]["action"])  # and the arm goes elsewhere
    with pytest.raises(UsageError, match="needs a distractor"):
        _cfg(tmp_path, paired=True, distractors=2, min_distractors=0)


def test_seed_blocks_of_tasks_never_overlap():
    _cfg(Path("."), seed=49_976, num_episodes=3)  # the last slot's last attempt is the block's last seed
    for kw in ({"seed": 49_977, "num_episodes": 3}, {"num_episodes": 6_251}):
        with pytest.raises(UsageError, match="into the next task's"):
            _cfg(Path("."), **kw)


def test_demos_carry_the_objects_and_their_positions_per_frame(tmp_path):
    generate(_cfg(tmp_path, task="pick", num_episodes=1))
    ds = LeRobotDataset(tmp_path / "d")
    episode = ds.episodes[0]
    env = make_env("pick", image_size=48)
    env.reset(seed=episode["seed"], options={"distractors": 2})
    assert episode["objects"] == [o.label for o in env.scene.objects]
    assert episode["objects"][episode["target_index"]] == env.scene.get(env.scene.target).label
    frames = list(ds.episode_frames(0))
    first, last = ds[frames[0]]["object_positions"], ds[frames[-1]]["object_positions"]
    assert first.shape == (3, 3)
    np.testing.assert_allclose(first, [env.object_pose(o.name)[0] for o in env.scene.objects], atol=1e-6)
    target = episode["target_index"]
    assert last[target, 2] - first[target, 2] > 0.03  # the picked object rises; the others stay
    others = [k for k in range(3) if k != target]
    np.testing.assert_allclose(last[others], first[others], atol=2e-3)


def test_dart_records_the_experts_labels_while_the_env_runs_the_perturbed_actions(tmp_path):
    env = make_env("pick", image_size=48)
    clean = rollout(env, env.task.expert(env, seed=5, noise=0.0), 5, {})
    noisy = rollout(env, env.task.expert(env, seed=5, noise=0.0, dart=0.01), 5, {})
    assert noisy.success and "executed" not in clean.step_info[0]
    executed = np.asarray([i["executed"] for i in noisy.step_info])
    np.testing.assert_array_equal(executed[:, 3:], noisy.actions[:, 3:])  # only the translation is perturbed
    assert np.abs(executed[:, :3] - noisy.actions[:, :3]).mean() > 0.005
    # the labels are the expert's own: within its speed limit, which the perturbed actions exceed
    assert np.linalg.norm(noisy.actions[:, :3], axis=1).max() <= 0.035 + 1e-6
    assert np.linalg.norm(executed[:, :3], axis=1).max() > 0.036
    # the env ran the perturbed actions: the tip's moves follow them, not the labels
    moved = np.diff(noisy.states[:, :3], axis=0)
    miss = [np.abs(moved - a[:-1, :3]).sum() for a in (executed, noisy.actions)]
    assert miss[0] < miss[1]
    assert len(noisy.actions) != len(clean.actions) or not np.allclose(noisy.states, clean.states)
    # the dataset's config names dart only when it is on, so datasets written before it still resume
    assert "dart" not in _cfg(tmp_path).dataset_config() and _cfg(tmp_path, dart=0.01).dataset_config()["dart"] == 0.01
    with pytest.raises(UsageError, match="dart=-0.1 must be >= 0"):
        _cfg(tmp_path, dart=-0.1)
