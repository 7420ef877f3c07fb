"""Tests for tasks/scenes.py and store/scenes.py: labelled scenes, deterministic, resumable, refused when they differ."""

import numpy as np
import pytest

from store.errors import UsageError
from store.scenes import SceneSet, SceneSetError, done_chunks
from tasks import make_env
from tasks.scenes import CHUNK, SceneConfig, generate_scenes, scene_plan


def _cfg(tmp_path, name="s", **kw) -> SceneConfig:
    return SceneConfig(**{"num_scenes": 12, "val_scenes": 3, "image_size": 48, "output_dir": str(tmp_path / name),
                          **kw})


def test_scenes_are_labelled_by_the_simulator(tmp_path):
    summary = generate_scenes(_cfg(tmp_path))
    scenes = SceneSet(tmp_path / "s")
    assert (summary["train"], summary["val"]) == (12, 3) and len(scenes) == 15
    assert all(len(scenes.names[i]) == 3 for i in scenes.split("val"))  # the tasks' clutter, one look-alike
    assert {len(n) for n in scenes.names} <= {1, 2, 3, 4}
    plan = scene_plan(_cfg(tmp_path))
    env = make_env("reach", image_size=48)
    for i in (0, 13):
        split, seed, objects = plan[i]
        obs, _ = env.reset(seed=seed, options={"distractors": objects - 1})
        assert scenes.splits[i] == split
        np.testing.assert_array_equal(scenes.image(i), obs["image"])
        np.testing.assert_allclose(scenes.states[i], obs["state"], atol=1e-6)
        assert scenes.names[i] == [o.label for o in env.scene.objects]
        np.testing.assert_allclose(scenes.positions[i], [env.object_pose(o.name)[0] for o in env.scene.objects],
                                   atol=1e-6)
    assert scenes.templates and all("{target}" in t for t in scenes.templates)


def test_workers_and_interruptions_do_not_change_the_set(tmp_path):
    cfg = _cfg(tmp_path, num_scenes=CHUNK + 5, val_scenes=2)
    generate_scenes(_cfg(tmp_path, "two", num_scenes=CHUNK + 5, val_scenes=2, workers=2))
    generate_scenes(cfg)
    (tmp_path / "s" / "meta.json").unlink()  # as if stopped before the end: chunk 1 written, meta not
    (tmp_path / "s" / "data" / "chunk-000.parquet").unlink()
    assert done_chunks(tmp_path / "s") == {1}
    generate_scenes(cfg)
    a, b = SceneSet(tmp_path / "s"), SceneSet(tmp_path / "two")
    assert a.names == b.names and all(np.array_equal(p, q) for p, q in zip(a.positions, b.positions))
    assert all(np.array_equal(a.image(i), b.image(i)) for i in (0, CHUNK + 3))


def test_other_settings_and_missing_sets_are_refused(tmp_path):
    generate_scenes(_cfg(tmp_path))
    with pytest.raises(UsageError, match="other settings"):
        generate_scenes(_cfg(tmp_path, max_objects=3))
    with pytest.raises(SceneSetError, match="generate_scenes.py"):
        SceneSet(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="min_objects"):
        SceneConfig(min_objects=0)
