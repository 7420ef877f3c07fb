"""Scenes for vision-language pretraining: tabletop resets rendered without any expert, labelled by the simulator.

``generate_scenes(SceneConfig(...))`` (``python scripts/generate_scenes.py num_scenes=16000 workers=2
output_dir=data/scenes``) writes a ``store.scenes`` set: every scene's front image, the tip's proprio state, and
every object's label ("red cube") and position. A scene is a reset of the reach task (a target of any shape and
colour among distractors, the first a look-alike sharing its colour or shape; the tip at a random start), so the
pretrained model sees exactly the tasks' scenes, and each scene holds ``min_objects..max_objects`` objects, drawn
by its seed. Training scenes use training seeds from ``SEED_OFFSET`` on (apart from demos and preference starts);
the ``val`` split uses test seeds and the tasks' own clutter (three objects, one look-alike), so the grounding
figures measured on it are on held-out scenes with look-alikes present. The set depends only on the config: not on
``workers``, not on interruptions (chunks of ``CHUNK`` scenes are written atomically and skipped on a rerun).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from store import scenes as store
from store.errors import UsageError, require_dir
from store.files import write_json
from tasks import TASKS, get_task, make_env
from tasks.parallel import check_backend, worker_pool

CHUNK = 500  # scenes per chunk file (and per worker job)
SEED_OFFSET = 600_000  # first training seed of the train split (demos use 0..250,000, preferences 500,000 on)
VAL_SEED_OFFSET = 700_000  # into the test range: no suite uses this block
VAL_OBJECTS = 3  # the tasks' own clutter: the target and two distractors, one a look-alike


@dataclass
class SceneConfig:
    output_dir: str = "data/scenes"
    num_scenes: int = 16000  # training scenes
    val_scenes: int = 200  # held-out scenes (test seeds, three objects): 600 grounding queries
    min_objects: int = 1  # objects per training scene, drawn by its seed from [min_objects, max_objects]
    max_objects: int = 4
    image_size: int = 96
    workers: int = 1  # processes; the set does not depend on it
    backend: str = "local"  # local or ray (tasks.parallel)

    def __post_init__(self) -> None:
        if self.num_scenes < 1 or self.val_scenes < 0 or self.workers < 1:
            raise UsageError(f"num_scenes={self.num_scenes} and workers={self.workers} must be >= 1, val_scenes="
                             f"{self.val_scenes} >= 0")
        if not 1 <= self.min_objects <= self.max_objects <= 5:
            raise UsageError(f"objects per scene must satisfy 1 <= min_objects={self.min_objects} <= max_objects="
                             f"{self.max_objects} <= 5 (the table holds no more without overlaps)")
        if SEED_OFFSET + self.num_scenes > 1_000_000 or VAL_SEED_OFFSET + self.val_scenes > 800_000:
            raise UsageError(f"num_scenes={self.num_scenes} or val_scenes={self.val_scenes} runs out of seeds; "
                             "lower it")
        check_backend(self.backend)

    def set_config(self) -> dict:
        """What determines the set's content (workers, backend and output_dir do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "backend", "output_dir")}


def scene_plan(cfg: SceneConfig) -> list[tuple[str, int, int]]:
    """(split, seed, objects) of every scene, in index order: train first, then val."""
    task = get_task("reach")
    plan = []
    for i in range(cfg.num_scenes):
        seed = task.train_seeds[SEED_OFFSET + i]
        plan.append(("train", seed, int(np.random.default_rng([seed, 11]).integers(cfg.min_objects,
                                                                                   cfg.max_objects + 1))))
    plan += [("val", task.test_seeds[VAL_SEED_OFFSET + i], VAL_OBJECTS) for i in range(cfg.val_scenes)]
    return plan


_ENVS: dict = {}  # per worker process: one env per image size


def _render(args: tuple[int, list[tuple[str, int, int]], int, int]) -> tuple[int, list[dict]]:
    """Worker: render the scenes of one chunk."""
    chunk, plan, first, image_size = args
    if image_size not in _ENVS:
        _ENVS[image_size] = make_env("reach", image_size=image_size)
    env, rows = _ENVS[image_size], []
    for k, (split, seed, objects) in enumerate(plan):
        obs, _ = env.reset(seed=seed, options={"distractors": objects - 1})
        names = [o.name for o in env.scene.objects]
        rows.append({"index": first + k, "split": split, "seed": seed, "image": obs["image"], "state": obs["state"],
                     "names": [env.scene.get(n).label for n in names],
                     "positions": np.stack([env.object_pose(n)[0] for n in names])})
    return chunk, rows


def generate_scenes(cfg: SceneConfig) -> dict:
    """Generate (or resume) the scene set of ``cfg``; return the summary also written to summary.json."""
    out = require_dir(cfg.output_dir)
    held = store.stored_config(out)
    if held is not None and held != cfg.set_config():
        raise UsageError(f"{out} holds a scene set of other settings; choose another output_dir or delete it")
    plan, start = scene_plan(cfg), time.perf_counter()
    chunks = [(c, plan[s : s + CHUNK], s, cfg.image_size) for c, s in enumerate(range(0, len(plan), CHUNK))]
    done = store.done_chunks(out)
    todo = [job for job in chunks if job[0] not in done]
    if held is None and todo:
        with worker_pool(cfg.backend, cfg.workers) as run_jobs, \
                tqdm(total=len(plan), initial=len(plan) - sum(len(j[1]) for j in todo), desc="scenes",
                     unit="scene") as bar:
            for chunk, rows in run_jobs(_render, todo):
                store.write_chunk(out, chunk, rows)
                bar.update(len(rows))
    counts = {split: sum(p[0] == split for p in plan) for split in ("train", "val")}
    templates = [t for name in TASKS for t in get_task(name).paraphrases("train")]
    meta = store.finalize(out, cfg.set_config(), counts, templates) if held is None else {"counts": counts}
    seconds = time.perf_counter() - start
    summary = {"scenes": len(plan), **meta["counts"], "seconds": round(seconds, 1),
               "scenes_per_second": round(sum(len(j[1]) for j in todo) / seconds, 1) if todo else None}
    write_json(out / "summary.json", summary)
    print(f"wrote {len(plan)} scenes ({counts['train']} train, {counts['val']} val) to {out.resolve()}")
    return summary
