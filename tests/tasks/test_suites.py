import pytest

import tasks
from store.errors import UsageError
from tasks.suites import SUITES, build_manifest, resolve_tasks


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_manifests_are_fixed_and_use_only_held_out_seeds(suite):
    a = build_manifest(suite, 5)
    b = build_manifest(suite, 5)
    assert a == b and a["id"].startswith(f"{suite}-v")
    ids = [e["id"] for e in a["episodes"]]
    assert len(ids) == len(set(ids)) == 5 * len(tasks.TASKS) * len(SUITES[suite]["axes"])
    for e in a["episodes"]:
        task = tasks.get_task(e["task"])
        assert e["seed"] in task.test_seeds and e["seed"] not in task.train_seeds


def test_suites_do_not_share_seeds_and_subsets_keep_their_episodes():
    seeds = [{(e["task"], e["seed"]) for e in build_manifest(s, 20)["episodes"]} for s in SUITES]
    assert all(not (x & y) for i, x in enumerate(seeds) for y in seeds[i + 1 :])
    full = build_manifest("success", 3)
    sub = build_manifest("success", 3, ["pick"])
    assert sub["episodes"] == [e for e in full["episodes"] if e["task"] == "pick"] and sub["id"] != full["id"]


def test_generalization_has_one_axis_per_variation():
    axes = set(SUITES["generalization"]["axes"])
    assert axes == {"paraphrase", "positions", "distractors", "colors", "lighting", "camera"}


def test_instruction_suite_meets_each_scene_twice():
    episodes = build_manifest("instruction", 4, ["reach"])["episodes"]
    named = [(e["seed"], e["options"]) for e in episodes if e["axis"] == "named"]
    swapped = [(e["seed"], e["options"]) for e in episodes if e["axis"] == "swapped"]
    assert [s for s, _ in named] == [s for s, _ in swapped] and len(named) == 4
    assert {o["swap_target"] for _, o in named} == {False} and {o["swap_target"] for _, o in swapped} == {True}


def test_unknown_names_fail_clearly():
    with pytest.raises(UsageError, match="unknown suite"):
        build_manifest("speed", 3)
    with pytest.raises(UsageError, match="unknown task"):
        resolve_tasks("pick,juggle")
    with pytest.raises(UsageError, match="episodes_per_task"):
        build_manifest("success", 0)


def test_distractors_override_sets_every_episodes_clutter_on_the_same_seeds():
    base = build_manifest("generalization", 2, ["reach"])
    bare = build_manifest("generalization", 2, ["reach"], distractors=0)
    assert [e["seed"] for e in bare["episodes"]] == [e["seed"] for e in base["episodes"]]
    assert {e["options"]["distractors"] for e in bare["episodes"]} == {0} and bare["id"] != base["id"]
    assert "distractors" not in base["episodes"][0]["options"]  # the suite's own spec is not modified
    env = tasks.make_env("reach")
    env.reset(seed=bare["episodes"][0]["seed"], options=bare["episodes"][0]["options"])
    assert len(env.scene.objects) == 1
    with pytest.raises(UsageError, match="distractors"):
        build_manifest("success", 2, distractors=-1)
    with pytest.raises(UsageError, match="look-alike"):
        build_manifest("instruction", 2, distractors=0)
