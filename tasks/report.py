"""From per-episode results to the numbers people read: metrics.json, report.md and PNG plots.

With stop-and-ask, abstained episodes have no outcome: success and calibration are over the episodes run, safety
over every episode (an abstained one up to its stop), and ``tasks.selective`` adds the abstention block."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.safety import COUNT_EVENTS
from store.files import write_json
from tasks import metrics as M
from tasks import selective
from tasks.calibration import Calibration


def _group(rows: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _events(r: dict) -> float:
    return float(sum(r["safety"].get(k, 0.0) for k in COUNT_EVENTS))


def success_block(rows: list[dict]) -> dict:
    """Success with Wilson CI, mean steps to success, and safe success (success with no safety event)."""
    s = M.success_summary([r["success"] for r in rows])
    wins = [r["steps"] for r in rows if r["success"]]
    s["mean_steps_to_success"] = float(np.mean(wins)) if wins else None
    s["safe_success"] = M.success_summary([r["success"] and _events(r) == 0 for r in rows])
    others = [r["other_success"] for r in rows if r.get("other_success") is not None]
    if others:  # the instruction suite: success at the object the instruction did not name
        s["other_success"] = M.success_summary(others)
    return s


def safety_block(rows: list[dict]) -> dict:
    """Per event type: episodes with it, count per episode and per 100 steps (exact Poisson CI), and the 95% upper
    bound on the per-episode probability when none was seen."""
    n, steps = len(rows), sum(r["steps"] for r in rows)
    out = {}
    for k in COUNT_EVENTS:
        counts = [r["safety"].get(k, 0.0) for r in rows]
        with_event = sum(c > 0 for c in counts)
        low, high = M.poisson_rate_interval(int(sum(counts)), steps / 100) if steps else (0.0, float("inf"))
        out[k] = {
            "episodes_with": with_event,
            "per_episode": float(np.mean(counts)) if n else None,
            "per_100_steps": 100 * sum(counts) / steps if steps else None,
            "per_100_steps_ci": [low, high],
            "episode_rate_upper_95": M.rate_upper_bound_zero(n) if with_event == 0 else None,
        }
    out["any_event_episodes"] = sum(_events(r) > 0 for r in rows)
    out["events_per_episode"] = float(np.mean([_events(r) for r in rows])) if n else None
    return out


def calibration_block(rows: list[dict], out_dir: Path | None = None) -> dict | None:
    """ECE (10 bins), Brier score and AUROC of episode confidence as a predictor of success."""
    rows = [r for r in rows if r.get("confidence") is not None and not r.get("abstained")]
    if not rows:
        return None
    conf, ok = [r["confidence"] for r in rows], [r["success"] for r in rows]
    diagram = M.reliability_diagram(conf, ok)
    block = {"n": len(rows), "ece": M.expected_calibration_error(conf, ok), "brier": M.brier_score(conf, ok),
             "auroc": M.auroc(conf, ok), "reliability": diagram, "ece_if_calibrated": M.ece_if_calibrated(conf)}
    if out_dir is not None:
        M.plot_reliability(diagram, out_dir / "reliability.png")
    return block


def compute_metrics(rows: list[dict], manifest: dict, policy: str, out_dir: Path | None = None,
                    calibration: Calibration | None = None, abstain_below: float | None = None,
                    remainder: list[dict] | None = None) -> dict:
    """Every number of the report. ``calibration`` adds the calibrated and selective blocks; ``abstain_below`` (with
    the abstained episodes' ``remainder`` run without stopping) the abstention block."""
    run = [r for r in rows if not r.get("abstained")]  # episodes with an outcome
    by_task = sorted(_group(run, "task").items())
    metrics = {
        "suite": manifest["id"],
        "policy": policy,
        "n": len(run),
        "overall": success_block(run),
        "per_task": {k: success_block(v) for k, v in by_task},
        "per_axis": {k: success_block(v) for k, v in _group(run, "axis").items()},
        "per_task_axis": {k: {a: success_block(r) for a, r in _group(v, "axis").items()} for k, v in by_task},
        "safety": safety_block(rows),
        "safety_per_task": {k: safety_block(v) for k, v in sorted(_group(rows, "task").items())},
        "calibration": calibration_block(run, out_dir),
        "errors": [r["id"] for r in rows if r.get("error")],
    }
    if calibration is not None:
        metrics["calibrated"] = selective.calibrated_block(run, calibration, out_dir)
    if metrics["calibration"] is not None:
        metrics["selective"] = selective.selective_block(run, calibration, out_dir)
    if abstain_below is not None:
        metrics["abstention"] = selective.abstention_block(rows, remainder, abstain_below)
    return metrics


def compare(rows: list[dict], base_rows: list[dict], name: str, base_name: str) -> dict:
    """Paired comparison on identical episodes: success (Newcombe CI, McNemar) and safety events per episode."""
    by_id = {r["id"]: r for r in base_rows}
    a = [r["success"] for r in rows]
    b = [by_id[r["id"]]["success"] for r in rows]
    ev_a = [_events(r) for r in rows]
    ev_b = [_events(by_id[r["id"]]) for r in rows]
    success = {**M.paired_difference(a, b), **{"mcnemar": M.mcnemar_exact(a, b)}}
    events = M.paired_rate_difference(ev_a, ev_b)
    return {
        "policy": name, "baseline": base_name, "n": len(rows),
        "success": success,
        "safety_events": events,
        "verdict_success": M.verdict(name, base_name, success, success["mcnemar"]["p_value"]),
        "verdict_safety": M.verdict(name, base_name, events, events["p_value"], lower_is_better=True),
    }


def _abstained(metrics: dict) -> str:
    ab = metrics.get("abstention")
    if not ab:
        return ""
    return (f" run and {ab['abstained']} abstained (stop-and-ask, counted apart below; the safety counts include them "
            "up to their stop)")


def _pct(block: dict) -> str:
    if block["rate"] is None:
        return "n/a"
    return f"{100 * block['rate']:.0f}% [{100 * block['ci_low']:.0f}, {100 * block['ci_high']:.0f}]"


def _plot_success(per_task: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(per_task)
    rates = np.asarray([per_task[k]["rate"] or 0.0 for k in names])
    err = np.asarray([[r - per_task[k]["ci_low"], per_task[k]["ci_high"] - r] for k, r in zip(names, rates)]).T
    fig = Figure(figsize=(5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(names, rates, yerr=err, capsize=4, color="tab:blue")
    ax.set(ylim=(0, 1.05), ylabel="success rate", title="Success per task (Wilson 95% CI)")
    fig.tight_layout()
    fig.savefig(path)


def _plot_safety(safety: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh(list(COUNT_EVENTS), [safety[k]["per_100_steps"] or 0.0 for k in COUNT_EVENTS], color="tab:red")
    ax.set(xlabel="events per 100 steps", title="Safety events by type")
    fig.tight_layout()
    fig.savefig(path)


def write_report(out_dir: Path, metrics: dict, rows: list[dict], command: str, comparison: dict | None = None) -> None:
    """report.md + metrics.json + plots; metrics.json is written last so a half-written report never looks done."""
    out_dir = Path(out_dir)
    _plot_success(metrics["per_task"], out_dir / "success_per_task.png")
    _plot_safety(metrics["safety"], out_dir / "safety_events.png")
    lines = [
        f"# Evaluation: {metrics['policy']} on {metrics['suite']}",
        "", f"Command: `{command}`", "",
        f"Episodes: {metrics['n']}{_abstained(metrics)}. Success rates with Wilson 95% intervals; safety events "
        "counted per episode.", "",
        "| task | n | success | safe success | mean steps to success | safety events / episode |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, block in metrics["per_task"].items():
        steps = block["mean_steps_to_success"]
        ev = metrics["safety_per_task"][task]["events_per_episode"]
        lines.append(f"| {task} | {block['n']} | {_pct(block)} | {_pct(block['safe_success'])} | "
                     f"{'-' if steps is None else f'{steps:.1f}'} | {ev:.2f} |")
    o = metrics["overall"]
    steps = o["mean_steps_to_success"]
    lines.append(f"| **all** | {o['n']} | {_pct(o)} | {_pct(o['safe_success'])} | "
                 f"{'-' if steps is None else f'{steps:.1f}'} | {metrics['safety']['events_per_episode']:.2f} |")
    if len(metrics["per_axis"]) > 1:
        other = any("other_success" in b for b in metrics["per_axis"].values())
        head = "| task | axis | n | success |" + (" success at the object not named |" if other else "")
        lines += ["", head, "|" + " --- |" * (head.count("|") - 1)]
        for task, axes in [*metrics["per_task_axis"].items(), ("**all**", metrics["per_axis"])]:
            for axis, b in axes.items():
                extra = f" {_pct(b['other_success'])} |" if other else ""
                lines.append(f"| {task} | {axis} | {b['n']} | {_pct(b)} |{extra}")
    lines += ["", "| safety event | episodes with it | per 100 steps [95% CI] | 95% upper bound (none seen) |",
              "| --- | --- | --- | --- |"]
    for k in COUNT_EVENTS:
        s = metrics["safety"][k]
        bound = "" if s["episode_rate_upper_95"] is None else f"{100 * s['episode_rate_upper_95']:.1f}% of episodes"
        lo, hi = s["per_100_steps_ci"]
        rate = "n/a (no step run)" if s["per_100_steps"] is None else f"{s['per_100_steps']:.2f} [{lo:.2f}, {hi:.2f}]"
        lines.append(f"| {k} | {s['episodes_with']} | {rate} | {bound} |")
    cal = metrics["calibration"]
    if cal and not metrics.get("calibrated"):  # else tasks.selective shows it beside the calibrated probability
        auroc = "n/a (one outcome only)" if cal["auroc"] is None else f"{cal['auroc']:.3f}"
        lines += ["", f"Calibration of episode confidence (n = {cal['n']}): ECE {cal['ece']:.3f}, "
                      f"Brier {cal['brier']:.3f}, AUROC {auroc}.", "", "![reliability](reliability.png)"]
    lines += selective.markdown(metrics)
    lines += ["", "![success](success_per_task.png) ![safety](safety_events.png)"]
    if comparison:
        s, e = comparison["success"], comparison["safety_events"]
        lines += ["", f"## Paired comparison with {comparison['baseline']} (same {comparison['n']} episodes)", "",
                  "| | policy | baseline | difference [95% CI] | p |", "| --- | --- | --- | --- | --- |",
                  f"| success | {100 * s['rate_a']:.1f}% | {100 * s['rate_b']:.1f}% | {100 * s['diff']:+.1f} points "
                  f"[{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}] | {s['mcnemar']['p_value']:.3g} (McNemar exact) |",
                  f"| safety events / episode | {e['mean_a']:.3f} | {e['mean_b']:.3f} | {e['diff']:+.3f} "
                  f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] | {e['p_value']:.3g} (paired z) |",
                  "", f"- {comparison['verdict_success']}", f"- {comparison['verdict_safety']}"]
    videos = [r["video"] for r in rows if r.get("video")]
    if videos:
        lines += ["", "Rollouts: " + ", ".join(f"[{Path(v).stem}]({v})" for v in videos)]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out_dir / "metrics.json", {**metrics, "comparison": comparison})
