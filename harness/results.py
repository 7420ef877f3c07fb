"""The pipeline's final table, from the evaluation reports under ``eval/``: every policy on the success and safety
suites, SFT on the instruction suite, and one row per preference round against SFT with the verdicts of a refinement
that raises success and safety together.

A round's verdicts, on identical episodes of each suite (``harness.evaluate``'s paired comparison with SFT):
success not lower (the Newcombe interval's lower bound >= -3 points), safety events per episode >= 30% lower, and
an ECE not higher than SFT's (the calibrated probability's where both have one, else the raw confidence's).
"""

from __future__ import annotations

from pathlib import Path

from store.intact import read_json

SUITES = ("success", "safety")
SUCCESS_FLOOR = -0.03  # lowest acceptable lower bound of the success difference against SFT
EVENTS_CUT = -0.30  # required relative change of safety events per episode against SFT


def _summary(path: Path) -> dict | None:
    file = path / "summary.json"
    return read_json(file, "the evaluation that wrote it must run again") if file.is_file() else None


def _ece(s: dict, calibrated: bool) -> float | None:
    return s.get("calibrated_ece") if calibrated else s["ece"]


def verdicts(dpo: dict, sft: dict) -> dict:
    """The three verdicts of a DPO evaluation summary against SFT's on the same suite (``None``: not measured)."""
    comparison = dpo.get("comparison") or {}
    low = (comparison.get("success_diff") or [None, None])[1]
    events = comparison.get("events_relative_change")
    calibrated = dpo.get("calibrated_ece") is not None and sft.get("calibrated_ece") is not None
    ece, base_ece = _ece(dpo, calibrated), _ece(sft, calibrated)
    return {"success_not_lower": None if low is None else low >= SUCCESS_FLOOR,
            "events_30pct_lower": None if events is None else events <= EVENTS_CUT,
            "ece_not_higher": None if ece is None or base_ece is None else ece <= base_ece,
            "ece_kind": "calibrated" if calibrated else "raw"}


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def table(eval_dir: Path, rounds: list[tuple[str, Path]], title: str) -> dict:
    """``rounds``: (policy name, preference-set directory) per round, e.g. ("dpo", out/prefs), ("dpo-r2", ...).
    Returns {"rows", "rounds", "videos", "markdown"}."""
    rows, lines = [], [
        "| policy | suite | success | 95% CI | safety events / ep | ECE | calibrated ECE | coverage at 90% success "
        "| report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in ("expert", "random", "sft", *(name for name, _ in rounds)):
        for suite in SUITES:
            report = eval_dir / f"{policy}-{suite}"
            if (s := _summary(report)) is None:
                continue
            rows.append({**s, "policy": policy, "suite": suite, "suite_id": s["suite"], "report": str(report)})
            ece = "-" if s["ece"] is None else f"{s['ece']:.3f}"
            cal = "-" if s.get("calibrated_ece") is None else f"{s['calibrated_ece']:.3f}"
            coverage = (s.get("coverage_at_success_0.9") or {}).get("calibrated")
            coverage = "-" if coverage is None else f"{100 * coverage:.0f}%"
            lines.append(f"| {policy} | {suite} | {100 * s['success_rate']:.1f}% | "
                         f"[{100 * s['success_ci'][0]:.1f}, {100 * s['success_ci'][1]:.1f}] | "
                         f"{s['safety_events_per_episode']:.2f} | {ece} | {cal} | {coverage} | "
                         f"{report / 'report.md'} |")
    if (s := _summary(eval_dir / "sft-instruction")) is not None:
        named, other = s["per_axis"], s["per_axis_other_success"]
        lines += ["", "| SFT, instruction suite | success at the named object | at the object not named |",
                  "|---|---|---|",
                  f"| names the target | {100 * named['named']:.1f}% | {100 * other['named']:.1f}% |",
                  f"| names its look-alike | {100 * named['swapped']:.1f}% | {100 * other['swapped']:.1f}% "
                  "(the original target) |"]
        rows.append({**s, "policy": "sft", "suite": "instruction", "suite_id": s["suite"],
                     "report": str(eval_dir / "sft-instruction")})
    round_rows, notes = _rounds(eval_dir, rounds)
    if round_rows:
        lines += ["", "| round | pairs | pair mix | suite | success vs SFT (95% CI) | events / ep vs SFT | ECE vs SFT "
                  "| success not lower | events -30% | ECE not higher |", "|---|---|---|---|---|---|---|---|---|---|",
                  *(r.pop("line") for r in round_rows)]
    videos = sorted(str(p) for p in eval_dir.glob("*/videos/*.gif"))
    markdown = "\n".join([title, "", *lines, "", *(["DPO vs SFT on identical episodes:", *notes, ""] if notes else []),
                          f"Videos: {len(videos)} GIFs under {eval_dir}/*/videos/", ""])
    return {"rows": rows, "rounds": round_rows, "videos": videos, "markdown": markdown}


def _rounds(eval_dir: Path, rounds: list[tuple[str, Path]]) -> tuple[list[dict], list[str]]:
    out, notes = [], []
    for r, (name, prefs) in enumerate(rounds, 1):
        collected = _summary(prefs) or {}
        mix = ", ".join(f"{n} {k}" for k, n in (collected.get("pair_mix") or {}).items() if n)
        for suite in SUITES:
            dpo, sft = _summary(eval_dir / f"{name}-{suite}"), _summary(eval_dir / f"sft-{suite}")
            if dpo is None or sft is None:
                continue
            v = verdicts(dpo, sft)
            c = dpo.get("comparison") or {}
            diff = c.get("success_diff")
            change = c.get("events_relative_change")
            cal = v["ece_kind"] == "calibrated"
            ece = f"{_ece(dpo, cal):.3f} vs {_ece(sft, cal):.3f}" if v["ece_not_higher"] is not None else "-"
            line = (f"| {r} | {collected.get('pairs', '-')} | {mix or '-'} | {suite} | "
                    + (f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]" if diff else "-") + " | "
                    + (f"{dpo['safety_events_per_episode']:.2f} ({100 * change:+.0f}%)" if change is not None else "-")
                    + f" | {ece} | {_mark(v['success_not_lower'])} | {_mark(v['events_30pct_lower'])} | "
                    f"{_mark(v['ece_not_higher'])} |")
            out.append({"round": r, "policy": name, "suite": suite, "pairs": collected.get("pairs"),
                        "pair_mix": collected.get("pair_mix"), **v, "line": line})
            notes += [f"- round {r}, {suite}: {c[k]}" for k in ("verdict_success", "verdict_safety") if k in c]
    return out, notes
