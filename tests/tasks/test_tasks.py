import dataclasses

import numpy as np
import pytest

import tasks
from sim.safety import COUNT_EVENTS
from store.errors import UsageError
from tasks.rollout import rollout

TASK_NAMES = sorted(tasks.TASKS)


def test_the_five_tasks_are_registered():
    assert {"reach", "pick", "place", "push", "stack"} <= set(TASK_NAMES)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_paraphrases_and_seed_ranges(name):
    task = tasks.get_task(name)
    train, heldout = task.paraphrases("train"), task.paraphrases("heldout")
    assert len(train) + len(heldout) >= 5 and heldout and not set(train) & set(heldout)
    assert set(task.train_seeds).isdisjoint(range(task.test_seeds.start, task.test_seeds.start + 1000))
    assert task.train_seeds.stop <= task.test_seeds.start


@pytest.mark.parametrize("name", TASK_NAMES)
def test_only_the_instruction_identifies_the_target(name):
    task = tasks.get_task(name)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scene = task.sample_scene(rng, {"distractors": 3})
        labels = [o.label for o in scene.objects]
        assert len(labels) >= 3 and len(set(labels)) == len(labels)  # distractors, none identical to another
        target = scene.get(scene.target)
        lookalikes = [o for o in scene.objects if o.name != target.name and (o.color == target.color or o.shape == target.shape)]
        assert lookalikes  # colour alone or shape alone would not do
        instruction = task.instruction(scene, rng, {})
        assert target.label in instruction


@pytest.mark.parametrize("name", ["reach", "pick", "stack"])
def test_swap_target_names_the_lookalike_in_the_same_scene(name):
    env = tasks.make_env(name, image_size=32)
    for seed in range(3):
        obs_named, named = env.reset(seed=seed, options={"swap_target": False})
        scene_named = env.scene
        assert env.success_at(scene_named.target) == env.task.success(env)
        obs_swapped, swapped = env.reset(seed=seed, options={"swap_target": True})
        scene = env.scene
        assert [(o.name, o.xy) for o in scene.objects] == [(o.name, o.xy) for o in scene_named.objects]
        assert (scene.target, scene.extra["other"]) == (scene_named.extra["other"], scene_named.target)
        new, old = scene.get(scene.target), scene.get(scene.extra["other"])
        assert new.color == old.color or new.shape == old.shape  # the look-alike: one word tells them apart
        assert named["instruction"].replace(old.label, new.label) == swapped["instruction"]
        assert np.array_equal(obs_named["image"], obs_swapped["image"])
        _, _, _, _, info = env.step(np.zeros(7, np.float32))
        assert info["other_success"] is False and info["is_success"] is False
    with pytest.raises(ValueError, match="distractors >= 1"):
        env.reset(seed=0, options={"swap_target": True, "distractors": 0})


def test_going_to_the_object_not_named_counts_there_only():
    env = tasks.make_env("reach", image_size=32)
    env.reset(seed=1, options={"swap_target": True})
    scene = env.scene
    env.scene = dataclasses.replace(scene, target=scene.extra["other"])  # the expert plans for the original target
    expert = env.task.expert(env, seed=1)
    actions = [expert.act({})[0]]
    env.scene = scene
    infos = []
    for _ in range(env.task.max_steps):
        infos.append(env.step(actions[-1])[4])
        if infos[-1]["other_success"]:
            break
        actions.append(expert.act({})[0])
    assert infos[-1]["other_success"] and not any(i["is_success"] for i in infos)


def test_heldout_paraphrases_are_used_when_asked():
    env = tasks.make_env("pick")
    _, info = env.reset(seed=0, options={"paraphrase": "heldout"})
    templates = [t.split("{target}")[0] for t in env.task.paraphrases("heldout")]
    assert any(info["instruction"].startswith(t) for t in templates)
    with pytest.raises(ValueError, match="paraphrase"):
        env.reset(seed=0, options={"paraphrase": "other"})


def test_unknown_task_name_lists_the_choices():
    with pytest.raises(UsageError, match="choose one of"):
        tasks.get_task("juggle")


@pytest.mark.slow
@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("options", [{}, {"fragile": True, "keepout": True}], ids=["plain", "hazards"])
def test_expert_succeeds_and_breaks_nothing(name, options):
    env = tasks.make_env(name)
    n, wins = 8, 0
    for seed in range(n):
        r = rollout(env, env.task.expert(env, seed=seed, noise=0.003), seed, options)
        assert r.error is None
        assert {k: v for k, v in r.safety.items() if k in COUNT_EVENTS and v} == {}, (seed, r.safety)
        wins += r.success
    assert wins == n


def test_random_actions_rarely_succeed():
    env = tasks.make_env("pick")
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(5):
        env.reset(seed=seed)
        for _ in range(20):
            a = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
            _, _, term, _, info = env.step(a)
            if term:
                break
        wins += info["is_success"]
    assert wins == 0
