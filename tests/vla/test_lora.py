"""Tests for vla/lora.py and vla.checkpoint.merge_lora: LoRA SFT of a pretrained tiny Llava and FastVLM trains and
saves only the adapters, reloads them on their base, resumes exactly and merges into a checkpoint that acts the same."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from store.errors import UsageError
from tests.vla.test_sft import read_metrics, write_dataset
from vla.checkpoint import load_checkpoint, merge_lora
from vla.lora import ADAPTER_CONFIG, LoraConfig
from vla.model import build_vla, load_model
from vla.policy import VLAPolicy
from vla.sft import ModelConfig, SFTConfig, TrainConfig, train
from vla.text_tokenizer import build_tokenizer

ARCHS = ["fast_vlm", "llava"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "synthetic-pick", episodes=8)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    """``base(arch)``: a tiny random-init checkpoint directory, the "pretrained" model LoRA adapts."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = build_tokenizer(["In: What action should the robot take to move the gripper left?\nOut:"] * 3,
                                vocab_size=300)

    def make(arch: str) -> Path:
        if not (root / arch).is_dir():
            torch.manual_seed(3)
            build_vla(tiny_model(ModelConfig, arch=arch), tokenizer).save_pretrained(root / arch)
        return root / arch

    return make


def lora_cfg(dataset: Path, out: Path, pretrained: Path, steps: int = 12, **train) -> SFTConfig:
    tc = {"steps": steps, "batch_size": 8, "warmup_steps": 1, "lr": 1e-2, "log_every": 1, "save_every": 4,
          "eval_every": 0, "label_sigma": 0.0, **train}
    return SFTConfig(dataset=str(dataset), output_dir=str(out),
                     model=ModelConfig(pretrained=str(pretrained), lora=LoraConfig(r=4, alpha=8.0)),
                     train=TrainConfig(**tc))


def observations(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "instruction": f"move the gripper {side}",
             "state": rng.normal(size=7).astype(np.float32)} for side in ("left", "right") * (n // 2)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_only_adapters_and_merges_into_a_checkpoint_that_acts_the_same(dataset, base, tmp_path, arch):
    summary = train(lora_cfg(dataset, tmp_path / "run", base(arch)))
    final = Path(summary["checkpoint"])
    assert (final / ADAPTER_CONFIG).is_file() and not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # the adapters only ...
    assert sum(t.numel() for t in saved.values()) == summary["trainable_parameters"] < summary["parameters"] / 5
    rows = read_metrics(tmp_path / "run")
    first, last = ({k: np.mean([r[k] for r in part]) for k in ("loss", "action_accuracy")}
                   for part in (rows[:3], rows[-3:]))
    assert last["loss"] < first["loss"] - 0.2 and last["action_accuracy"] > first["action_accuracy"] + 0.2  # learning

    source = load_model(base(arch)).model.state_dict()
    adapted, stats = load_checkpoint(final)
    frozen = adapted.model.get_base_model().state_dict()
    lora = {k: v for k, v in frozen.items() if "lora_" in k}
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it moved
    for name, value in frozen.items():  # every base weight and buffer (batch-norm statistics too) as pretrained
        if "lora_" not in name:
            torch.testing.assert_close(value, source[name.replace(".base_layer", "")], rtol=0, atol=0)

    merged = merge_lora(final, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and not (merged / ADAPTER_CONFIG).exists()
    assert not any("lora_" in k for k in load_file(merged / "model.safetensors"))
    obs = observations()
    for temperature in (0.0, 1.0):
        a_actions, a_info = VLAPolicy.from_pretrained(final, temperature=temperature, seed=1).act_batch(obs)
        m_actions, m_info = VLAPolicy.from_pretrained(merged, temperature=temperature, seed=1).act_batch(obs)
        np.testing.assert_array_equal(a_info["token_ids"], m_info["token_ids"])
        np.testing.assert_array_equal(a_actions, m_actions)
        np.testing.assert_allclose(a_info["log_probs"], m_info["log_probs"], atol=1e-4, rtol=0)
    unadapted = VLAPolicy(load_model(base(arch)), next(iter(stats.values()))).act_batch(obs)[1]
    assert not np.allclose(unadapted["log_probs"], a_info["log_probs"], atol=1e-3)  # the adapters change the policy


@pytest.mark.slow
def test_a_resumed_lora_run_equals_the_uninterrupted_one(dataset, base, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    summary = train(lora_cfg(dataset, straight, base("fast_vlm"), steps=8))
    shutil.copytree(straight, killed, ignore=shutil.ignore_patterns("step-8", "final", "summary.json"))
    resumed = train(replace(lora_cfg(dataset, killed, base("fast_vlm"), steps=8), resume=True))
    assert resumed["resumed_from_step"] == 4
    assert read_metrics(killed) == read_metrics(straight)
    assert resumed["weights_digests"] == summary["weights_digests"]


def test_bad_lora_settings_and_directories_fail_with_the_fix(dataset, base, tmp_path):
    with pytest.raises(UsageError, match="adapts a pretrained model; set model.pretrained"):
        ModelConfig(lora=LoraConfig(r=8))
    with pytest.raises(UsageError, match="model.lora.r=-1 must be an integer >= 0"):
        LoraConfig(r=-1)
    bad = lora_cfg(dataset, tmp_path / "bad", base("llava"), steps=1, warmup_steps=0)
    bad.model.lora.target_modules = ["no_such_layer"]
    with pytest.raises(UsageError, match="model.lora: .*no_such_layer"):
        train(bad)
    with pytest.raises(UsageError, match="not a LoRA checkpoint"):
        merge_lora(base("llava"), tmp_path / "merged")

    final = Path(train(lora_cfg(dataset, tmp_path / "run", base("llava"), steps=1, warmup_steps=0))["checkpoint"])
    with pytest.raises(UsageError, match="is a LoRA adapter; merge it .*scripts/merge_lora.py"):
        train(lora_cfg(dataset, tmp_path / "again", final, steps=1, warmup_steps=0))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/file").write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not an empty directory"):
        merge_lora(final, tmp_path / "taken")
    assert (tmp_path / "taken/file").read_text() == "keep me"
    moved = tmp_path / "moved"
    shutil.copytree(final, moved)
    config = json.loads((moved / ADAPTER_CONFIG).read_text())
    (moved / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UsageError, match="LoRA adapter of the base model .*gone.*which is not there"):
        load_model(moved)
