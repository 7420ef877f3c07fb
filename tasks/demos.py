"""Scripted-expert demonstrations into a LeRobot v3 dataset: resumable, parallel, deterministic.

``generate(DemoConfig(...))`` (``python scripts/generate_demos.py task=pick num_episodes=200 workers=2
output_dir=data/pick``).

Episode slot i of a task tries training seeds `seed + TASK_STRIDE * t + i * MAX_ATTEMPTS + k` for k = 0, 1, ...
(t: the task's place in sorted task names) and keeps the first successful, error-free rollout, so the dataset depends
only on the arguments: not on `workers`, not on interruptions. Tasks draw from separate seed blocks because a seed
sets the scene: with shared seeds, reach and pick demos would start from the same scenes and a multi-task dataset
would hold half as many different ones.

With `paired=true`, slots 2j and 2j + 1 share their seeds, so they start from the same scene: the first names the
target, the second its look-alike (`swap_target`). The two demos differ only in the instruction and where the arm
goes, which is the signal that teaches a policy to read the instruction in clutter.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sim.env import ACTION_NAMES, CONTROL_HZ, STATE_NAMES
from store.errors import UsageError
from store.files import write_json
from store.lerobot import Episode, LeRobotDataset, is_complete
from store.writer import DatasetWriter
from tasks import TASKS, get_task, make_env
from tasks.parallel import check_backend, worker_pool
from tasks.rollout import rollout

MAX_ATTEMPTS = 8
TASK_STRIDE = 50_000  # training seeds per task block; preference collection starts at 500,000


@dataclass
class DemoConfig:
    task: str = "pick"  # a task name, "all", or a comma-separated list (quoted on the command line)
    num_episodes: int = 50  # kept (successful) episodes per task
    workers: int = 1  # processes; the result does not depend on it
    backend: str = "local"  # local processes, or ray (tasks.parallel); the result does not depend on it
    seed: int = 0  # offset into each task's training seeds
    image_size: int = 96
    noise: float = 0.003  # std (m) of the expert's translation noise in free-space moves
    dart: float = 0.0  # std (m) of DART noise: each executed translation perturbed, the recorded label the expert's
    distractors: int = 2
    min_distractors: int | None = None  # when set, each episode draws its clutter in [min_distractors, distractors]
    paired: bool = False  # demo each scene twice: for the target, then for its look-alike (teaches instruction use)
    output_dir: str = "data/pick"  # conf/generate_demos.yaml: data/<task>

    def __post_init__(self) -> None:
        for name in ("num_episodes", "workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be at least 1")
        if self.dart < 0:
            raise UsageError(f"dart={self.dart} must be >= 0 (std in metres of the executed translation's noise)")
        if self.seed < 0:
            raise UsageError(f"seed={self.seed} must be >= 0 (it offsets into the training seed range)")
        if self.min_distractors is not None and not 0 <= self.min_distractors <= self.distractors:
            raise UsageError(f"min_distractors={self.min_distractors} must lie in [0, distractors={self.distractors}]"
                             " (or be null for distractors in every episode)")
        fewest = self.distractors if self.min_distractors is None else self.min_distractors
        if self.paired and fewest < 1:
            raise UsageError("paired=true names the target's look-alike in the same scene, so every scene needs a "
                             "distractor; set distractors (and min_distractors) >= 1")
        if self.seed + self.num_episodes * MAX_ATTEMPTS > TASK_STRIDE:
            raise UsageError(f"seed={self.seed} with num_episodes={self.num_episodes} runs past a task's block of "
                             f"{TASK_STRIDE:,} training seeds ({MAX_ATTEMPTS} per episode) into the next task's; "
                             f"keep seed + {MAX_ATTEMPTS} x num_episodes <= {TASK_STRIDE:,}, e.g. several datasets "
                             "with seed=0, 25000")
        for name in self.tasks():
            get_task(name)
        check_backend(self.backend)

    def tasks(self) -> list[str]:
        return sorted(TASKS) if self.task == "all" else [t.strip() for t in self.task.split(",")]

    def dataset_config(self) -> dict:
        """What determines the dataset's content (workers does not)."""
        cfg = asdict(self)
        for key in ("workers", "backend", "output_dir"):
            cfg.pop(key)
        if not cfg["dart"]:  # at its no-op default: datasets written before the option existed still resume
            cfg.pop("dart")
        cfg["tasks"] = self.tasks()
        return cfg


def _slots(cfg: DemoConfig) -> list[tuple[int, str, int]]:
    """(episode index, task, slot within task), task-major."""
    return [(t * cfg.num_episodes + i, name, i) for t, name in enumerate(cfg.tasks()) for i in range(cfg.num_episodes)]


def slot_start(seed: int, name: str, slot: int, paired: bool) -> int:
    """The training-seed index of attempt 0 of episode slot `slot`; paired slots 2j and 2j + 1 share slot j's."""
    return seed + TASK_STRIDE * sorted(TASKS).index(name) + (slot // 2 if paired else slot) * MAX_ATTEMPTS


def distractors(cfg: DemoConfig, seed: int) -> int:
    """The clutter of the episode on `seed`: `cfg.distractors`, or a draw from [min_distractors, distractors]
    that depends on the seed alone (a mix of easy and cluttered scenes)."""
    if cfg.min_distractors is None:
        return cfg.distractors
    # [seed, 7]: a stream of its own, apart from the scene's default_rng(seed)
    return int(np.random.default_rng([seed, 7]).integers(cfg.min_distractors, cfg.distractors + 1))


_ENVS: dict = {}  # per worker process: one env per (task, image size), built on first use


def _generate(args: tuple[DemoConfig, int, str, int]) -> tuple[int, Episode | None, list[str]]:
    """Worker: roll out the expert on successive seeds of one slot until an episode succeeds cleanly."""
    cfg, index, name, slot = args
    key = (name, cfg.image_size)
    if key not in _ENVS:
        _ENVS[key] = make_env(name, image_size=cfg.image_size)
    env = _ENVS[key]
    task = env.task
    errors = []
    options = {"swap_target": bool(slot % 2)} if cfg.paired else {}  # the second of a pair names the look-alike
    for k in range(MAX_ATTEMPTS):
        seed = task.train_seeds[slot_start(cfg.seed, name, slot, cfg.paired) + k]
        expert = task.expert(env, seed=seed, noise=cfg.noise, dart=cfg.dart)
        r = rollout(env, expert, seed, options={"distractors": distractors(cfg, seed), **options})
        if r.error:
            errors.append(f"{name} seed {seed}: {r.error}")
        if r.success and r.error is None:
            episode = Episode(
                task=name, instruction=r.instruction, seed=seed, success=True, images=r.images, states=r.states,
                actions=r.actions, safety=r.safety, objects=r.objects, object_positions=r.object_positions,
                target_index=r.target_index,
            )
            return index, episode, errors
    return index, None, errors


def generate(cfg: DemoConfig) -> dict:
    """Generate (or resume) the dataset described by `cfg`; returns the summary also written to summary.json."""
    out = Path(cfg.output_dir)
    writer = DatasetWriter(
        out, fps=CONTROL_HZ, state_names=list(STATE_NAMES), action_names=list(ACTION_NAMES), config=cfg.dataset_config()
    )
    done = writer.done_indices()
    todo = [(cfg, i, name, slot) for i, name, slot in _slots(cfg) if i not in done]
    start = time.perf_counter()
    failed, errors, frames_new = [], [], 0
    if todo:
        with worker_pool(cfg.backend, cfg.workers) as run_jobs, \
                tqdm(total=len(_slots(cfg)), initial=len(done), desc="demos", unit="ep") as bar:
            for index, episode, errs in run_jobs(_generate, todo):
                errors += errs
                if episode is None:
                    failed.append(index)
                else:
                    writer.write_episode(index, episode)
                    frames_new += len(episode.actions)
                bar.update()
    for e in errors:
        print(f"discarded (physics error): {e}", file=sys.stderr)
    if failed:
        raise RuntimeError(
            f"the expert failed {MAX_ATTEMPTS} seeds in a row for episodes {failed[:5]}; the task or expert is broken"
        )
    seconds = time.perf_counter() - start
    info = writer.finalize()
    summary = _summary(out, info, seconds, frames_new)
    write_json(out / "summary.json", summary)
    print(f"wrote {summary['episodes']} episodes, {summary['frames']} frames to {out.resolve()}")
    return summary


def _summary(out: Path, info: dict, seconds: float, frames_new: int) -> dict:
    """Headline figures; the discard count is derived from the kept seeds, so a resumed run reports the same."""
    episodes = LeRobotDataset(out).episodes  # opening it checks that the files are whole, on a rerun too
    cfg = info["tabletop_vla"]["config"]
    per_task, discarded = {}, 0
    for ep in episodes:
        name = ep["task_name"]
        slot = ep["episode_index"] % cfg["num_episodes"]  # slots are task-major
        attempt = ep["seed"] - slot_start(cfg["seed"], name, slot, cfg.get("paired", False))
        discarded += attempt
        stats = per_task.setdefault(name, {"episodes": 0, "frames": 0, "discarded": 0})
        stats["episodes"] += 1
        stats["frames"] += ep["length"]
        stats["discarded"] += attempt
    for stats in per_task.values():
        stats["expert_success_rate"] = stats["episodes"] / (stats["episodes"] + stats["discarded"])
    return {
        "episodes": info["total_episodes"],
        "frames": info["total_frames"],
        "discarded": discarded,
        "expert_success_rate": info["total_episodes"] / (info["total_episodes"] + discarded),
        "per_task": per_task,
        "seconds": round(seconds, 2),
        "frames_per_second": round(frames_new / seconds, 1) if seconds > 0 and frames_new else None,
        "complete": is_complete(out),
    }
