"""Picklable policy specs for worker processes: ``PolicySpec(name)(env)`` gives the policy (a ``tasks.policy.Policy``),
the name being "expert", "random", "perturbed" or a checkpoint directory; ``identity()`` says which policy it is, and
``resolve_calibration`` finds the calibration that belongs to it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from store.errors import UsageError
from store.intact import check_files
from tasks import perturbed
from tasks.calibration import CALIBRATION_FILE, Calibration
from tasks.perturbed import PerturbedExpert
from tasks.policy import Policy, RandomPolicy
from vla.chunking import EXECUTIONS

# The scripted policies, each built per env: name -> (constructor, the constants that define it for a digest).
BUILTIN: dict[str, tuple[Callable, dict]] = {
    "expert": (lambda env: env.task.expert(env), {}),
    "random": (lambda env: RandomPolicy(env.action_space.low, env.action_space.high), {}),
    "perturbed": (lambda env: PerturbedExpert(env.task.expert(env)),
                  {"sigma_low": perturbed.SIGMA_LOW, "sigma_high": perturbed.SIGMA_HIGH, "bins": perturbed.N_BINS}),
}


def weights_digest(path: Path) -> str:
    """sha256 over a checkpoint's ``*.safetensors`` files (names and bytes, in name order)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path} holds no *.safetensors weights to identify it by")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class PolicySpec:
    """Which policy to run: a scripted one (``BUILTIN``: the expert, a uniform random policy, the expert with noise
    it reports as token probabilities) or a VLA checkpoint directory."""

    name: str
    temperature: float = 0.0
    unnorm_key: str | None = None
    top_p: float = 1.0
    chunk_execution: str = "open_loop"  # a chunked VLA's chunks: open_loop or ensemble (vla.chunking)
    binarize_gripper: bool = True  # a VLA executes its gripper as 0 / 1 (vla.policy.VLAPolicy)
    _vla: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.chunk_execution not in EXECUTIONS:
            raise UsageError(f"chunk_execution={self.chunk_execution!r} is not one of {list(EXECUTIONS)}")
        if self.name not in BUILTIN:
            path = Path(self.name)
            if not (path / "config.json").is_file():
                hint = " (a training run: point to its final/ checkpoint)" if (path / "final").is_dir() else ""
                raise UsageError(f"policy={self.name!r} is neither {', '.join(map(repr, BUILTIN))} nor a checkpoint "
                                 f"directory with config.json{hint}")
            check_files(path, "point to another checkpoint, or save this one again")  # before any work or output

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_vla": None}  # workers load the model themselves

    def __call__(self, env) -> Policy:
        if self.name in BUILTIN:
            return BUILTIN[self.name][0](env)
        if self._vla is None:
            from vla.policy import VLAPolicy  # here: scripted-policy workers never load torch

            self._vla = VLAPolicy.from_pretrained(self.name, unnorm_key=self.unnorm_key, temperature=self.temperature,
                                                 top_p=self.top_p, chunk_execution=self.chunk_execution,
                                                 binarize_gripper=self.binarize_gripper)
        return self._vla

    def identity(self) -> dict:
        """{name, digest, temperature, top_p, unnorm_key[, chunk_execution][, binarize_gripper]}: the digest of a checkpoint's weights, or of a scripted
        policy's definition; a calibration applies only to the policy with the same identity."""
        gripper = {}
        if self.name in BUILTIN:
            text = json.dumps({"policy": self.name, **BUILTIN[self.name][1]}, sort_keys=True)
            digest = hashlib.sha256(text.encode()).hexdigest()
        else:
            digest = weights_digest(Path(self.name))
            gripper = {"binarize_gripper": self.binarize_gripper}
        # chunk_execution only when not the default, so that calibrations fitted before it existed still match
        executed = {} if self.chunk_execution == "open_loop" else {"chunk_execution": self.chunk_execution}
        return {"name": self.name, "digest": digest, "temperature": self.temperature, "top_p": self.top_p,
                "unnorm_key": self.unnorm_key, **executed, **gripper}


def resolve_calibration(spec: PolicySpec, path: str | None, tasks: list[str]) -> Calibration | None:
    """The calibration to apply to ``spec`` on ``tasks``: ``path`` (a calibration.json or its directory), which must
    fit the policy and cover the tasks, or with None the checkpoint's own calibration.json when it has one: refused
    when fitted for other weights, skipped (with a note) when fitted under other decoding settings or tasks."""
    if path is None:
        if spec.name in BUILTIN or not (Path(spec.name) / CALIBRATION_FILE).is_file():
            return None
        file = Path(spec.name) / CALIBRATION_FILE
    else:
        file = Path(path) / CALIBRATION_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise UsageError(f"calibration={path}: no such file; fit one with python scripts/calibrate.py")
    cal, identity = Calibration.load(file), spec.identity()
    if path is None and cal.policy["digest"] == identity["digest"]:
        wrong = cal.decoding_differences(identity)
        if wrong or set(tasks) - set(cal.tasks):
            print(f"note: not applying {file}: fitted at {cal.policy} on tasks {cal.tasks}, this run differs")
            return None
    cal.check(identity, str(file))
    cal.check_tasks(tasks)
    return cal
