"""Language-conditioned tabletop tasks and their Gymnasium registrations.

`gym.make("TabletopPick-v0")` after `import tasks` (or `gym.make("tasks:TabletopPick-v0")`); `Tabletop-v0`
takes the task by name: `gym.make("Tabletop-v0", task="stack")`.
"""

from __future__ import annotations

import gymnasium as gym

from sim.env import TabletopEnv
from store.errors import UsageError
from tasks.base import TEST_SEEDS, TRAIN_SEEDS, BaseTask, Expert
from tasks.pick import PickTask
from tasks.place import PlaceTask
from tasks.push import PushTask
from tasks.reach import ReachTask
from tasks.stack import StackTask

TASKS: dict[str, type[BaseTask]] = {cls().name: cls for cls in (ReachTask, PickTask, PlaceTask, PushTask, StackTask)}


def get_task(name: str) -> BaseTask:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (or 'all' where a script accepts it)")
    return TASKS[name]()


def make_env(task: str = "reach", **kwargs) -> TabletopEnv:
    return TabletopEnv(get_task(task), **kwargs)


def env_id(task: str) -> str:
    return f"Tabletop{task.capitalize()}-v0"


for _name, _cls in TASKS.items():
    gym.register(env_id(_name), entry_point="tasks:make_env", kwargs={"task": _name}, max_episode_steps=_cls().max_steps)
gym.register("Tabletop-v0", entry_point="tasks:make_env", max_episode_steps=100)

__all__ = ["TASKS", "TEST_SEEDS", "TRAIN_SEEDS", "BaseTask", "Expert", "env_id", "get_task", "make_env"]
