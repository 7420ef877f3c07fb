"""harness/results.py: the verdicts of a preference round against SFT and the round table."""

import json
from pathlib import Path

import pytest

from harness.results import table, verdicts


def summary(low: float, events: float | None, ece: float, calibrated: float | None = None, **extra) -> dict:
    return {"comparison": {"success_diff": [low + 0.05, low, low + 0.1], "events_relative_change": events,
                           "baseline": "sft", "verdict_success": "s", "verdict_safety": "e"},
            "ece": ece, "calibrated_ece": calibrated, "success_rate": 0.5, "success_ci": [0.4, 0.6],
            "safety_events_per_episode": 2.0, "suite": "success-v1", **extra}


@pytest.mark.parametrize("low, events, ok", [(-0.03, -0.30, (True, True)), (-0.031, -0.29, (False, False)),
                                             (0.02, -0.8, (True, True)), (-0.2, None, (False, None))])
def test_success_and_events_verdicts_use_the_interval_bound_and_the_relative_change(low, events, ok):
    v = verdicts(summary(low, events, 0.2), {"ece": 0.3, "calibrated_ece": None})
    assert (v["success_not_lower"], v["events_30pct_lower"]) == ok


def test_ece_compares_calibrated_probabilities_only_when_both_have_one():
    sft = {"ece": 0.40, "calibrated_ece": 0.05}
    assert verdicts(summary(0, -0.5, 0.30, calibrated=0.06), sft) == {
        "success_not_lower": True, "events_30pct_lower": True, "ece_not_higher": False, "ece_kind": "calibrated"}
    assert verdicts(summary(0, -0.5, 0.30), sft)["ece_not_higher"] is True  # raw 0.30 <= raw 0.40
    assert verdicts(summary(0, -0.5, 0.30), sft)["ece_kind"] == "raw"
    assert verdicts({"comparison": None, "ece": None}, sft) == {
        "success_not_lower": None, "events_30pct_lower": None, "ece_not_higher": None, "ece_kind": "raw"}


def test_the_round_table_has_a_row_per_round_and_suite(tmp_path):
    def write(path: Path, data: dict) -> None:
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps(data))

    for suite in ("success", "safety"):
        write(tmp_path / f"eval/sft-{suite}", summary(0, None, 0.4))
        write(tmp_path / f"eval/dpo-{suite}", summary(-0.01, -0.4, 0.3))
    write(tmp_path / "prefs", {"pairs": 7, "pair_mix": {"success vs failure": 5, "safer failure": 2}})
    out = table(tmp_path / "eval", [("dpo", tmp_path / "prefs"), ("dpo-r2", tmp_path / "prefs-r2")], "# t")
    assert [(r["round"], r["suite"], r["success_not_lower"], r["events_30pct_lower"]) for r in out["rounds"]] == [
        (1, "success", True, True), (1, "safety", True, True)]  # round 2 has no reports yet
    assert "| 1 | 7 | 5 success vs failure, 2 safer failure | success | +4.0 [-1.0, +9.0] | 2.00 (-40%) |" \
        in out["markdown"]
