"""Tests for harness/calibrate.py (scripts/calibrate.py) and the calibrated parts of evaluation: the seed block,
fitting on the perturbed expert's rollouts, determinism, the weights digest, reports and stop-and-ask."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from harness.calibrate import CALIBRATION_SEEDS, CalibrateConfig, calibrate, calibration_manifest
from harness.cli import register_configs
from harness.evaluate import EvalConfig, evaluate
from harness.policies import PolicySpec, resolve_calibration, weights_digest
from harness.preferences import CollectConfig
from store.errors import UsageError
from tasks import TASKS, get_task
from tasks.calibration import CALIBRATION_FILE, Calibration, Trace, fit_calibration
from tasks.demos import TASK_STRIDE
from tasks.scenes import SEED_OFFSET as SCENE_SEEDS
from tasks.suites import SUITES, build_manifest
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import save_checkpoint
from vla.model import build_vla
from vla.text_tokenizer import action_token_offset, build_tokenizer

REPO = Path(__file__).resolve().parents[2]


def cal_cfg(out, **kw) -> CalibrateConfig:
    base = dict(policy="perturbed", task="reach,pick", episodes_per_task=12, workers=1, image_size=32,
                output_dir=str(out))
    return CalibrateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "perturbed"
    calibrate(cal_cfg(out))
    return out


def test_calibration_seeds_are_their_own_block():
    tasks = sorted(TASKS)
    seeds = {e["seed"] for e in calibration_manifest(list(SUITES), 2000, tasks)["episodes"]}
    assert min(seeds) >= CALIBRATION_SEEDS.start and max(seeds) < CALIBRATION_SEEDS.stop
    assert all(s in get_task(t).train_seeds for t in tasks for s in seeds)  # never a test seed: no suite uses them
    assert len(tasks) * TASK_STRIDE <= CALIBRATION_SEEDS.start  # demos: 0-249,999
    assert CollectConfig.__dataclass_fields__["seed_offset"].default >= CALIBRATION_SEEDS.stop  # preferences
    assert SCENE_SEEDS >= CALIBRATION_SEEDS.stop  # pretraining scenes
    suite = {e["seed"] for s in SUITES for e in build_manifest(s, 5, tasks)["episodes"]}
    assert not suite & seeds


def test_calibrate_writes_a_calibration_for_the_policy(fitted):
    cal = Calibration.load(fitted / CALIBRATION_FILE)
    assert cal.policy == PolicySpec("perturbed").identity()
    fit = cal.fit
    assert fit["episodes"] == 24 and 0 < fit["successes"] < 24 and fit["command"].startswith("python scripts/")
    assert fit["seeds"]["pick/success-default"][0] in CALIBRATION_SEEDS
    assert cal.running.features[-1] == "step_fraction" and "step_fraction" not in cal.episode.features
    assert (fitted / "calibration" / "episodes.jsonl").is_file()
    summary = json.loads((fitted / "calibration" / "summary.json").read_text())
    assert summary["episodes"] == 24


@pytest.mark.slow
def test_same_seeds_give_the_same_calibration(fitted, tmp_path):
    calibrate(cal_cfg(tmp_path / "again"))
    a, b = Calibration.load(fitted / CALIBRATION_FILE), Calibration.load(tmp_path / "again" / CALIBRATION_FILE)
    assert (a.running, a.episode, a.policy) == (b.running, b.episode, b.policy)


def test_a_calibration_is_refused_for_a_checkpoint_with_other_weights(fitted, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    save_file({"w": np.ones(1)}, ckpt / "model.safetensors")  # whole weights: PolicySpec checks the header
    spec = PolicySpec(str(ckpt))
    cal = Calibration.load(fitted / CALIBRATION_FILE)
    cal.policy = spec.identity()
    cal.save(ckpt / CALIBRATION_FILE)
    assert resolve_calibration(spec, None, ["reach"]) is not None  # its own weights: applied
    assert resolve_calibration(spec, None, ["push"]) is None  # tasks it does not cover: skipped
    with pytest.raises(UsageError, match="covers tasks"):
        resolve_calibration(spec, str(ckpt), ["push"])
    assert resolve_calibration(PolicySpec(str(ckpt), temperature=1.0), None, ['reach']) is None  # other decoding
    with pytest.raises(UsageError, match="other decoding settings"):
        resolve_calibration(PolicySpec(str(ckpt), temperature=1.0), str(ckpt), ['reach'])
    save_file({"w": np.zeros(1)}, ckpt / "model.safetensors")
    assert weights_digest(ckpt) != cal.policy["digest"]
    with pytest.raises(UsageError, match="was fitted for weights"):
        resolve_calibration(spec, None, ['reach'])
    with pytest.raises(UsageError, match="was fitted for weights"):
        resolve_calibration(PolicySpec("perturbed"), str(ckpt), ["reach"])


def ev_cfg(out, fitted, **kw) -> EvalConfig:
    base = dict(policy="perturbed", suite="success", task="reach,pick", episodes_per_task=10, workers=1, videos=0,
                image_size=32, calibration=str(fitted), output_dir=str(out))
    return EvalConfig(**{**base, **kw})


@pytest.mark.slow
def test_evaluation_reports_the_calibrated_probability_and_stop_and_ask(fitted, tmp_path):
    plain = evaluate(ev_cfg(tmp_path / "plain", fitted))
    m = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert m["calibrated"]["n"] == 20 and 0 <= m["calibrated"]["ece"] <= 1
    assert set(m["selective"]) == {"raw", "calibrated", "stop_and_ask"}
    assert plain["calibrated_ece"] == m["calibrated"]["ece"] and "abstention" not in m
    for png in ("reliability.png", "reliability_calibrated.png", "coverage.png"):
        assert (tmp_path / "plain" / png).stat().st_size > 0
    assert "Selective prediction" in (tmp_path / "plain" / "report.md").read_text()

    # abstain where the offline curve says 80% of the episodes are kept: the run keeps exactly those
    theta = plain["abstain_below_for_coverage_0.8"]
    stop = evaluate(ev_cfg(tmp_path / "stop", fitted, abstain_below=theta))
    rows = [json.loads(line) for line in (tmp_path / "stop" / "episodes.jsonl").read_text().splitlines()]
    stopped = [r for r in rows if r["abstained"]]
    point = m["selective"]["stop_and_ask"]["at_coverage_0.8"]
    assert len(stopped) == stop["abstained"] == round(20 * (1 - point["coverage"]))
    assert all(not r["success"] and r["abstain_probability"] < theta for r in stopped)
    ms = json.loads((tmp_path / "stop" / "metrics.json").read_text())
    assert ms["n"] == 20 - len(stopped) and ms["overall"]["rate"] == pytest.approx(point["success"])
    ab = ms["abstention"]
    assert ab["without_abstention"]["success"]["rate"] == plain["success_rate"]
    assert ab["without_abstention"]["events_per_episode"] == pytest.approx(plain["safety_events_per_episode"])
    assert stop["safety_events_per_episode"] <= plain["safety_events_per_episode"]
    assert "Stop-and-ask" in (tmp_path / "stop" / "report.md").read_text()
    with pytest.raises(UsageError, match="holds an evaluation"):  # the same dir with another threshold
        evaluate(ev_cfg(tmp_path / "stop", fitted, abstain_below=0.5))


def test_bad_inputs_are_refused(fitted, tmp_path):
    with pytest.raises(UsageError, match="needs a calibration"):
        evaluate(ev_cfg(tmp_path / "x", fitted, calibration=None, abstain_below=0.5))
    with pytest.raises(UsageError, match="must lie in"):
        ev_cfg(tmp_path / "x", fitted, abstain_below=1.5)
    with pytest.raises(UsageError, match="no checkpoint directory"):
        calibrate(cal_cfg(tmp_path / "y", output_dir=None))
    with pytest.raises(UsageError, match="reports no action-token probabilities"):
        calibrate(cal_cfg(tmp_path / "z", policy="expert", episodes_per_task=1, task="reach"))
    with pytest.raises(UsageError, match="unknown suite"):
        cal_cfg(tmp_path, suite="success,speed")
    with pytest.raises(UsageError, match="fitted for weights"):
        evaluate(ev_cfg(tmp_path / "w", fitted, policy="random"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()


def test_the_config_composes_to_the_schema_defaults():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        c = OmegaConf.to_object(compose("calibrate", overrides=["policy=p", "l2=0.5"]))
    assert asdict(c) == asdict(CalibrateConfig(policy="p", l2=0.5))


def test_a_copied_checkpoint_keeps_its_calibration(fitted, tmp_path):
    src = tmp_path / "a"
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_file({"w": np.ones(1)}, src / "model.safetensors")
    cal = Calibration.load(fitted / CALIBRATION_FILE)
    cal.policy = PolicySpec(str(src)).identity()
    cal.save(src / CALIBRATION_FILE)
    shutil.copytree(src, tmp_path / "b")
    assert resolve_calibration(PolicySpec(str(tmp_path / "b")), None, ["pick"]) is not None  # the weights say which, not the path


@pytest.mark.slow
def test_a_vla_checkpoint_calibrates_and_abstains_in_batched_lockstep(tmp_path, tiny_model):
    tok = build_tokenizer([f"In: What action should the robot take to {t}?\nOut:" for t in get_task("reach").templates],
                          vocab_size=300)
    q01 = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0])
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    save_checkpoint(build_vla(tiny_model(arch="fast_vlm", image_size=32), tok),
                    {"demo": ActionTokenizer(q01, -q01 + np.eye(7)[6], action_token_offset(tok))}, ckpt)
    try:  # the VLA's token statistics reach the fit; a random model seldom succeeds, and one outcome is refused
        calibrate(CalibrateConfig(policy=str(ckpt), task="reach", episodes_per_task=2, workers=1, image_size=32))
        assert Calibration.load(ckpt / CALIBRATION_FILE).policy["digest"] == weights_digest(ckpt)
    except UsageError as e:
        assert "calibration episodes all" in str(e)
    rng = np.random.default_rng(0)
    traces = [Trace({"log_confidence": (l := rng.normal(-3, 1, 5)).tolist(), "min_log_prob": (l - 1).tolist()}, 40,
                    "reach", bool(rng.random() < 0.5)) for _ in range(40)]
    fit_calibration(traces, PolicySpec(str(ckpt)).identity()).save(ckpt / CALIBRATION_FILE)
    s = evaluate(EvalConfig(policy=str(ckpt), task="reach", episodes_per_task=3, workers=1, videos=0, image_size=32,
                            abstain_below=0.999999, output_dir=str(tmp_path / "stop")))
    rows = [json.loads(line) for line in (tmp_path / "stop" / "episodes.jsonl").read_text().splitlines()]
    assert s["abstained"] == 3 and all(r["abstained"] and r["steps"] == 0 for r in rows)
    assert s["episodes"] == 0 and len((tmp_path / "stop" / "remainder" / "episodes.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_the_script_prints_only_its_progress_and_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/calibrate.py", "policy=perturbed", 'task="reach,pick"',
                           "episodes_per_task=6", "workers=2", "image_size=32", f"output_dir={tmp_path}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert not re.findall(r"Traceback|argv\[|Exception ignored|leaked|pybullet build time|Warning", log), log
    assert f"wrote {tmp_path}/calibration.json" in log
    assert Calibration.load(tmp_path / CALIBRATION_FILE).fit["command"].endswith(f"output_dir={tmp_path}")
