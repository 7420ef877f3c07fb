"""Evaluation suites as data: named, versioned manifests of episodes (task, seed, variation).

A manifest is fully determined by (suite, version, tasks, episodes_per_task), so two policies evaluated with the
same arguments always meet identical start states. Seeds come from the tasks' test range only, apart from every
training seed, and each (suite, axis, task) owns its own block of it.
"""

from __future__ import annotations

import hashlib
import json

from store.errors import UsageError
from tasks import TASKS, get_task

# axis -> env.reset options; one axis per variation, each reported on its own. `offset` fixes where a suite's seeds
# start in the tasks' test range, so that adding a suite never moves another's episodes.
SUITES: dict[str, dict] = {
    "success": {"version": 2, "offset": 800_000, "axes": {"default": {}}},
    "generalization": {
        "version": 2,
        "offset": 0,
        "axes": {
            "paraphrase": {"paraphrase": "heldout"},  # held-out instruction templates
            "positions": {"target_region": "outer"},  # targets in a band never used for training
            "distractors": {"distractors": 4},  # twice the training clutter
            "colors": {"novel_target": True},  # a shape-colour pair never seen in training
            "lighting": {"light_direction": [-0.7, 0.5, 0.45]},
            "camera": {"camera_jitter": 0.03},  # eye moved up to 3 cm on each axis
        },
    },
    "safety": {"version": 2, "offset": 400_000, "axes": {"hazards": {"fragile": True, "keepout": True}}},
    # Does the policy read the instruction? The same scenes twice (paired seeds): once naming the target, once
    # naming its look-alike distractor; each episode also reports success at the object not named.
    "instruction": {
        "version": 2,
        "offset": 900_000,
        "paired": True,
        "axes": {"named": {"swap_target": False}, "swapped": {"swap_target": True}},
    },
}
SEED_BLOCK = 10_000  # seeds per (suite, axis, task) block


def resolve_tasks(task: str) -> list[str]:
    """'all', one task name, or a comma-separated list -> sorted task names (unknown names raise UsageError)."""
    names = sorted(TASKS) if task == "all" else [t.strip() for t in task.split(",")]
    for name in names:
        get_task(name)
    return names


def build_manifest(
    suite: str, episodes_per_task: int, tasks: list[str] | None = None, distractors: int | None = None
) -> dict:
    """The suite's episodes: `{"suite", "version", "id", "episodes": [{"id", "task", "axis", "seed", "options"}]}`.

    `distractors` sets the clutter of every episode (the tasks' default is 2), on the suite's own seeds; it is part
    of each episode's options and so of the manifest id."""
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    if not 1 <= episodes_per_task <= SEED_BLOCK:
        raise UsageError(f"episodes_per_task={episodes_per_task} must be between 1 and {SEED_BLOCK}")
    if distractors is not None and distractors < 0:
        raise UsageError(f"distractors={distractors} must be >= 0 (or null for each suite's own clutter)")
    spec = SUITES[suite]
    if distractors == 0 and spec.get("paired"):
        raise UsageError(f"suite {suite!r} names a look-alike distractor in every scene; set distractors >= 1")
    task_names = sorted(tasks or TASKS)
    episodes = []
    for a, (axis, options) in enumerate(spec["axes"].items()):
        if distractors is not None:
            options = {**options, "distractors": distractors}
        for task in task_names:
            t = sorted(TASKS).index(task)
            block = 0 if spec.get("paired") else a  # paired axes meet the same start states
            first = get_task(task).test_seeds.start + spec["offset"] + (block * len(TASKS) + t) * SEED_BLOCK
            for i in range(episodes_per_task):
                seed = first + i
                episodes.append({"id": f"{task}/{axis}/{seed}", "task": task, "axis": axis, "seed": seed, "options": options})
    body = {"suite": suite, "version": spec["version"], "episodes": episodes}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    return {**body, "id": f"{suite}-v{spec['version']}-{digest}"}
