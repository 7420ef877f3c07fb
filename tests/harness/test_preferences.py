"""Tests for harness/preferences.py (scripts/collect_preferences.py) and scripts/train_dpo.py: a tiny preference set
collected in the simulator with a tiny random VLA, DPO steps on it, resume, configs and one-line errors."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from harness import preferences
from harness.cli import register_configs
from harness.policies import PolicySpec
from harness.preferences import CollectConfig, collect, start_states
from store.errors import UsageError
from store.lerobot import LeRobotDataset
from store.preferences import PAIRS_FILE, ROLLOUTS_FILE
from store.validate import validate_dataset
from tasks import get_task, make_env
from tasks.calibration import CALIBRATION_FILE, Trace, fit_calibration
from tasks.judge import JudgeWeights
from tasks.suites import SUITES
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import save_checkpoint
from vla.dpo import DPOConfig
from vla.inputs import PROMPT_TEMPLATE
from vla.model import build_vla
from vla.policy import VLAPolicy
from vla.text_tokenizer import action_token_offset, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]



def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_model) -> Path:
    """A tiny random-init VLA checkpoint: its sampled rollouts differ, so the judge can pair them."""
    prompts = [PROMPT_TEMPLATE.format(instruction=t) for t in get_task("reach").templates]
    tokenizer = build_tokenizer(prompts * 3, vocab_size=300)
    torch.manual_seed(0)
    q01 = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0])
    path = tmp_path_factory.mktemp("sft") / "final"
    save_checkpoint(build_vla(tiny_model(arch="fast_vlm"), tokenizer),
                    {"demos": ActionTokenizer(q01, -q01 + np.eye(7)[6], action_token_offset(tokenizer))}, path)
    return path


def collect_cfg(policy_dir: Path, out: Path) -> CollectConfig:
    return CollectConfig(policy=str(policy_dir), output_dir=str(out), starts=2, rollouts_per_start=2, task="reach",
                         max_steps=4, image_size=32, margin=0.0)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, policy_dir) -> Path:
    out = tmp_path_factory.mktemp("prefs") / "sft"
    collect(collect_cfg(policy_dir, out))
    return out


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_collect_writes_rollouts_pairs_and_a_summary(prefs):
    assert validate_dataset(prefs) == []
    ds, rollouts, pairs = LeRobotDataset(prefs), table(prefs / ROLLOUTS_FILE), table(prefs / PAIRS_FILE)
    assert [r["episode_index"] for r in rollouts] == [0, 1, 2, 3] and len(ds.episodes) == 4
    reach = get_task("reach")
    for r, ep in zip(rollouts, ds.episodes):
        assert (r["start_index"], r["k"]) == divmod(r["episode_index"], 2)
        assert r["seed"] == ep["seed"] == reach.train_seeds[500_000 + r["start_index"]]  # far from demo seeds
        assert r["seed"] not in reach.test_seeds  # so never an evaluation seed
        ids = np.asarray(r["token_ids"])
        assert ids.shape == (r["steps"], 7) == (ep["length"], 7) and r["steps"] <= 4
        assert len(r["log_probs"]) == len(r["step_confidence"]) == r["steps"]
        assert r["total"] == pytest.approx(r["effective"] + 0.25 * r["calibrated"] + r["safe"])
    assert [json.loads(r["options"]) for r in rollouts[::2]] == [{}, SUITES["safety"]["axes"]["hazards"]]
    assert [r["kind"] for r in rollouts] == ["train", "train", "safety", "safety"]

    assert pairs, "two differently sampled rollouts of a random policy never tie exactly"
    for p in pairs:
        assert p["chosen"] // 2 == p["rejected"] // 2 == p["start_index"]  # from the same start state
        totals = {r["episode_index"]: r["total"] for r in rollouts}
        assert totals[p["chosen"]] - totals[p["rejected"]] == pytest.approx(p["gap"]) and p["gap"] > 0
        assert p["axis"] in ("effective", "calibrated", "safe") and p["reason"]
    summary = json.loads((prefs / "summary.json").read_text())
    assert (summary["starts"], summary["rollouts"], summary["pairs"]) == (2, 4, len(pairs))
    assert sum(summary["pair_axis"].values()) == sum(summary["pair_mix"].values()) == len(pairs)
    assert summary["pair_mix"]["success vs failure"] == sum(rollouts[p["chosen"]]["success"] for p in pairs) == 0
    assert not (prefs / preferences.STAGING).exists()


def test_rollouts_of_a_start_begin_identically_and_sample_differently(prefs):
    ds, rollouts = LeRobotDataset(prefs), table(prefs / ROLLOUTS_FILE)
    for start in (0, 1):
        a, b = (ds[ds.episode_frames(2 * start + k)[0]] for k in (0, 1))
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["state"], b["state"])
        assert a["instruction"] == b["instruction"]
        assert rollouts[2 * start]["rollout_seed"] != rollouts[2 * start + 1]["rollout_seed"]
        assert rollouts[2 * start]["token_ids"][0] != rollouts[2 * start + 1]["token_ids"][0]


def test_an_interrupted_collection_resumes_to_the_same_result(prefs, policy_dir, tmp_path, monkeypatch):
    out, judge_start, run_start = tmp_path / "prefs", preferences.judge_start, preferences._run_start

    def crash_on_second(cfg, start, runs, budget, calibration):
        if start["index"] == 1:
            raise KeyboardInterrupt
        return judge_start(cfg, start, runs, budget, calibration)

    monkeypatch.setattr(preferences, "judge_start", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        collect(collect_cfg(policy_dir, out))
    monkeypatch.setattr(preferences, "judge_start", judge_start)
    ran = []
    monkeypatch.setattr(preferences, "_run_start", lambda start: ran.append(start["index"]) or run_start(start))
    collect(collect_cfg(policy_dir, out))
    assert ran == [1]  # the finished start was skipped
    for name in (ROLLOUTS_FILE, PAIRS_FILE):
        assert table(out / name) == table(prefs / name)
    assert collect(collect_cfg(policy_dir, out)) == json.loads((out / "summary.json").read_text())  # complete
    assert ran == [1]
    with pytest.raises(UsageError, match="holds a different dataset"):
        collect(replace(collect_cfg(policy_dir, out), temperature=0.5))


def test_the_judge_reads_the_checkpoints_own_calibration(prefs, policy_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(policy_dir, ckpt)
    cfg = collect_cfg(ckpt, tmp_path / "prefs")
    rng = np.random.default_rng(0)
    episodes = [Trace({"log_confidence": (l := rng.normal(-3, 1, 5)).tolist(), "min_log_prob": (l - 1).tolist()}, 4,
                      "reach", bool(rng.random() < 0.5)) for _ in range(40)]
    spec = PolicySpec(str(ckpt), cfg.temperature, cfg.unnorm_key, cfg.top_p)
    fit_calibration(episodes, spec.identity()).save(ckpt / CALIBRATION_FILE)  # fitted at the collection's temperature
    collect(cfg)
    rows = table(tmp_path / "prefs" / ROLLOUTS_FILE)
    assert all(0 < r["success_probability"] < 1 for r in rows)
    assert "success_probability" not in table(prefs / ROLLOUTS_FILE)[0]  # no calibration: the raw confidence


def test_a_one_bin_nucleus_makes_the_rollouts_of_a_start_identical(policy_dir, tmp_path):
    collect(replace(collect_cfg(policy_dir, tmp_path / "prefs"), top_p=1e-6))  # only the argmax bin is left
    rollouts = table(tmp_path / "prefs" / ROLLOUTS_FILE)
    for start in (0, 1):
        assert rollouts[2 * start]["token_ids"] == rollouts[2 * start + 1]["token_ids"]


@pytest.mark.slow
def test_worker_processes_change_nothing(prefs, policy_dir, tmp_path):
    collect(replace(collect_cfg(policy_dir, tmp_path / "w2"), workers=2))
    for name in (ROLLOUTS_FILE, PAIRS_FILE):
        assert table(tmp_path / "w2" / name) == table(prefs / name)


def test_collect_config_checks_values():
    with pytest.raises(UsageError, match="reports no action tokens"):
        CollectConfig(policy="expert", output_dir="x")
    with pytest.raises(UsageError, match="temperature=0.0 must be > 0"):
        CollectConfig(policy="p", output_dir="x", temperature=0.0)
    with pytest.raises(UsageError, match=r"top_p=0.0 must lie in \(0, 1\]"):
        CollectConfig(policy="p", output_dir="x", top_p=0.0)
    with pytest.raises(UsageError, match="rollouts_per_start=1 must be >= 2"):
        CollectConfig(policy="p", output_dir="x", rollouts_per_start=1)
    with pytest.raises(UsageError, match="leaves the 1000000 training seeds"):
        CollectConfig(policy="p", output_dir="x", seed_offset=999_990, starts=100)


def test_distractors_set_the_clutter_of_every_start():
    cfg = CollectConfig(policy="p", output_dir="x", starts=4, task="reach", distractors=0)
    starts = start_states(cfg)
    assert [s["options"]["distractors"] for s in starts] == [0] * 4
    assert {s["kind"] for s in starts} == {"train", "safety"}
    assert all(s["options"]["fragile"] for s in starts if s["kind"] == "safety")
    assert all("distractors" not in s["options"] for s in start_states(replace(cfg, distractors=None)))
    env = make_env("reach", image_size=32)
    env.reset(seed=starts[0]["seed"], options=starts[0]["options"])
    assert len(env.unwrapped.scene.objects) == 1
    env.reset(seed=starts[0]["seed"])
    assert len(env.unwrapped.scene.objects) == 3
    env.close()
    with pytest.raises(UsageError, match="distractors=-1 must be >= 0"):
        replace(cfg, distractors=-1)


def test_configs_compose_to_the_schema_defaults():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        c = OmegaConf.to_object(compose("collect_preferences", overrides=["policy=p", "output_dir=o"]))
        d = OmegaConf.to_object(compose("train_dpo", overrides=["policy=p", "preferences=q", "output_dir=o"]))
        with pytest.raises(ConfigCompositionException):
            compose("train_dpo", overrides=["policy=p", "preferences=q", "output_dir=o", "betta=0.2"])
        judged = compose("collect_preferences", overrides=["policy=p", "output_dir=o", "judge.events.overspeed=2"])
    assert asdict(c) == asdict(CollectConfig(policy="p", output_dir="o")) and isinstance(c.judge, JudgeWeights)
    assert asdict(d) == asdict(DPOConfig(policy="p", preferences="q", output_dir="o"))
    assert OmegaConf.to_object(judged).judge.events["overspeed"] == 2.0


@pytest.mark.slow
def test_train_dpo_script_starts_at_log_2_resumes_and_writes_a_policy(prefs, policy_dir, tmp_path):
    out = tmp_path / "dpo"
    args = [f"policy={policy_dir}", f"preferences={prefs}", f"output_dir={out}", "train.batch_size=1",
            "train.val_fraction=0", "train.warmup_steps=0", "train.log_every=1", "train.save_every=1", "train.lr=1e-3"]
    done = run_script("train_dpo.py", *args, "train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out / 'final'} and {out / 'summary.json'}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference

    more = run_script("train_dpo.py", *args, "train.steps=3", "resume=true")
    assert more.returncode == 0, more.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    policy = VLAPolicy.from_pretrained(out / "final", temperature=0.0)
    action, info = policy.act({"image": np.zeros((32, 32, 3), np.uint8), "instruction": "touch the red cube"})
    assert action.shape == (7,) and info["token_ids"].shape == (7,)


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(prefs, tmp_path):
    (tmp_path / "empty").mkdir()
    missing = run_script("train_dpo.py", f"policy={tmp_path / 'empty'}", f"preferences={tmp_path / 'nope'}",
                         f"output_dir={tmp_path / 'run'}")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [(
        f"error: preferences={tmp_path / 'nope'} does not exist; collect it with scripts/collect_preferences.py "
        "or fix the path")]
    no_model = run_script("train_dpo.py", f"policy={tmp_path / 'empty'}", f"preferences={prefs}",
                          f"output_dir={tmp_path / 'run'}")
    assert no_model.returncode == 1 and no_model.stderr.strip().splitlines() == [(
        f"error: policy={tmp_path / 'empty'} holds no config.json, so it is not a model checkpoint; pass the final/ "
        "directory written by scripts/train_sft.py")]
    bad_policy = run_script("collect_preferences.py", f"policy={tmp_path / 'empty'}", f"output_dir={tmp_path / 'p'}")
    assert bad_policy.returncode == 1
    assert bad_policy.stderr.strip().splitlines()[-1].startswith(
        f"error: policy='{tmp_path / 'empty'}' is neither 'expert', 'random', 'perturbed' nor a checkpoint directory")
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()
