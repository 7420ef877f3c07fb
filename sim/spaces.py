"""The instruction's observation space: a Gymnasium ``Text`` that also survives ``AsyncVectorEnv``'s shared memory.

``AsyncVectorEnv(shared_memory=True)`` (what ``gym.make_vec(..., vectorization_mode="async")`` builds) reads its
observation buffer once, when it is built, and afterwards returns what that first read gave. For a ``Box`` that is a
numpy view of the buffer, so each step shows through; for a ``Text`` it is a tuple of strings decoded from the
still-empty buffer, so every later instruction reads as 256 ``a``s. Here the read gives a view that decodes the
buffer when it is used: the vector env's own ``deepcopy`` (its default ``copy=True``) turns it into the tuple of the
current instructions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from gymnasium import spaces
from gymnasium.vector.utils import read_from_shared_memory

_read_text = read_from_shared_memory.dispatch(spaces.Text)  # Gymnasium's own decoder, used at each access


class InstructionSpace(spaces.Text):
    """A ``Text`` space; only its reads from a vector env's shared memory differ (see the module docstring)."""


class SharedInstructions(Sequence):
    """The instructions of a vector env's ``n`` sub-envs, decoded from the shared buffer whenever they are read."""

    def __init__(self, space: InstructionSpace, memory, n: int):
        self.space, self.memory, self.n = space, memory, n

    def decode(self) -> tuple[str, ...]:
        return _read_text(self.space, self.memory, self.n)

    def __getitem__(self, index):
        return self.decode()[index]

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return repr(self.decode())

    def __deepcopy__(self, memo: dict) -> tuple[str, ...]:
        return copy.deepcopy(self.decode(), memo)


@read_from_shared_memory.register(InstructionSpace)
def _read_instructions(space: InstructionSpace, shared_memory, n: int = 1) -> SharedInstructions:
    return SharedInstructions(space, shared_memory, n)
