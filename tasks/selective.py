"""The report blocks of a calibrated policy: its calibrated probability against the raw confidence, selective
prediction (success against coverage) and stop-and-ask (abstained episodes, what abstention saved and cost).

Scores per evaluated episode (rows of ``tasks.evaluation``; abstained episodes have no outcome and are left out):

    raw           the episode confidence, the mean over steps of the policy's per-action confidence
    calibrated    the episode model's calibrated probability of success (``Calibration.episode_probability``)
    stop_and_ask  min_t p_t, the lowest running probability over the episode (``Calibration.step_probabilities``):
                  ``abstain_below=theta`` stops an episode exactly when min_t p_t < theta, so this score's coverage
                  curve is what stop-and-ask at each threshold would keep, read off a run without abstention
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.safety import COUNT_EVENTS
from tasks import metrics as M
from tasks.calibration import Calibration, Trace

SCORES = ("raw", "calibrated", "stop_and_ask")
COVERAGE = 0.8  # the report's coverage for "success at coverage" and the stop-and-ask threshold
TARGET = 0.9  # the report's success for "coverage at success"


def events(row: dict) -> float:
    return float(sum(row["safety"].get(k, 0.0) for k in COUNT_EVENTS))


def scored(rows: list[dict], calibration: Calibration | None) -> tuple[list[bool], dict[str, list[float]]]:
    """Outcomes and the scores (module docstring) of the episodes that ran at least one step and were not abstained."""
    rows = [r for r in rows if not r.get("abstained") and r.get("confidence") is not None]
    scores: dict[str, list[float]] = {"raw": [r["confidence"] for r in rows]}
    if calibration is not None:
        traces = [Trace.of_row(r) for r in rows]
        scores["calibrated"] = [calibration.episode_probability(t) for t in traces]
        scores["stop_and_ask"] = [float(calibration.step_probabilities(t).min()) for t in traces]
    return [r["success"] for r in rows], scores


def calibrated_block(rows: list[dict], calibration: Calibration, out_dir: Path | None = None) -> dict | None:
    """ECE (10 bins), Brier, AUROC and the reliability diagram of the calibrated episode probability."""
    ok, scores = scored(rows, calibration)
    if not ok:
        return None
    p = scores["calibrated"]
    diagram = M.reliability_diagram(p, ok)
    if out_dir is not None:
        M.plot_reliability(diagram, out_dir / "reliability_calibrated.png")
    return {"n": len(ok), "ece": M.expected_calibration_error(p, ok), "brier": M.brier_score(p, ok),
            "auroc": M.auroc(p, ok), "reliability": diagram, "ece_if_calibrated": M.ece_if_calibrated(p),
            "fitted_for": calibration.policy["digest"][:12], "fit_manifest": calibration.fit.get("manifest")}


def selective_block(rows: list[dict], calibration: Calibration | None, out_dir: Path | None = None) -> dict | None:
    """Per score: its coverage curve with area, success at COVERAGE and coverage at TARGET success."""
    ok, scores = scored(rows, calibration)
    if not ok:
        return None
    block = {}
    for name, s in scores.items():
        curve = M.coverage_curve(s, ok)
        block[name] = {"area": curve["area"], f"at_coverage_{COVERAGE:g}": M.success_at_coverage(curve, COVERAGE),
                       f"at_success_{TARGET:g}": M.coverage_at_success(curve, TARGET), "curve": curve}
    if out_dir is not None:
        plot_coverage(block, out_dir / "coverage.png")
    return block


def abstention_block(rows: list[dict], remainder: list[dict] | None, abstain_below: float) -> dict:
    """Stop-and-ask: how many episodes abstained, success on the episodes run, and, from the abstained episodes run
    again without stopping (``remainder``), what abstention saved (safety events) and cost (successes)."""
    run = [r for r in rows if not r["abstained"]]
    stopped = [r for r in rows if r["abstained"]]
    n = len(rows)
    block = {
        "abstain_below": abstain_below, "n": n, "abstained": len(stopped), "coverage": len(run) / n if n else None,
        "abstained_per_task": {t: sum(r["task"] == t for r in stopped) for t in sorted({r["task"] for r in rows})},
        "success_on_run": M.success_summary([r["success"] for r in run]),
        "events_per_episode": float(np.mean([events(r) for r in rows])) if n else None,
    }
    if remainder is not None:
        again = {r["id"]: r for r in remainder}
        full = [again.get(r["id"], r) if r["abstained"] else r for r in rows]
        block["without_abstention"] = {
            "success": M.success_summary([r["success"] for r in full]),
            "events_per_episode": float(np.mean([events(r) for r in full])) if n else None,
            "abstained_would_succeed": sum(again[r["id"]]["success"] for r in stopped),
            "abstained_events_after_stop": float(sum(events(again[r["id"]]) - events(r) for r in stopped)),
        }
    return block


def plot_coverage(block: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, b in block.items():
        c = b["curve"]
        ax.step(c["coverage"], c["success"], where="post", label=f"{name} (area {b['area']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (share of episodes kept)", ylabel="success of kept episodes",
           title="Selective prediction: success against coverage")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(metrics: dict) -> list[str]:
    """The report.md lines of the calibrated, selective and abstention blocks present in ``metrics``."""
    lines, raw, cal, sel = [], metrics.get("calibration"), metrics.get("calibrated"), metrics.get("selective")
    if cal:
        lines += ["", f"## Calibrated probability of success (n = {cal['n']}; calibration fitted for weights "
                      f"{cal['fitted_for']} on {cal['fit_manifest']})", "",
                  "| score | ECE | ECE of a perfectly calibrated score here: mean (95th percentile) | Brier | AUROC |",
                  "| --- | --- | --- | --- | --- |"]
        for name, b in (("raw confidence", raw), ("calibrated probability", cal)):
            null = b["ece_if_calibrated"]
            lines.append(f"| {name} | {b['ece']:.3f} | {null['mean']:.3f} ({null['q95']:.3f}) | {b['brier']:.3f} | "
                         f"{_num(b['auroc'])} |")
        lines += ["", "![raw](reliability.png) ![calibrated](reliability_calibrated.png)"]
    if sel:
        at_c, at_s = f"at_coverage_{COVERAGE:g}", f"at_success_{TARGET:g}"
        lines += ["", "Selective prediction (keep the episodes scored highest; stop_and_ask: the lowest running "
                      "probability, the threshold being abstain_below):", "",
                  f"| score | area under success-coverage | success at {COVERAGE:.0%} coverage | coverage at "
                  f"{TARGET:.0%} success | threshold at {COVERAGE:.0%} coverage |", "| --- | --- | --- | --- | --- |"]
        for name, b in sel.items():
            a, s = b[at_c] or {}, b[at_s] or {}
            lines.append(f"| {name} | {_num(b['area'])} | {_num(a.get('success'), '.1%')} | "
                         f"{_num(s.get('coverage'), '.1%')} | {_num(a.get('threshold'))} |")
        lines += ["", "![coverage](coverage.png)"]
    ab = metrics.get("abstention")
    if ab:
        s = ab["success_on_run"]
        lines += ["", f"## Stop-and-ask (abstain_below = {ab['abstain_below']:g})", "",
                  f"- abstained: {ab['abstained']} of {ab['n']} episodes (coverage {ab['coverage']:.1%}); counted "
                  f"neither as success nor failure, per task: {ab['abstained_per_task']}",
                  f"- success on the episodes run: {_num(s['rate'], '.1%')} [{s['ci_low']:.1%}, {s['ci_high']:.1%}]",
                  f"- safety events per episode (all {ab['n']}, abstained ones up to their stop): "
                  f"{ab['events_per_episode']:.3f}"]
        w = ab.get("without_abstention")
        if w:
            lines += [f"- without abstention (the abstained episodes run again to their end): success "
                      f"{_num(w['success']['rate'], '.1%')}, {w['events_per_episode']:.3f} events per episode; the "
                      f"abstained episodes would have succeeded {w['abstained_would_succeed']} times and caused "
                      f"{w['abstained_events_after_stop']:g} more events after the stop"]
    return lines


def summary(metrics: dict) -> dict:
    """The headline figures of these blocks for summary.json (None where a block is absent)."""
    cal, sel, ab = metrics.get("calibrated"), metrics.get("selective") or {}, metrics.get("abstention")
    without = (ab or {}).get("without_abstention")
    stop = (sel.get("stop_and_ask") or {}).get(f"at_coverage_{COVERAGE:g}")
    return {
        "calibrated_ece": cal["ece"] if cal else None,
        "calibrated_auroc": cal["auroc"] if cal else None,
        f"coverage_at_success_{TARGET:g}": {k: (b[f"at_success_{TARGET:g}"] or {}).get("coverage")
                                            for k, b in sel.items()} or None,
        f"abstain_below_for_coverage_{COVERAGE:g}": stop["threshold"] if stop else None,
        "abstained": ab["abstained"] if ab else None,
        "coverage": ab["coverage"] if ab else None,
        "success_rate_without_abstention": without["success"]["rate"] if without else None,
        "safety_events_per_episode_without_abstention": without["events_per_episode"] if without else None,
    }
