"""Fit a policy's calibrated probability of success on rollouts from its own calibration seeds; find it again later.

``calibrate(CalibrateConfig(...))``, which ``scripts/calibrate.py`` runs:

    python scripts/calibrate.py policy=runs/sft/final 'task="reach,pick"' episodes_per_task=100
    python scripts/calibrate.py policy=perturbed 'task="reach,pick"' episodes_per_task=150 output_dir=runs/perturbed

The policy runs the episodes of ``calibration_manifest``: the variations (env options) of the named suites on seeds of
their own, the block ``CALIBRATION_OFFSET`` + [0, 100,000) of every task's training seeds, which no demo (0-249,999),
preference start (500,000 on), training scene (600,000 on) or evaluation suite (test seeds only) uses. The models of
``tasks.calibration`` are fitted on them and written to ``<output_dir>/calibration.json`` (output_dir: the checkpoint
directory by default) with the policy's identity (weights digest, decoding settings), the command, the seeds and the
counts; the rollouts and a summary with 5-fold cross-validated figures go to ``<output_dir>/calibration/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.evaluate import claim_dir
from harness.policies import BUILTIN, PolicySpec
from store.errors import MISSING, UsageError, require
from store.files import write_json
from tasks import TASKS, get_task
from tasks import metrics as M
from tasks.calibration import CALIBRATION_FILE, Trace, fit_calibration
from tasks.evaluation import evaluate_manifest
from tasks.parallel import check_backend
from tasks.suites import SUITES, resolve_tasks

CALIBRATION_OFFSET = 300_000  # first calibration seed in every task's training range
CALIBRATION_SEEDS = range(CALIBRATION_OFFSET, CALIBRATION_OFFSET + 100_000)
CALIBRATION_BLOCK = 2_000  # seeds per (suite axis, task): 10 axes x 5 tasks x 2,000 = 100,000
ROLLOUTS_DIR = "calibration"  # beside calibration.json
FOLDS = 5


@dataclass
class CalibrateConfig:
    policy: str = MISSING  # a VLA checkpoint directory, or perturbed (the expert with noise it reports as tokens)
    task: str = "all"  # all, a task name, or a comma-separated list (quoted: 'task="reach,pick"')
    suite: str = "success"  # whose variations the episodes take (comma-separated: 'suite="success,safety"')
    episodes_per_task: int = 100  # per task and per suite axis
    distractors: int | None = None  # objects besides the target in every episode (null: the suites' own)
    temperature: float = 0.0  # decoding; a calibration applies only under the settings it was fitted with
    top_p: float = 1.0
    unnorm_key: str | None = None
    l2: float = 1.0  # L2 penalty on the standardized feature weights
    output_dir: str | None = None  # where calibration.json goes; null: the checkpoint directory
    image_size: int = 96
    workers: int = 2
    backend: str = "local"
    batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.episodes_per_task <= CALIBRATION_BLOCK:
            raise UsageError(f"episodes_per_task={self.episodes_per_task} must be between 1 and {CALIBRATION_BLOCK}")
        if self.l2 < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError(f"l2={self.l2} and temperature={self.temperature} must be >= 0, top_p={self.top_p} "
                             "in (0, 1]")
        if self.workers < 1 or self.batch < 1:
            raise UsageError(f"workers={self.workers} and batch={self.batch} must be >= 1")
        check_backend(self.backend)
        self.suites()
        resolve_tasks(self.task)

    def suites(self) -> list[str]:
        names = [s.strip() for s in self.suite.split(",")]
        unknown = [s for s in names if s not in SUITES]
        if unknown:
            raise UsageError(f"unknown suite {unknown[0]!r}; choose among {sorted(SUITES)}")
        return names


def calibration_manifest(suites: list[str], episodes_per_task: int, tasks: list[str],
                         distractors: int | None = None) -> dict:
    """Episodes {"id", "task", "axis", "seed", "options"} on calibration seeds: axis a (counted over every suite's
    axes in SUITES order; paired axes share their suite's first block) and task t take training seeds from
    CALIBRATION_OFFSET + (a * len(TASKS) + t) * CALIBRATION_BLOCK."""
    axes = [(s, axis) for s in SUITES for axis in SUITES[s]["axes"]]
    episodes = []
    for suite in suites:
        spec = SUITES[suite]
        for axis, options in spec["axes"].items():
            a = axes.index((suite, next(iter(spec["axes"])) if spec.get("paired") else axis))
            options = options if distractors is None else {**options, "distractors": distractors}
            for task in sorted(tasks):
                first = CALIBRATION_OFFSET + (a * len(TASKS) + sorted(TASKS).index(task)) * CALIBRATION_BLOCK
                if first + CALIBRATION_BLOCK > CALIBRATION_SEEDS.stop:
                    raise ValueError("the suites' axes outgrew the calibration seed block; widen CALIBRATION_SEEDS")
                for i in range(episodes_per_task):
                    seed = get_task(task).train_seeds[first + i]
                    episodes.append({"id": f"{task}/{suite}-{axis}/{seed}", "task": task, "axis": f"{suite}-{axis}",
                                     "seed": seed, "options": options})
    body = {"suite": "calibration", "episodes": episodes}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    return {**body, "id": f"calibration-{digest}"}


def _traces(rows: list[dict]) -> list[Trace]:
    """The rows a calibration learns from: no physics error, at least one step."""
    return [Trace.of_row(r) for r in rows if r["error"] is None and r["steps"]]


def cross_validate(rows: list[dict], l2: float, folds: int = FOLDS) -> dict | None:
    """Out-of-fold episode probabilities (episode i held out in fold i mod ``folds``) against the raw confidence:
    ECE (with the ECE a perfectly calibrated score would show), Brier and AUROC of each; None when a fold would
    train on one outcome or miss a task."""
    rows = [r for r in rows if r["error"] is None and r["steps"]]
    held_out = np.zeros(len(rows))
    for k in range(folds):
        train = _traces([r for i, r in enumerate(rows) if i % folds != k])
        if len({t.success for t in train}) < 2 or len({t.task for t in train}) < len({r["task"] for r in rows}):
            return None  # too few episodes to leave any out
        cal = fit_calibration(train, {}, l2)
        for i in range(k, len(rows), folds):
            held_out[i] = cal.episode_probability(Trace.of_row(rows[i]))
    ok = [r["success"] for r in rows]
    out = {}
    for name, conf in (("raw", [r["confidence"] for r in rows]), ("calibrated", held_out.tolist())):
        out[name] = {"ece": M.expected_calibration_error(conf, ok), "ece_if_calibrated": M.ece_if_calibrated(conf),
                     "brier": M.brier_score(conf, ok), "auroc": M.auroc(conf, ok)}
    return out


def calibrate(cfg: CalibrateConfig, command: str = "python scripts/calibrate.py", required: bool = True) -> dict:
    """Run the calibration episodes (resumable), fit, write calibration.json and the summary; return the summary.

    Episodes of one outcome only cannot be calibrated: an error, or with ``required=False`` (the pipeline) a
    summary without a calibration, so that what follows runs on the raw confidence."""
    require(cfg, "policy")
    spec = PolicySpec(cfg.policy, cfg.temperature, cfg.unnorm_key, cfg.top_p)
    if cfg.output_dir is None and spec.name in BUILTIN:
        raise UsageError(f"policy={spec.name} has no checkpoint directory to hold calibration.json; pass output_dir=")
    out = Path(cfg.output_dir or spec.name)
    identity = spec.identity()
    tasks, suites = resolve_tasks(cfg.task), cfg.suites()
    manifest = calibration_manifest(suites, cfg.episodes_per_task, tasks, cfg.distractors)
    rollouts = out / ROLLOUTS_DIR
    claim_dir(rollouts, manifest, spec.name, {"digest": identity["digest"], "temperature": cfg.temperature,
                                              "top_p": cfg.top_p, "image_size": cfg.image_size})
    rows = evaluate_manifest(manifest, spec, rollouts, workers=cfg.workers, videos=0, image_size=cfg.image_size,
                             batch=cfg.batch, desc=f"calibrate {Path(spec.name).name}", backend=cfg.backend)
    if any(r["step_stats"] is None for r in rows):
        raise UsageError(f"policy={spec.name} reports no action-token probabilities to calibrate; use a VLA "
                         "checkpoint or policy=perturbed")
    traces = _traces(rows)
    if len({t.success for t in traces}) < 2 and not required:
        summary = {"policy": spec.name, "calibration": None, "episodes": len(traces),
                   "successes": int(sum(t.success for t in traces))}
        write_json(rollouts / "summary.json", summary)
        print(f"{spec.name}: the {len(traces)} calibration episodes have one outcome; no calibration written")
        return summary
    if len({t.success for t in traces}) < 2:
        raise UsageError(f"the {len(traces)} calibration episodes all {'succeeded' if traces[0].success else 'failed'}"
                         "; a calibration needs both outcomes: add tasks, suites or episodes_per_task")
    fit = {
        "command": command, "manifest": manifest["id"], "suites": suites, "tasks": tasks,
        "episodes_per_task": cfg.episodes_per_task, "distractors": cfg.distractors, "image_size": cfg.image_size,
        "seed_block": [CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.stop - 1],
        "seeds": {f"{e['task']}/{e['axis']}": [e["seed"], e["seed"] + cfg.episodes_per_task - 1]
                  for e in manifest["episodes"][:: cfg.episodes_per_task]},
        "episodes": len(traces), "successes": int(sum(t.success for t in traces)),
        "errors_left_out": len(rows) - len(traces), "l2": cfg.l2,
        "cross_validated": cross_validate(rows, cfg.l2),
    }  # fmt: skip
    calibration = fit_calibration(traces, identity, cfg.l2, fit)
    lowest = [float(calibration.step_probabilities(t).min()) for t in traces]
    curve = M.coverage_curve(lowest, [t.success for t in traces])
    fit = calibration.fit
    fit["abstain_below_for_coverage"] = {f"{c:g}": (M.success_at_coverage(curve, c) or {}).get("threshold")
                                         for c in (0.9, 0.8, 0.7)}  # on these episodes: a starting point
    calibration.save(out / CALIBRATION_FILE)
    summary = {"policy": spec.name, "calibration": str((out / CALIBRATION_FILE).resolve()),
               **{k: fit[k] for k in ("manifest", "episodes", "successes", "errors_left_out", "cross_validated",
                                      "abstain_below_for_coverage")}}
    write_json(rollouts / "summary.json", summary)
    print(f"{spec.name}: {fit['episodes']} calibration episodes, {fit['successes']} successes")
    for name, v in (fit["cross_validated"] or {}).items():
        print(f"  5-fold held out, {name:10s}: ECE {v['ece']:.3f}, Brier {v['brier']:.3f}, AUROC {v['auroc']:.3f}")
    print("  abstain_below keeping 90/80/70% of these episodes: "
          + ", ".join("n/a" if t is None else f"{t:.3f}" for t in fit["abstain_below_for_coverage"].values()))
    print(f"wrote {(out / CALIBRATION_FILE).resolve()}")
    return summary
