"""Tests for scripts/train_sft.py (through harness.cli) and its Hydra configs: composition, type checks, the script,
torchrun DDP."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from harness.cli import register_configs, run
from store.lerobot import Episode
from store.writer import DatasetWriter
from vla.checkpoint import load_checkpoint
from vla.run_state import weights_digest
from vla.sft import ModelConfig, SFTConfig, TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = ["model=tiny", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2"]


def compose_sft(*overrides: str) -> SFTConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train_sft", overrides=["dataset=data/pick", "output_dir=runs/x", *overrides])
    return OmegaConf.to_object(cfg)


def run_script(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "scripts/train_sft.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four episodes of eight random 32 px frames with random 7-D actions."""
    root = tmp_path_factory.mktemp("data") / "synthetic-pick"
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    writer = DatasetWriter(root, fps=10, state_names=names, action_names=names, config={})
    rng = np.random.default_rng(0)
    for e in range(4):
        writer.write_episode(e, Episode(
            task="synthetic", instruction=["push the cube left", "push the cube right"][e % 2], seed=e, success=True,
            images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), states=np.zeros((8, 7), np.float32),
            actions=rng.normal(scale=0.01, size=(8, 7)).astype(np.float32)))
    writer.finalize()
    return root


def test_presets_list_only_what_they_change():
    """A default is written once, in its dataclass: the default group files hold no values, a preset only the ones it
    changes."""
    for group, schema in (("model", ModelConfig()), ("train", TrainConfig())):
        assert OmegaConf.load(REPO / "conf" / group / "default.yaml") in (None, {}), group
        for preset in (REPO / "conf" / group).glob("*.yaml"):
            values = OmegaConf.to_container(OmegaConf.load(preset)) or {}
            assert all(getattr(schema, k) != v for k, v in values.items()), preset.name


@pytest.mark.parametrize("group", ["model=tiny", "model=llava", "model=paligemma", "train=fast"])
def test_every_preset_composes_into_a_valid_config(group):
    cfg = compose_sft(group)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)
    assert {"model=tiny": cfg.model.image_size == 32, "model=llava": cfg.model.arch == "llava",
            "model=paligemma": cfg.model.arch == "paligemma",
            "train=fast": cfg.train.steps == 200}[group]


@pytest.mark.parametrize("override, match", [
    ("train.stepz=3", "Key 'stepz' not in 'TrainConfig'"),
    ("lr=3", "Key 'lr' not in 'SFTConfig'"),
    ("model.arch_name=x", "Key 'arch_name' not in 'ModelConfig'"),
    ("train.steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ("train.augment=maybe", "Value 'maybe' is not a valid bool"),
])
def test_unknown_keys_and_wrong_types_fail_at_composition(override, match):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_sft(override)
    assert re.search(match, f"{caught.value} {caught.value.__cause__}"), f"{caught.value} {caught.value.__cause__}"


def test_a_key_added_with_plus_is_refused_before_any_work(tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        # Hydra's "+" opens the struct flag, so composition lets it through
        cfg = compose("train_sft", overrides=[f"dataset={tmp_path / 'no-dataset'}", f"output_dir={tmp_path / 'run'}",
                                              "+train.stepz=3"])
    refused = r"error: unknown config key train\.stepz; .*\(vla\.sft\.SFTConfig lists every key\)"
    with pytest.raises(SystemExit, match=refused):
        run(train, cfg)
    assert not (tmp_path / "run").exists()


def test_invalid_values_fail_when_the_dataclass_is_built():
    with pytest.raises(ValueError, match="warmup_steps=500 must be < train.steps=200"):
        compose_sft("train=fast", "train.warmup_steps=500")
    with pytest.raises(ValueError, match="arch='gpt2' is not supported"):
        compose_sft("model.arch=gpt2")
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(SFTConfig), {"train": {"seed": "zero"}})


@pytest.mark.slow
def test_script_trains_refuses_to_overwrite_and_reports_bad_input(dataset, tmp_path):
    out = tmp_path / "run"
    done = run_script(f"dataset={dataset}", f"output_dir={out}", "train.steps=3", *TINY_RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out / 'final'} and {out / 'summary.json'}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["effective_batch"] == 4
    assert not (out / ".hydra").exists()  # Hydra writes nothing into the run directory

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_script(f"dataset={dataset}", f"output_dir={out}", "train.steps=3", *TINY_RUN)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {out} already holds a run (checkpoints, final, summary.json); pass resume=true to continue or "
        "choose another output_dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    nope = tmp_path / "nope"
    missing = run_script(f"dataset={nope}", f"output_dir={tmp_path / 'run2'}", *TINY_RUN)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"error: dataset={nope} does not exist; generate it with scripts/generate_demos.py or fix the path"]
    unset = run_script(f"dataset={dataset}", *TINY_RUN)
    assert unset.returncode == 1 and unset.stderr.strip() == "error: output_dir is required; pass output_dir=PATH"


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model(dataset, tmp_path):
    out = tmp_path / "ddp"
    done = run_script(f"dataset={dataset}", f"output_dir={out}", "train.steps=4", "train.grad_accum=2",
                      "train.save_every=2", *TINY_RUN, torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["effective_batch"] == 4 * 2 * 2
    first, second = summary["weights_digests"]
    assert first == second  # both ranks hold the same weights at the end
    vla, action_tokenizers = load_checkpoint(out / "final")
    assert weights_digest(vla.model) == first and list(action_tokenizers) == ["synthetic-pick"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert [json.loads(line)["samples"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"] == [16] * 4  # metrics reduced over both ranks
