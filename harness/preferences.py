"""Collect judged preference pairs: K sampled rollouts of a VLA policy from each start state, best vs worst.

``collect(CollectConfig(...))``, which ``scripts/collect_preferences.py`` runs:

    python scripts/collect_preferences.py policy=runs/sft/final starts=200 rollouts_per_start=4 output_dir=prefs/sft

Start state i is (task, seed, options): tasks take turns (i % number of tasks); the j-th start of a task uses its
training seed ``seed_offset + j`` (500000 on: far from the demo seeds, and never an evaluation seed, which come from
the test range) and, on a ``safety_fraction`` of each task's starts, the safety suite's hazards (a fragile vase and a
keep-out zone beside the path), else the training distribution. Rollout k of a start resets the env with the same
seed and options, so all K begin in the identical simulator state, and samples the policy at ``temperature`` (and
``top_p``, nucleus sampling) with its own seed (from the start's seed and k). ``tasks.judge`` scores each rollout
and ``pick_pairs`` pairs them; rollouts that ended in a physics error are stored but never paired. When the checkpoint
holds a calibration.json fitted under the same decoding settings (``scripts/calibrate.py ... temperature=1.0``), the
judge's calibrated axis reads the calibrated probability of success instead of the raw token confidence.

Writes into output_dir a preference set (``store.preferences``: the rollouts as a LeRobot v3 dataset, episode =
start * K + k, ``rollouts.parquet`` and ``pairs.parquet``) and ``summary.json``. Interrupted runs resume: finished
starts are skipped (rerun with the same arguments).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness.policies import BUILTIN, PolicySpec, resolve_calibration
from sim.env import ACTION_NAMES, CONTROL_HZ, STATE_NAMES
from sim.safety import COUNT_EVENTS
from store.errors import MISSING, UsageError, require
from store.files import write_json
from store.intact import read_json
from store.lerobot import Episode, is_complete
from store.preferences import write_tables
from store.writer import DatasetWriter
from tasks import get_task, make_env
from tasks.calibration import Calibration
from tasks.judge import AXES, PAIR_KINDS, JudgeWeights, judge, pair_kind, pick_pairs, summarize
from tasks.parallel import check_backend, worker_pool
from tasks.rollout import rollout
from tasks.suites import SUITES, resolve_tasks
from vla.checkpoint import ACTION_STATS_FILE

STAGING = ".starts"  # one JSON per finished start state, until the tables are written
SAFETY_OPTIONS = SUITES["safety"]["axes"]["hazards"]


@dataclass
class CollectConfig:
    policy: str = MISSING  # a VLA checkpoint directory (it must report token ids and confidences)
    output_dir: str = MISSING  # the preference set; rerun with the same arguments to resume
    starts: int = 200  # start states (task, training seed, options), tasks taking turns
    rollouts_per_start: int = 4  # K
    task: str = "all"  # all, a task name, or a comma-separated list
    temperature: float = 1.0  # sampling temperature of the policy (> 0, or all K rollouts are alike)
    top_p: float = 1.0  # nucleus sampling: draw from the most probable bins that hold this mass (1 = all bins)
    safety_fraction: float = 0.5  # share of each task's starts with the safety suite's hazards
    distractors: int | None = None  # objects besides the target in every start; null = the tasks' own (2)
    seed_offset: int = 500_000  # first training seed per task: far from demo seeds; evaluation uses test seeds only
    max_steps: int | None = None  # step budget per rollout; null = each task's own
    margin: float = 0.05  # minimum gap in judge total between chosen and rejected
    pairs_per_start: int = 1  # widest-gap pairs kept per start (the first is best vs worst)
    judge: JudgeWeights = field(default_factory=JudgeWeights)
    image_size: int = 96
    unnorm_key: str | None = None  # which action statistics of a multi-dataset checkpoint
    workers: int = 1  # processes (one torch thread each); the data do not depend on it
    backend: str = "local"  # local processes, or ray (tasks.parallel)

    def __post_init__(self) -> None:
        if self.policy in BUILTIN:
            raise UsageError(f"policy={self.policy} is scripted: it reports no action tokens of a model for DPO to "
                             "train; pass a VLA checkpoint directory")
        for name in ("starts", "rollouts_per_start", "pairs_per_start", "workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")
        if self.rollouts_per_start < 2:
            raise UsageError(f"rollouts_per_start={self.rollouts_per_start} must be >= 2 to make a pair")
        if not self.temperature > 0:
            raise UsageError(f"temperature={self.temperature} must be > 0: greedy rollouts of one start are identical")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p={self.top_p} must lie in (0, 1] (1 = sample from every bin)")
        if not 0 <= self.safety_fraction <= 1 or self.margin < 0:
            raise UsageError(f"safety_fraction={self.safety_fraction} must lie in [0, 1] and margin={self.margin} >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"max_steps={self.max_steps} must be >= 1 (or null for the tasks' budgets)")
        if self.distractors is not None and self.distractors < 0:
            raise UsageError(f"distractors={self.distractors} must be >= 0 (or null for the tasks' own clutter)")
        check_backend(self.backend)
        per_task = -(-self.starts // len(self.tasks()))
        for name in self.tasks():
            seeds = get_task(name).train_seeds
            if self.seed_offset < 0 or self.seed_offset + per_task > len(seeds):
                raise UsageError(f"seed_offset={self.seed_offset} + {per_task} starts leaves the {len(seeds)} "
                                 f"training seeds of {name}; lower seed_offset or starts")

    def tasks(self) -> list[str]:
        return resolve_tasks(self.task)

    def dataset_config(self) -> dict:
        """What determines the output (workers and output_dir do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "backend", "output_dir")}


def start_states(cfg: CollectConfig) -> list[dict]:
    """Start i: {"index", "task", "kind" ("train" | "safety"), "seed", "options"}."""
    tasks, f, out = cfg.tasks(), cfg.safety_fraction, []
    clutter = {} if cfg.distractors is None else {"distractors": cfg.distractors}
    for i in range(cfg.starts):
        task, j = tasks[i % len(tasks)], i // len(tasks)
        safety = int((j + 1) * f) - int(j * f) == 1  # evenly spread: exactly round-down(n * f) of a task's n starts
        out.append({"index": i, "task": task, "kind": "safety" if safety else "train",
                    "seed": get_task(task).train_seeds[cfg.seed_offset + j],
                    "options": (SAFETY_OPTIONS if safety else {}) | clutter})  # | makes a new dict
    return out


def rollout_seed(start_seed: int, k: int) -> int:
    """The sampling seed of rollout k of a start (independent streams from numpy's SeedSequence)."""
    return int(np.random.SeedSequence([start_seed, k]).generate_state(1)[0])


class _Reseeded:
    """A policy that `rollout` resets with the env seed, reseeded instead with this rollout's own seed."""

    def __init__(self, policy, seed: int):
        self.policy, self.seed = policy, seed

    def reset(self, seed: int | None = None) -> None:
        self.policy.reset(self.seed)

    def act(self, obs):
        return self.policy.act(obs)


_worker: dict = {}  # per process: the policy spec, the config and one env per task


def _init(spec: PolicySpec, cfg: CollectConfig) -> None:
    torch.set_num_threads(1)  # one thread per episode, so that the numbers do not depend on workers
    _worker.update(spec=spec, cfg=cfg, envs={})


def _run_start(start: dict) -> tuple[dict, list, int]:
    """K rollouts from one start state -> (start, rollouts, step budget)."""
    cfg, envs = _worker["cfg"], _worker["envs"]
    if start["task"] not in envs:
        envs[start["task"]] = make_env(start["task"], image_size=cfg.image_size)
    env = envs[start["task"]]
    policy, budget = _worker["spec"](env), cfg.max_steps or env.task.max_steps
    runs = [rollout(env, _Reseeded(policy, rollout_seed(start["seed"], k)), start["seed"], dict(start["options"]),
                    max_steps=budget) for k in range(cfg.rollouts_per_start)]
    return start, runs, budget


def judge_start(cfg: CollectConfig, start: dict, runs: list, budget: int, calibration: Calibration | None = None
                ) -> dict:
    """The staged record of one start: a row per rollout and the chosen pairs."""
    K, rows, summaries = cfg.rollouts_per_start, [], []
    for k, r in enumerate(runs):
        summary = summarize(r, budget, calibration)
        scores = judge(summary, cfg.judge)
        summaries.append(summary)
        rows.append({
            "episode_index": start["index"] * K + k, "start_index": start["index"], "k": k, "task": start["task"],
            "kind": start["kind"], "seed": start["seed"], "options": json.dumps(start["options"], sort_keys=True),
            "rollout_seed": rollout_seed(start["seed"], k), "instruction": r.instruction, "success": r.success,
            "steps": r.steps, "max_steps": budget, "error": r.error, "confidence": r.confidence, **asdict(scores),
            **{f"safety/{e}": float(r.safety.get(e, 0.0)) for e in COUNT_EVENTS},
            "token_ids": np.stack([i["token_ids"] for i in r.step_info]).tolist(),
            "log_probs": [float(i["log_probs"]) for i in r.step_info],
            "step_confidence": [float(i["confidence"]) for i in r.step_info],
            "chunk_offsets": [int(i.get("chunk_offset", 0)) for i in r.step_info],
            **({} if calibration is None else {"success_probability": summary.success_probability}),
        })  # fmt: skip
    valid = [k for k, r in enumerate(runs) if r.error is None]
    pairs = []
    for p in pick_pairs([summaries[k] for k in valid], cfg.margin, cfg.judge, cfg.pairs_per_start):
        chosen, rejected = valid[p.chosen], valid[p.rejected]
        pairs.append({
            "start_index": start["index"], "task": start["task"], "kind": start["kind"],
            "chosen": start["index"] * K + chosen, "rejected": start["index"] * K + rejected, "gap": p.gap,
            "axis": p.axis, "reason": p.reason,
            **{f"chosen_{a}": getattr(p.chosen_scores, a) for a in (*AXES, "total")},
            **{f"rejected_{a}": getattr(p.rejected_scores, a) for a in (*AXES, "total")},
        })  # fmt: skip
    return {"start": start, "rollouts": rows, "pairs": pairs}


def summarize_collection(cfg: CollectConfig, records: list[dict], seconds: float) -> dict:
    rows = [r for rec in records for r in rec["rollouts"]]
    pairs = [p for rec in records for p in rec["pairs"]]
    clean = [r for r in rows if r["error"] is None]

    def mean(values) -> float | None:
        values = list(values)
        return float(np.mean(values)) if values else None

    by_kind = {kind: [r for r in clean if r["kind"] == kind] for kind in ("train", "safety")}
    by_episode = {r["episode_index"]: r for r in rows}

    def events(row: dict) -> float:
        return sum(row[f"safety/{e}"] for e in COUNT_EVENTS)

    def kind(pair: dict) -> str:
        c, r = by_episode[pair["chosen"]], by_episode[pair["rejected"]]
        return pair_kind(c["success"], r["success"], events(c), events(r), c["steps"], r["steps"])

    kinds = Counter(map(kind, pairs))
    return {
        "policy": str(Path(cfg.policy).resolve()), "starts": len(records), "rollouts": len(rows), "pairs": len(pairs),
        "starts_without_pair": sum(not rec["pairs"] for rec in records), "errors": len(rows) - len(clean),
        "rollout_success_rate": mean(r["success"] for r in clean),
        "mean_scores": {a: mean(r[a] for r in clean) for a in (*AXES, "total")},
        "events_per_rollout": {k: mean(map(events, rs)) for k, rs in by_kind.items()},
        "pair_axis": dict(Counter(p["axis"] for p in pairs)),  # the axis that explains most of each pair's gap
        "pair_mix": {kind: kinds[kind] for kind in PAIR_KINDS},  # what the pairs contrast (tasks.judge.pair_kind)
        "pair_reasons": dict(Counter(part.split(":")[0] for p in pairs for part in p["reason"].split("; "))),
        "chosen_mean": {a: mean(p[f"chosen_{a}"] for p in pairs) for a in (*AXES, "total")},
        "rejected_mean": {a: mean(p[f"rejected_{a}"] for p in pairs) for a in (*AXES, "total")},
        "per_task": {t: {"starts": sum(rec["start"]["task"] == t for rec in records),
                         "pairs": sum(p["task"] == t for p in pairs),
                         "success_rate": mean(r["success"] for r in clean if r["task"] == t)} for t in cfg.tasks()},
        "seconds": round(seconds, 1),
    }


def collect(cfg: CollectConfig) -> dict:
    """Collect (or resume) the preference set described by ``cfg``; return the summary also written to summary.json."""
    require(cfg, "policy", "output_dir")
    spec = PolicySpec(cfg.policy, cfg.temperature, cfg.unnorm_key, cfg.top_p)  # raises for a directory without a model
    calibration = resolve_calibration(spec, None, cfg.tasks())  # the checkpoint's own, if fitted for this run
    if not (Path(cfg.policy) / ACTION_STATS_FILE).is_file():
        raise UsageError(f"policy={cfg.policy} holds no {ACTION_STATS_FILE}; pass a checkpoint written by "
                         "scripts/train_sft.py")
    out = Path(cfg.output_dir)
    writer = DatasetWriter(out, fps=CONTROL_HZ, state_names=list(STATE_NAMES), action_names=list(ACTION_NAMES),
                           config=cfg.dataset_config())
    if is_complete(out) and (out / "summary.json").is_file():
        print(f"{out} is complete; choose another output_dir to collect more")
        return read_json(out / "summary.json", "delete it and rerun to write it again, or choose another output_dir")
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    done = {int(p.stem.split("-")[1]) for p in staging.glob("start-*.json")}
    todo = [s for s in start_states(cfg) if s["index"] not in done]
    t0, threads = time.perf_counter(), torch.get_num_threads()
    if todo:
        try:
            with worker_pool(cfg.backend, cfg.workers, _init, (spec, cfg)) as run_jobs, \
                    tqdm(total=cfg.starts, initial=len(done), desc="starts", unit="start") as bar:
                for start, runs, budget in run_jobs(_run_start, todo):
                    for k, r in enumerate(runs):
                        writer.write_episode(start["index"] * cfg.rollouts_per_start + k, Episode(
                            task=r.task, instruction=r.instruction, seed=r.seed, success=r.success, images=r.images,
                            states=r.states, actions=r.actions, safety=r.safety))
                    record = judge_start(cfg, start, runs, budget, calibration)
                    write_json(staging / f"start-{start['index']:06d}.json", record)
                    bar.update()
        finally:
            for env in _worker.pop("envs", {}).values():  # inline run: this process's envs and threads
                env.close()
            torch.set_num_threads(threads)
    writer.finalize()
    records = [read_json(staging / f"start-{i:06d}.json", "delete it and rerun, which collects that start again")
               for i in range(cfg.starts)]
    write_tables(out, records)
    summary = summarize_collection(cfg, records, time.perf_counter() - t0)
    write_json(out / "summary.json", summary)
    for p in staging.iterdir():
        p.unlink()
    staging.rmdir()
    print(f"wrote {summary['rollouts']} rollouts and {summary['pairs']} pairs from {summary['starts']} starts to "
          f"{out.resolve()}")
    return summary
