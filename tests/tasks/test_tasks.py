import numpy as np
import pytest

import tasks
from sim.safety import COUNT_EVENTS
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


def test_heldout_paraphrases_are_used_when_asked():
    env = tasks.make_env("pick")
    _, info = env.reset(seed=0, options={"paraphrase": "heldout"})
    templates = [t.split("{target}")[0] for t in env.task.paraphrases("heldout")]
    assert any(info["instruction"].startswith(t) for t in templates)
    with pytest.raises(ValueError, match="paraphrase"):
        env.reset(seed=0, options={"paraphrase": "other"})


def test_unknown_task_name_lists_the_choices():
    with pytest.raises(KeyError, match="choose one of"):
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
