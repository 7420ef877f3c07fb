"""Tests for harness/evaluate.py and tasks/evaluation.py: metrics, reports, resume, baselines, bad inputs."""

import json

import numpy as np
import pytest

from harness.evaluate import EvalConfig, evaluate
from harness.policies import PolicySpec
from store.errors import UsageError
from tasks.evaluation import RESULTS_FILE, evaluate_manifest, load_results
from tasks.suites import build_manifest
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import save_checkpoint
from vla.model import build_vla
from vla.parallel import set_action_head
from vla.text_tokenizer import action_token_offset, build_tokenizer


def _cfg(tmp_path, name, **kw):
    base = dict(policy="expert", suite="success", task="reach,pick", episodes_per_task=2, workers=1, videos=0,
                image_size=48, output_dir=str(tmp_path / name))
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.slow
def test_metrics_do_not_depend_on_the_number_of_workers(tmp_path):
    one = evaluate(_cfg(tmp_path, "one", suite="safety"))
    two = evaluate(_cfg(tmp_path, "two", suite="safety", workers=2))
    strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "episodes_per_minute")}  # noqa: E731
    assert strip(one) == strip(two)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1 == m2


@pytest.mark.slow
def test_expert_passes_the_safety_suite_with_zero_events_and_random_fails(tmp_path):
    expert = evaluate(_cfg(tmp_path, "expert", suite="safety", task="all", videos=1))
    assert expert["success_rate"] == 1.0 and expert["safety_events_per_episode"] == 0.0
    report = (tmp_path / "expert" / "report.md").read_text()
    assert "safety-v2" in report and "Wilson" in report and ".gif" in report
    assert list((tmp_path / "expert" / "videos").glob("*.gif"))
    rand = evaluate(_cfg(tmp_path, "random", policy="random", suite="safety", task="all", baseline=str(tmp_path / "expert")))
    assert rand["success_rate"] == 0.0
    assert rand["comparison"]["verdict_success"].startswith("random succeeds less often than expert")
    metrics = json.loads((tmp_path / "random" / "metrics.json").read_text())
    assert metrics["comparison"]["success"]["mcnemar"]["b01"] == 10


def test_instruction_suite_reports_success_at_the_object_not_named(tmp_path):
    s = evaluate(_cfg(tmp_path, "instruction", suite="instruction", task="reach"))
    assert s["per_axis"] == {"named": 1.0, "swapped": 1.0}
    assert s["per_axis_other_success"] == {"named": 0.0, "swapped": 0.0}
    assert "success at the object not named" in (tmp_path / "instruction" / "report.md").read_text()


def test_an_interrupted_evaluation_resumes_from_finished_episodes(tmp_path):
    manifest = build_manifest("success", 2, ["reach"])
    out = tmp_path / "ev"
    rows = evaluate_manifest(manifest, PolicySpec("expert"), out, image_size=48)
    lines = (out / RESULTS_FILE).read_text().splitlines()
    (out / RESULTS_FILE).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # cut mid-line by a crash
    assert list(load_results(out)) == [rows[0]["id"]]
    again = evaluate_manifest(manifest, PolicySpec("expert"), out, image_size=48)
    assert again == rows


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="neither 'expert', 'random', 'perturbed' nor a checkpoint"):
        evaluate(_cfg(tmp_path, "x", policy=str(tmp_path)))
    with pytest.raises(UsageError, match="unknown suite"):
        evaluate(_cfg(tmp_path, "x", suite="speed"))
    evaluate(_cfg(tmp_path, "base", task="reach", episodes_per_task=1))
    with pytest.raises(UsageError, match="was evaluated on success-v2"):
        evaluate(_cfg(tmp_path, "x", task="reach", episodes_per_task=2, baseline=str(tmp_path / "base")))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="holds an evaluation of expert"):
        evaluate(_cfg(tmp_path, "base", policy="random", task="reach", episodes_per_task=1))


@pytest.mark.slow
def test_a_vla_checkpoint_reports_calibration(tmp_path, tiny_model):
    instructions = ["touch the red cube", "reach for the blue bar"]
    tok = build_tokenizer([f"In: What action should the robot take to {i}?\nOut:" for i in instructions], vocab_size=300)
    cfg = tiny_model(arch="fast_vlm", image_size=48, text_layers=1)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.03, 0.03, (500, 7)).astype(np.float32)
    actions[:, 6] = rng.integers(0, 2, 500)
    save_checkpoint(build_vla(cfg, tok), {"demo": ActionTokenizer.fit(actions, action_token_offset(tok))}, tmp_path / "ckpt")
    out = evaluate(_cfg(tmp_path, "vla", policy=str(tmp_path / "ckpt"), task="reach", episodes_per_task=3, workers=2))
    metrics = json.loads((tmp_path / "vla" / "metrics.json").read_text())
    assert metrics["calibration"]["n"] == 3 and 0 <= metrics["calibration"]["ece"] <= 1
    assert out["ece"] == metrics["calibration"]["ece"] and (tmp_path / "vla" / "reliability.png").stat().st_size > 0


def test_chunk_execution_reaches_a_chunked_policy_and_its_identity(tmp_path, tiny_model):
    tok = build_tokenizer(["In: What action should the robot take to touch the red cube?\nOut:"], vocab_size=300)
    vla = build_vla(tiny_model(arch="fast_vlm"), tok)
    set_action_head(vla.model, "parallel", 3)
    stats = ActionTokenizer(np.full(7, -0.03), np.full(7, 0.03), action_token_offset(tok))
    save_checkpoint(vla, {"demo": stats}, tmp_path / "ckpt")
    spec = PolicySpec(str(tmp_path / "ckpt"), chunk_execution="ensemble")
    assert spec(None).chunks.mode == "ensemble" and spec.identity()["chunk_execution"] == "ensemble"
    assert PolicySpec(str(tmp_path / "ckpt"))(None).chunks.mode == "open_loop"
    assert "chunk_execution" not in PolicySpec(str(tmp_path / "ckpt")).identity()  # older calibrations still match
    assert PolicySpec(str(tmp_path / "ckpt")).identity()["binarize_gripper"] is True
    assert PolicySpec(str(tmp_path / "ckpt"), binarize_gripper=False)(None).binary_dims == []
    assert "binarize_gripper" not in PolicySpec("expert").identity()  # a scripted policy commands 0 / 1 itself
    with pytest.raises(UsageError, match="chunk_execution='later' is not one of"):
        PolicySpec("expert", chunk_execution="later")
