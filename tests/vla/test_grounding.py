"""Tests for vla/grounding.py, grounded SFT (vla/sft.py, vla/data.py), the grounded policy (vla/policy.py) and DPO's
scoring of its plan (vla/dpo.py): real runs of a tiny model on a tiny dataset with scene labels."""

from pathlib import Path

import numpy as np
import pytest
import torch

from store.errors import UsageError
from store.lerobot import Episode, LeRobotDataset
from store.writer import DatasetWriter
from test_sft import ACTION_NAMES, read_metrics, write_dataset
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import load_checkpoint
from vla.data import Collator, FrameDataset, instruction_templates
from vla.dpo import action_logps, step_inputs
from vla.grounding import LOCATION_HIGH, LOCATION_LOW, OFFSET_RANGE, OFFSET_TOKENS, PLAN_TOKENS, Queries, \
    location_tokenizer, offset_tokenizer, plan_tokens, sequence_loss
from vla.inputs import IGNORE_INDEX
from vla.model import build_vla
from vla.policy import VLAPolicy
from vla.sft import ModelConfig, SFTConfig, TrainConfig, train
from vla.text_tokenizer import action_token_offset, build_tokenizer

LABELS = ["red cube", "blue cube", "red bar"]
PLACES = np.array([[0.40, -0.15, 0.02], [0.55, 0.0, 0.02], [0.62, 0.18, 0.02]])  # each label's fixed place


def write_labelled(root: Path, episodes: int = 12, frames: int = 6, tip: np.ndarray | None = None) -> Path:
    """Episodes naming one of three objects (each always at its own place); the action moves towards it. States
    are random, or with ``tip`` the tip (the state's first 3 values) always at that place (3,)."""
    writer = DatasetWriter(root, fps=10, state_names=[f"s{i}" for i in range(7)], action_names=ACTION_NAMES,
                           config={"labelled": 1})
    rng = np.random.default_rng(0)
    for e in range(episodes):
        target = e % 3
        positions = np.repeat(PLACES[None], frames, axis=0) + rng.normal(0, 0.002, (frames, 3, 3))
        actions = np.zeros((frames, 7))
        actions[:, :2] = 0.1 * (PLACES[target, :2] - [0.5, 0.0])
        states = rng.normal(size=(frames, 7))
        if tip is not None:
            states[:, :3] = tip
        writer.write_episode(e, Episode(
            task="reach", instruction=f"touch the {LABELS[target]}", seed=e, success=True,
            images=rng.integers(0, 255, (frames, 32, 32, 3)).astype(np.uint8), actions=actions.astype(np.float32),
            states=states.astype(np.float32), objects=LABELS,
            object_positions=positions.astype(np.float32), target_index=target))
    writer.finalize()
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return write_labelled(tmp_path_factory.mktemp("data") / "labelled")


def _cfg(tiny_model, dataset: Path, out: Path, **train_kw) -> SFTConfig:
    kw = {"steps": 40, "batch_size": 8, "warmup_steps": 2, "lr": 3e-3, "log_every": 5, "save_every": 40,
          "eval_every": 40, "grounded": True, "cotrain": {"list": 0.25}}
    return SFTConfig(dataset=str(dataset), output_dir=str(out), model=tiny_model(ModelConfig, arch="fast_vlm"),
                     train=TrainConfig(**{**kw, **train_kw}))


def test_a_grounded_batch_scores_the_plan_the_actions_and_the_queries(labelled, tiny_model):
    ds = LeRobotDataset(labelled)
    assert instruction_templates(ds) == ["touch the {target}"]
    vla = build_vla(tiny_model(), build_tokenizer(["touch the red cube", "List the objects. blue bar"], 300))
    offset = action_token_offset(vla.tokenizer)
    vla = vla._replace(location_tokenizer=location_tokenizer(offset))
    action_tok = ActionTokenizer.from_stats(ds.stats["action"], offset)
    frames = FrameDataset(ds, action_tok)
    queries = Queries(vla, instruction_templates(ds))
    items = [frames[(0, 0, i)] for i in range(8)]
    batch = Collator(vla, 0, 0, False, queries, {"list": 0.25})(items)
    assert len(batch["actions"]) == 6  # two of eight rows ask for the list instead
    labels = batch["labels"]
    for row, it in enumerate(items[2:], start=2):
        scored = labels[row][labels[row] != IGNORE_INDEX].tolist()
        place = queries.place(it["positions"][it["target"]])
        assert scored == place + it["action_ids"].tolist() + [vla.tokenizer.eos_token_id]
    for row in range(2):  # every object's label and place, in some order
        scored = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert sorted(t for t in scored if offset <= t < offset + 256) == sorted(
            t for i in range(3) for t in queries.place(items[row]["positions"][i]))
    again = Collator(vla, 0, 0, False, queries, {"list": 0.25})(items)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # the draws are seeded by the batch key


def test_soft_targets_reduce_to_cross_entropy_and_spare_text_tokens():
    logits = torch.randn(2, 3, 20)
    targets = torch.tensor([[12, 3, 15], [14, 11, 2]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    hard = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    torch.testing.assert_close(sequence_loss(logits, targets, valid, slice(10, 18), 0.0), hard)
    soft = sequence_loss(logits, targets, valid, slice(10, 18), 2.0)
    assert not torch.isclose(soft, hard)


def test_grounded_sft_learns_to_name_the_place_and_the_policy_decodes_it(labelled, tiny_model, tmp_path):
    summary = train(_cfg(tiny_model, labelled, tmp_path / "run", steps=200, label_sigma=0.0, log_every=20))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses[-1] < 0.6 * losses[0]
    assert summary["val"] is not None
    vla, tokenizers = load_checkpoint(tmp_path / "run" / "final")
    assert plan_tokens(vla.model) == PLAN_TOKENS and vla.location_tokenizer is not None
    ds = LeRobotDataset(labelled)
    obs = [{k: ds[i][k] for k in ("image", "state", "instruction")} for i in (ds.episode_frames(e)[0] for e in range(3))]
    policy = VLAPolicy(vla, next(iter(tokenizers.values())))
    actions, info = policy.act_batch(obs)
    assert info["token_ids"].shape == (3, PLAN_TOKENS + 7) and actions.shape == (3, 7)
    errors = np.linalg.norm(info["plan"] - PLACES[:, :2], axis=1)  # episodes 0, 1, 2 name objects 0, 1, 2
    assert (errors < 0.05).all(), errors
    slow = VLAPolicy(vla, next(iter(tokenizers.values())), fast=False)
    _, slow_info = slow.act_batch(obs)
    np.testing.assert_array_equal(slow_info["token_ids"], info["token_ids"])
    # DPO scores the same P + D tokens under the same distribution as the policy reports.
    batch = step_inputs(vla, np.stack([o["image"] for o in obs]), [o["instruction"] for o in obs],
                        info["token_ids"], np.stack([o["state"] for o in obs]))
    ids = slice(policy.ids.start, policy.ids.stop)
    with torch.no_grad():
        logps = action_logps(vla.model, batch, ids).double().numpy()
    np.testing.assert_allclose(logps, info["log_probs"], atol=1e-3)


def test_a_plan_with_the_tips_offset_is_trained_and_decoded(tmp_path, tiny_model):
    tip = np.array([0.5, 0.05, 0.1])
    data = write_labelled(tmp_path / "fixed-tip", tip=tip)
    ds = LeRobotDataset(data)
    vla = build_vla(tiny_model(), build_tokenizer(["touch the red cube"], 300))
    offset = action_token_offset(vla.tokenizer)
    vla = vla._replace(location_tokenizer=location_tokenizer(offset))
    vla.model.config.plan_tokens = PLAN_TOKENS + OFFSET_TOKENS
    frames = FrameDataset(ds, ActionTokenizer.from_stats(ds.stats["action"], offset))
    items = [frames[(0, 0, i)] for i in range(4)]
    batch = Collator(vla, 0, 0, False, Queries(vla, instruction_templates(ds)))(items)
    moves = offset_tokenizer(vla.location_tokenizer)
    for row, it in enumerate(items):  # the place, then the offset from the frame's own tip, then the actions
        target = it["positions"][it["target"]]
        expected = (vla.location_tokenizer.encode(target[None].astype(np.float64))[0, :2].tolist()
                    + moves.encode((target[:2] - it["state"][:2])[None].astype(np.float64))[0].tolist()
                    + it["action_ids"].tolist() + [vla.tokenizer.eos_token_id])
        assert batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist() == expected

    train(_cfg(tiny_model, data, tmp_path / "run", steps=200, label_sigma=0.0, log_every=20, plan_offset=True))
    vla, tokenizers = load_checkpoint(tmp_path / "run" / "final")
    assert plan_tokens(vla.model) == PLAN_TOKENS + OFFSET_TOKENS
    obs = [{k: ds[i][k] for k in ("image", "state", "instruction")} for i in (ds.episode_frames(e)[0] for e in range(3))]
    policy = VLAPolicy(vla, next(iter(tokenizers.values())))
    _, info = policy.act_batch(obs)
    assert info["token_ids"].shape == (3, PLAN_TOKENS + OFFSET_TOKENS + 7)
    # episodes 0, 1, 2 name objects 0, 1, 2; an offset beyond the range decodes as its end bin
    truth = np.clip(PLACES[:, :2] - tip[:2], -OFFSET_RANGE, OFFSET_RANGE)
    np.testing.assert_allclose(info["plan_offset"], truth, atol=0.03)
    np.testing.assert_allclose(info["plan"], PLACES[:, :2], atol=0.05)
    _, slow = VLAPolicy(vla, next(iter(tokenizers.values())), fast=False).act_batch(obs)
    np.testing.assert_array_equal(slow["token_ids"], info["token_ids"])
    with pytest.raises(UsageError, match="train.grounded=true"):
        TrainConfig(plan_offset=True)


def test_grounded_sft_needs_scene_labels(tmp_path, tiny_model):
    plain = write_dataset(tmp_path / "plain", episodes=3, frames=4)
    with pytest.raises(UsageError, match="generate_demos.py"):
        train(_cfg(tiny_model, plain, tmp_path / "out", steps=3))
    with pytest.raises(UsageError, match="cotrain"):
        TrainConfig(cotrain={"list": 0.6, "plan": 0.5})
    with pytest.raises(UsageError, match="cotrain"):
        TrainConfig(cotrain={"caption": 0.1})


def test_location_tokens_cover_the_table():
    loc = location_tokenizer(100)
    corners = np.array([LOCATION_LOW, LOCATION_HIGH])
    np.testing.assert_allclose(loc.decode(loc.encode(corners)), corners, atol=0.3 / 255)
