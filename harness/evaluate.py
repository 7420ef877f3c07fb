"""Evaluate any policy on a suite; optionally compare it with a baseline on the identical episodes.

``evaluate(EvalConfig(...))``, which ``scripts/evaluate.py`` runs:

    python scripts/evaluate.py policy=runs/sft/final suite=success episodes_per_task=50 workers=2
    python scripts/evaluate.py policy=runs/dpo/final baseline=runs/sft/final suite=safety
    python scripts/evaluate.py policy=runs/sft/final abstain_below=0.3     # stop-and-ask (docs/calibration.md)

Writes report.md, metrics.json, summary.json, PNG plots and GIF rollouts into output_dir and prints the headline.
Rerunning after an interruption resumes from the finished episodes. With a calibration (the checkpoint's own
calibration.json, or ``calibration=``) the report adds the calibrated probability of success and selective prediction;
with ``abstain_below`` the policy stops when that probability falls below it, abstained episodes are counted apart,
and they run again without stopping (``remainder/``) to show what abstention saved and what it cost.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from harness.policies import PolicySpec, resolve_calibration
from store.errors import UsageError, require_dir
from store.files import write_json
from store.intact import read_json
from tasks import selective
from tasks.calibration import StopAndAsk
from tasks.evaluation import evaluate_manifest, load_results
from tasks.parallel import check_backend
from tasks.report import compare, compute_metrics, write_report
from tasks.suites import build_manifest, resolve_tasks


@dataclass
class EvalConfig:
    policy: str = "expert"  # expert | random | a checkpoint directory
    suite: str = "success"  # success | generalization | safety | instruction
    task: str = "all"  # all, a task name, or a comma-separated list (quoted on the command line: 'task="reach,pick"')
    episodes_per_task: int = 20  # per task and per axis of the suite
    workers: int = 2  # processes; the metrics do not depend on it
    backend: str = "local"  # local | ray (docs/scaling.md)
    videos: int = 2  # GIF rollouts to record
    batch: int = 8  # episodes run in lockstep per worker, the VLA acting on all of them in one call
    baseline: str | None = None  # a policy (as above) or an earlier report dir, compared on the same episodes
    temperature: float = 0.0  # VLA decoding: 0 = greedy
    chunk_execution: str = "open_loop"  # a chunked VLA (model.action_chunk > 1): open_loop or ensemble (ACT's)
    binarize_gripper: bool = True  # a VLA's gripper executed as 0 / 1 (threshold 0.5); false: the bin centres
    unnorm_key: str | None = None  # which action statistics of a multi-dataset checkpoint
    image_size: int = 96
    distractors: int | None = None  # objects besides the target in every episode (null: the suite's own, 2)
    calibration: str | None = None  # a calibration.json (or its directory); null: the checkpoint's own, if any
    abstain_below: float | None = None  # stop-and-ask: stop when the calibrated probability of success drops below
    output_dir: str = "reports/success"  # conf/evaluate.yaml: reports/<suite>

    def __post_init__(self) -> None:
        if self.abstain_below is not None and not 0 < self.abstain_below < 1:
            raise UsageError(f"abstain_below={self.abstain_below} must lie in (0, 1) (null: never abstain)")
        if self.workers < 1 or self.batch < 1 or self.videos < 0:
            raise UsageError(f"workers={self.workers} and batch={self.batch} must be >= 1, videos={self.videos} >= 0")
        if self.temperature < 0:
            raise UsageError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        check_backend(self.backend)


def _is_report(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file() and (Path(path) / "metrics.json").is_file()


def _read_manifest(path: Path, fix: str) -> dict:
    """An evaluation's manifest.json, refused with ``fix`` when damaged."""
    manifest = read_json(path, fix)
    if not isinstance(manifest, dict) or "id" not in manifest:
        raise UsageError(f"{path} holds no evaluation manifest (no id); {fix}", path=path)
    return manifest


def claim_dir(out_dir: Path, manifest: dict, policy: str, settings: dict | None = None) -> None:
    """Tie out_dir to one (manifest, policy, settings that change the episodes): a rerun resumes it, anything else
    is refused."""
    stamp = require_dir(out_dir) / "manifest.json"
    if stamp.exists():
        old = _read_manifest(stamp, f"delete {out_dir} to evaluate again, or choose another output_dir")
        if old["id"] != manifest["id"] or old.get("policy") != policy or old.get("settings") != settings:
            raise UsageError(
                f"{out_dir} holds an evaluation of {old.get('policy')} on {old['id']} ({old.get('settings')}), not "
                f"{policy} on {manifest['id']} ({settings}); choose another output_dir or delete it"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({**manifest, "policy": policy, **({"settings": settings} if settings else {})},
                                indent=1))


def evaluate(cfg: EvalConfig, command: str = "python scripts/evaluate.py") -> dict:
    manifest = build_manifest(cfg.suite, cfg.episodes_per_task, resolve_tasks(cfg.task), cfg.distractors)
    spec = PolicySpec(cfg.policy, cfg.temperature, cfg.unnorm_key, chunk_execution=cfg.chunk_execution,
                      binarize_gripper=cfg.binarize_gripper)
    base_spec = base_name = None  # base_spec stays None when the baseline is an earlier report
    if cfg.baseline is not None:  # check the baseline before any work
        if _is_report(cfg.baseline):
            old = _read_manifest(Path(cfg.baseline) / "manifest.json", "evaluate the baseline again, or pass the "
                                 "baseline policy itself")
            if old["id"] != manifest["id"]:
                raise UsageError(
                    f"baseline {cfg.baseline} was evaluated on {old['id']}, not {manifest['id']}: re-evaluate it "
                    "with the same suite, task and episodes_per_task, or pass the baseline policy itself"
                )
            base_name = old["policy"]
        else:
            base_spec = PolicySpec(cfg.baseline, cfg.temperature, cfg.unnorm_key, binarize_gripper=cfg.binarize_gripper)
            base_name = base_spec.name
    calibration = resolve_calibration(spec, cfg.calibration, resolve_tasks(cfg.task))
    if cfg.abstain_below is not None and calibration is None:
        raise UsageError(f"abstain_below needs a calibration of {spec.name}: fit one with python scripts/calibrate.py "
                         f"policy={spec.name} ... or pass calibration=PATH")
    stop = None if cfg.abstain_below is None else StopAndAsk(calibration, cfg.abstain_below)
    out = Path(cfg.output_dir)
    claim_dir(out, manifest, spec.name, stop and {"abstain_below": stop.abstain_below,
                                                  "calibration": calibration.policy["digest"]})
    for stale in ("metrics.json", "summary.json"):
        (out / stale).unlink(missing_ok=True)

    start = time.perf_counter()
    run = dict(workers=cfg.workers, videos=cfg.videos, image_size=cfg.image_size, batch=cfg.batch,
               backend=cfg.backend)
    rows = evaluate_manifest(manifest, spec, out, desc=f"{Path(spec.name).name} {cfg.suite}", monitor=stop, **run)
    remainder = None
    if stop is not None:  # the abstained episodes again, without stopping: what abstention saved and cost
        again = {"id": f"{manifest['id']}-remainder", "episodes": [e for e, r in zip(manifest["episodes"], rows)
                                                                   if r["abstained"]]}
        claim_dir(out / "remainder", again, spec.name)
        remainder = evaluate_manifest(again, spec, out / "remainder", desc="remainder", **{**run, "videos": 0})
    seconds = time.perf_counter() - start
    comparison = None
    if cfg.baseline is not None:
        if base_spec is None:
            base_rows = list(load_results(Path(cfg.baseline)).values())
        else:
            base_out = out / "baseline"
            claim_dir(base_out, manifest, base_name)
            base_rows = evaluate_manifest(manifest, base_spec, base_out, desc=f"baseline {cfg.suite}", **run)
        comparison = compare(rows, base_rows, spec.name, base_name)
    metrics = compute_metrics(rows, manifest, spec.name, out, calibration, cfg.abstain_below, remainder)
    write_report(out, metrics, rows, command, comparison)
    o, cal = metrics["overall"], metrics["calibration"]
    summary = {
        "policy": spec.name, "suite": manifest["id"], "episodes": o["n"], "success_rate": o["rate"],
        "success_ci": [o["ci_low"], o["ci_high"]], "safe_success_rate": o["safe_success"]["rate"],
        "safety_events_per_episode": metrics["safety"]["events_per_episode"],
        "ece": cal["ece"] if cal else None, "seconds": round(seconds, 1),
        "episodes_per_minute": round(60 * o["n"] / seconds, 1) if seconds > 0 else None,
        "per_task": {k: v["rate"] for k, v in metrics["per_task"].items()},
        "per_axis": {k: v["rate"] for k, v in metrics["per_axis"].items()},
        "per_axis_other_success": {k: v["other_success"]["rate"] for k, v in metrics["per_axis"].items()
                                   if "other_success" in v} or None,
        "comparison": None if comparison is None else {
            **{k: comparison[k] for k in ("baseline", "verdict_success", "verdict_safety")},
            "success_diff": [comparison["success"][k] for k in ("diff", "ci_low", "ci_high")],  # Newcombe
            "events_relative_change": comparison["safety_events"]["relative_change"]},
        **selective.summary(metrics),
    }
    write_json(out / "summary.json", summary)
    print(f"{spec.name} on {manifest['id']}: success {100 * (o['rate'] or 0):.1f}% "
          f"[{100 * o['ci_low']:.1f}, {100 * o['ci_high']:.1f}] over {o['n']} episodes, "
          f"{summary['safety_events_per_episode']:.2f} safety events per episode")
    for task, rate in summary["per_task"].items():
        print(f"  {task:8s} {100 * rate:5.1f}%")
    for axis, rate in (summary["per_axis_other_success"] or {}).items():
        print(f"  {axis}: success {100 * summary['per_axis'][axis]:.1f}% at the named object, "
              f"{100 * rate:.1f}% at the other")
    if summary["calibrated_ece"] is not None:
        print(f"  calibrated probability: ECE {summary['calibrated_ece']:.3f} (raw confidence {summary['ece']:.3f})")
    if summary["abstained"] is not None:
        print(f"  stop-and-ask: {summary['abstained']} episodes abstained (coverage {100 * summary['coverage']:.1f}%); "
              f"without abstention success {100 * summary['success_rate_without_abstention']:.1f}%, "
              f"{summary['safety_events_per_episode_without_abstention']:.2f} events per episode")
    if comparison:
        print(" ", comparison["verdict_success"], "\n ", comparison["verdict_safety"])
    print(f"wrote {out.resolve()}/report.md")
    return summary
