"""Tests for vla/sft.py, vla/data.py and vla/loop.py: real SFT runs of a tiny model on a tiny synthetic dataset whose
actions can be learned."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from store.errors import UsageError
from store.lerobot import DatasetError, Episode
from store.writer import DatasetWriter
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import load_checkpoint
from vla.data import BRIGHTNESS, SHIFT, augment_images
from vla.inputs import PROMPT_TEMPLATE, build_inputs, model_inputs
from vla.loop import EpochBatchSampler, split_episodes
from vla.model import ARCHITECTURES, build_vla, load_model
from vla.run_state import latest_checkpoint, weights_digest
from vla.sft import ModelConfig, SFTConfig, TrainConfig, action_logits, action_loss, train
from vla.text_tokenizer import action_token_offset, build_tokenizer

ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
INSTRUCTIONS = ["move the gripper left", "move the gripper right"]


def write_dataset(root: Path, episodes: int = 6, frames: int = 8, seed: int = 0) -> Path:
    """A LeRobot dataset whose actions depend on the instruction (dx, dz) and the image (red level -> dy, gripper);
    the rotations are zero."""
    writer = DatasetWriter(root, fps=10, state_names=[f"s{i}" for i in range(7)], action_names=ACTION_NAMES,
                           config={"synthetic": seed})
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        instruction = INSTRUCTIONS[e % 2]
        red = rng.uniform(0, 1, frames)  # (T,)
        images = np.zeros((frames, 32, 32, 3))
        images[..., 0] = 255 * red[:, None, None]
        images[..., 1:] = rng.uniform(0, 60, (frames, 32, 32, 2))
        actions = np.zeros((frames, 7))
        actions[:, 0] = -0.02 if "left" in instruction else 0.02
        actions[:, 1] = 0.04 * (red - 0.5)
        actions[:, 2] = 0.01 if "left" in instruction else -0.01
        actions[:, 6] = red > 0.5
        writer.write_episode(e, Episode(task="synthetic", instruction=instruction, seed=e, success=True,
                                        images=images.astype(np.uint8), actions=actions.astype(np.float32),
                                        states=rng.normal(size=(frames, 7)).astype(np.float32)))
    writer.finalize()
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "synthetic-pick")


@pytest.fixture(scope="module")
def make_cfg(tiny_model):
    """``make_cfg(dataset, out, arch="llava", **train)``: an SFTConfig of the tiny model for a few quick steps."""

    def make(dataset: Path, out: Path, arch: str = "llava", **train) -> SFTConfig:
        defaults = {"steps": 6, "batch_size": 8, "warmup_steps": 1, "lr": 3e-3, "log_every": 1, "save_every": 3,
                    "eval_every": 3}
        return SFTConfig(dataset=str(dataset), output_dir=str(out), model=tiny_model(ModelConfig, arch=arch),
                         train=TrainConfig(**{**defaults, **train}))

    return make


def read_metrics(out: Path, split: str = "train") -> list[dict]:
    """Logged metrics of one split, without the timing (samples_per_s)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows if r["split"] == split]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- pieces ----


def test_split_holds_out_whole_episodes():
    train_eps, val_eps = split_episodes(10, 0.2, seed=0)
    assert len(val_eps) == 2 and sorted(train_eps + val_eps) == list(range(10))
    assert split_episodes(10, 0.2, seed=0) == (train_eps, val_eps)
    assert split_episodes(2, 0.01, seed=0)[1] != [] and split_episodes(1, 0.5, seed=0) == ([0], [])
    assert split_episodes(5, 0.0, seed=0) == (list(range(5)), [])


def take(sampler: EpochBatchSampler, n: int) -> list:
    """The first n batches of an endless sampler."""
    return [batch for batch, _ in zip(iter(sampler), range(n))]


def test_sampler_shards_each_epoch_and_restarts_at_a_position():
    frames = list(range(100, 123))  # 23 frames, 2 ranks, batch 4: 2 batches each per epoch
    ranks = [take(EpochBatchSampler(frames, 4, seed=1, rank=r, world=2), 4) for r in range(2)]
    for epoch in (0, 1):
        seen = [key[2] for r in range(2) for batch in ranks[r][2 * epoch : 2 * epoch + 2] for key in batch]
        assert len(seen) == len(set(seen)) == 16 and set(seen) <= set(frames)  # disjoint across ranks
        assert {key[:2] for batch in ranks[0][2 * epoch : 2 * epoch + 2] for key in batch} == {(epoch, 0), (epoch, 1)}
    assert ranks[0][:2] != [[(1, b, f) for _, b, f in batch] for batch in ranks[0][2:]]  # reshuffled per epoch
    assert take(EpochBatchSampler(frames, 4, seed=1, rank=0, world=2, start_epoch=1, start_batch=1), 1) == [ranks[0][3]]
    with pytest.raises(UsageError, match="cannot fill one batch"):
        EpochBatchSampler(frames, 16, seed=1, rank=0, world=2)


def test_soft_action_loss_is_ordinal_and_reduces_to_cross_entropy():
    from vla.action_tokenizer import ActionTokenizer

    V, lo, D = 300, 40, 7
    tok = ActionTokenizer(-np.ones(D), np.ones(D), token_offset=lo, n_bins=256)
    targets = torch.cat([torch.full((1, D), lo + 100), torch.tensor([[2]])], dim=1)  # (1, D + 1): bin 100, EOS = 2
    logits = torch.randn(1, D + 1, V, generator=torch.Generator().manual_seed(0))
    hard = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(action_loss(logits, targets, tok, 0.0), hard)

    def peaked(bin_: int) -> torch.Tensor:  # all action positions confident in one bin, EOS right
        out = torch.full((1, D + 1, V), -10.0)
        out[:, :D, lo + bin_] = 10.0
        out[:, D, 2] = 10.0
        return out

    near, far, exact = (action_loss(peaked(b), targets, tok, 4.0) for b in (102, 200, 100))
    assert exact < near < far  # one-hot scores 102 and 200 alike; soft targets know 102 is closer
    # the loss is minimal when the prediction equals the Gaussian target over the action ids
    q = torch.exp(-0.5 * ((torch.arange(256.0) - 100) / 4.0) ** 2)
    best = torch.full((1, D + 1, V), -1e4)
    best[:, :D, lo : lo + 256] = (q / q.sum()).clamp_min(1e-30).log()
    best[:, D, 2] = 0.0
    assert action_loss(best, targets, tok, 4.0) < action_loss(best + 0.1 * logits, targets, tok, 4.0)


def test_augment_images_is_seeded_and_bounded():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 32, 40, 3), dtype=np.uint8))
    a = augment_images(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, augment_images(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment_images(images, torch.Generator().manual_seed(2)))

    flat = augment_images(torch.full((4, 32, 40, 3), 100, dtype=torch.uint8), torch.Generator().manual_seed(1))
    assert (flat.amin(dim=(1, 2, 3)) == flat.amax(dim=(1, 2, 3))).all()  # shifting a flat image changes nothing
    assert (flat.int() - 100).abs().max() <= 255 * BRIGHTNESS + 1 and (flat != 100).any()

    dot = torch.zeros(8, 32, 40, 3, dtype=torch.uint8)
    dot[:, 16, 20] = 255
    moved = augment_images(dot, torch.Generator().manual_seed(3)).int().sum(-1).flatten(1).argmax(1)  # (8,)
    rows, cols = moved // 40, moved % 40
    pad = round(SHIFT * 40)
    assert ((rows - 16).abs() <= pad).all() and ((cols - 20).abs() <= pad).all()
    assert ((rows != 16) | (cols != 20)).any()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_action_logits_loss_equals_the_models_own_loss(arch, tiny_model):
    tokenizer = build_tokenizer([PROMPT_TEMPLATE.format(instruction=t) for t in INSTRUCTIONS], vocab_size=300)
    torch.manual_seed(0)
    vla = build_vla(tiny_model(ModelConfig, arch=arch), tokenizer)
    rng = np.random.default_rng(0)
    offset = action_token_offset(tokenizer)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    instructions = ["move left", "move the gripper right now please", "x"]  # unequal lengths: padding
    batch = build_inputs(vla, images, instructions, rng.integers(offset, offset + 256, (3, 7)))
    model = vla.model.eval()
    with torch.no_grad():
        logits, targets = action_logits(model, batch)
        expected = model(**model_inputs(batch)).loss
    assert logits.shape == (3, 8, len(tokenizer)) and (targets[:, 7] == tokenizer.eos_token_id).all()
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()), expected)


def test_latest_checkpoint_ignores_tmp_and_incomplete(tmp_path):
    for name, complete in (("step-3", True), ("step-12", True), ("step-20", False), (".tmp-step-30", True),
                           ("step-x", True)):
        (tmp_path / name).mkdir()
        if complete:
            for f in ("trainer_state.json", "trainer_state.safetensors", "model.safetensors"):
                (tmp_path / name / f).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-12"
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("train, match", [
    ({"steps": 0}, "train.steps=0 must be >= 1"),
    ({"steps": 10, "warmup_steps": 10}, "warmup_steps=10 must be < train.steps=10"),
    ({"lr": 0.0}, "train.lr=0.0 must be > 0"),
    ({"grad_clip": 0.0}, "pass null to disable"),
    ({"val_fraction": 1.0}, "val_fraction=1.0 must lie in"),
    ({"action_bins": 1}, "action_bins=1 must lie in"),
    ({"device": "tpu"}, "not one of auto, cpu, cuda"),
])
def test_train_config_validation(train, match):
    with pytest.raises(UsageError, match=match):
        TrainConfig(**train)


# ---- runs ----


def test_loss_falls_and_the_checkpoint_loads(dataset, tmp_path, make_cfg):
    out = tmp_path / "run"
    summary = train(make_cfg(dataset, out, steps=40, batch_size=8, warmup_steps=4, log_every=4, save_every=20,
                             eval_every=20, augment=False, label_sigma=0.0))
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0], losses  # from ~ln(V) = 6.3 nats
    assert read_metrics(out)[-1]["action_accuracy"] > 0.6  # 6 of the 7 dimensions are predictable exactly
    assert summary["loss"] == losses[-1] and summary["val"]["loss"] == read_metrics(out, "val")[-1]["loss"]
    assert summary["effective_batch"] == 8 and summary["samples_per_s"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-40"]
    diag = json.loads((out / "action_diagnostics.json").read_text())
    assert diag["bins_used"][6] == 2  # the gripper is 0 or 1
    assert any((out / "tb").iterdir())

    vla, action_tokenizers = load_checkpoint(summary["checkpoint"])
    assert list(action_tokenizers) == ["synthetic-pick"]  # keyed by the dataset directory name
    stats = json.loads((dataset / "meta/stats.json").read_text())["action"]
    expected = ActionTokenizer.from_stats(stats, action_token_offset(vla.tokenizer))
    assert action_tokenizers["synthetic-pick"].to_dict() == expected.to_dict()
    state_stats = json.loads((dataset / "meta/stats.json").read_text())["observation.state"]
    expected = ActionTokenizer.from_stats(state_stats, action_token_offset(vla.tokenizer), absolute_dims=())
    assert vla.state_tokenizer.to_dict() == expected.to_dict()  # model.proprio defaults to true
    assert weights_digest(vla.model) == summary["weights_digests"][0]
    step_vla, _ = load_checkpoint(out / "checkpoints/step-40")
    assert weights_digest(step_vla.model) == summary["weights_digests"][0]


def test_resume_reproduces_the_uninterrupted_run(dataset, tmp_path, make_cfg):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    summary = train(make_cfg(dataset, straight, steps=8, save_every=4, grad_accum=2, batch_size=4, augment=True))
    # A run killed after its step-4 checkpoint: what it had written by then, plus a half-written checkpoint.
    shutil.copytree(straight, killed, ignore=shutil.ignore_patterns("step-8", "final", "summary.json"))
    (killed / "checkpoints/.tmp-step-6").mkdir()
    (killed / "checkpoints/.tmp-step-6/trainer_state.json").write_text("{")
    resumed = train(replace(make_cfg(dataset, killed, steps=8, save_every=4, grad_accum=2, batch_size=4,
                                     augment=True), resume=True))
    assert resumed["resumed_from_step"] == 4
    assert read_metrics(killed) == read_metrics(straight)  # equal losses, step by step, float for float
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 9))
    assert resumed["weights_digests"] == summary["weights_digests"]
    assert not (killed / "checkpoints/.tmp-step-6").exists()

    again = train(replace(make_cfg(dataset, killed, steps=8, save_every=4, grad_accum=2, batch_size=4,
                                   augment=True), resume=True))
    assert again == json.loads((killed / "summary.json").read_text())  # finished: nothing to do


def test_dataloader_workers_change_nothing(dataset, tmp_path, make_cfg):
    inline = train(make_cfg(dataset, tmp_path / "inline", steps=3, num_workers=0))
    workers = train(make_cfg(dataset, tmp_path / "workers", steps=3, num_workers=2))
    assert read_metrics(tmp_path / "workers") == read_metrics(tmp_path / "inline")
    assert workers["weights_digests"] == inline["weights_digests"]


def test_an_existing_run_is_never_overwritten(dataset, tmp_path, make_cfg):
    out = tmp_path / "run"
    train(make_cfg(dataset, out, steps=2, save_every=2))
    before = snapshot(out)
    with pytest.raises(UsageError, match="already holds a run.*pass resume=true to continue or choose another"):
        train(make_cfg(dataset, out, steps=2, save_every=2))
    other = make_cfg(dataset, out, steps=2, save_every=2)
    other.model.text_layers = 1
    with pytest.raises(UsageError, match="resume=true but .* was trained with model="):
        train(replace(other, resume=True))
    assert snapshot(out) == before


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fine_tune_a_pretrained_directory(dataset, tmp_path, arch, make_cfg, tiny_model):
    tokenizer = build_tokenizer(["In: What action should the robot take to stack the cube?\nOut:"], vocab_size=300)
    torch.manual_seed(1)
    build_vla(tiny_model(ModelConfig, arch=arch), tokenizer).save_pretrained(tmp_path / "pretrained")
    cfg = make_cfg(dataset, tmp_path / "run", steps=1, warmup_steps=0, save_every=1, eval_every=0)
    cfg.model = ModelConfig(pretrained=str(tmp_path / "pretrained"))  # default sizes: the checkpoint's win
    summary = train(cfg)
    source = load_model(tmp_path / "pretrained")
    vla, _ = load_checkpoint(summary["checkpoint"])
    assert vla.model.config.model_type == arch and vla.model.config.text_config.hidden_size == 32
    assert vla.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert weights_digest(vla.model) == summary["weights_digests"][0]
    moved = [(p - q).abs().max().item() for p, q in zip(vla.model.parameters(), source.model.parameters())]
    assert max(moved) > 0  # one step moved the weights ...
    assert max(moved) < 2 * cfg.train.lr  # ... by about lr (Adam's first step) from the pretrained ones


def _bad_pretrained(kind: str, root: Path, model: ModelConfig) -> Path:
    path = root / kind
    tokenizer = build_tokenizer(["pick up the cube"], vocab_size=300, n_action_bins=16 if kind == "no-actions" else 256)
    if kind != "empty":
        build_vla(model, tokenizer).save_pretrained(path)
    path.mkdir(exist_ok=True)
    if kind == "gpt2":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    if kind == "no-weights":
        (path / "model.safetensors").unlink()
    return path


@pytest.mark.parametrize("kind, match", [
    ("empty", "holds no config.json, so it is not a Hugging Face checkpoint"),
    ("gpt2", "holds a 'gpt2' model; supported model types are"),
    ("no-weights", "holds no model weights"),
    ("no-actions", "its tokenizer lacks the 256 action tokens <act_000>..<act_255>"),
])
def test_bad_pretrained_directories(dataset, tmp_path, kind, match, make_cfg, tiny_model):
    cfg = make_cfg(dataset, tmp_path / "run")
    cfg.model = ModelConfig(pretrained=str(_bad_pretrained(kind, tmp_path, tiny_model(ModelConfig, arch="fast_vlm"))))
    with pytest.raises(UsageError, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, match", [
    ("missing", "does not exist; generate it"),
    ("no-stats", "meta/stats.json is missing"),
    ("no-quantiles", "has no action q01/q99; regenerate the dataset"),
    ("no-state-quantiles", "has no observation.state q01/q99; regenerate the dataset"),
])
def test_bad_datasets(dataset, tmp_path, damage, match, make_cfg):
    root = tmp_path / "data"
    if damage != "missing":
        shutil.copytree(dataset, root)
    if damage == "no-stats":
        (root / "meta/stats.json").unlink()
    if damage.endswith("quantiles"):
        stats = json.loads((root / "meta/stats.json").read_text())
        feature = "observation.state" if damage == "no-state-quantiles" else "action"
        del stats[feature]["q01"], stats[feature]["q99"]
        (root / "meta/stats.json").write_text(json.dumps(stats))
    with pytest.raises(DatasetError, match=match):
        train(make_cfg(root, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
