"""Picklable policy specs for worker processes: ``PolicySpec("expert" | "random" | <checkpoint dir>)(env)`` gives
the policy (a ``tasks.policy.Policy``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from store.errors import UsageError
from tasks.policy import Policy, RandomPolicy

BUILTIN = ("expert", "random")


@dataclass
class PolicySpec:
    """Which policy to run: the scripted expert, a uniform random policy, or a VLA checkpoint directory."""

    name: str
    temperature: float = 0.0
    unnorm_key: str | None = None
    top_p: float = 1.0
    _vla: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in BUILTIN:
            path = Path(self.name)
            if not (path / "config.json").is_file():
                hint = " (a training run: point to its final/ checkpoint)" if (path / "final").is_dir() else ""
                raise UsageError(f"policy={self.name!r} is neither 'expert', 'random' nor a checkpoint directory with "
                                 f"config.json{hint}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_vla": None}  # workers load the model themselves

    def __call__(self, env) -> Policy:
        if self.name == "expert":
            return env.task.expert(env)
        if self.name == "random":
            return RandomPolicy(env.action_space.low, env.action_space.high)
        if self._vla is None:
            from vla.policy import VLAPolicy  # here: expert and random workers never load torch

            self._vla = VLAPolicy.from_pretrained(self.name, unnorm_key=self.unnorm_key,
                                                 temperature=self.temperature, top_p=self.top_p)
        return self._vla
