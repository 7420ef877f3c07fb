"""Tests for vla/parallel.py: the slot mask and the one forward pass against a slow reference, the loss mask, SFT
of a parallel head (vla/sft.py, vla/data.py) and its config, refusals; tiny models of every architecture
(fixtures in conftest.py)."""

import copy
import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.cli import register_configs
from store.errors import UsageError
from store.lerobot import LeRobotDataset
from test_grounding import write_labelled
from test_sft import read_metrics, write_dataset
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import load_checkpoint
from vla.data import FrameDataset
from vla.dpo import step_inputs
from vla.grounding import PLAN_TOKENS, sequence_loss
from vla.inputs import IGNORE_INDEX, build_inputs, build_slots, model_inputs
from vla.model import ARCHITECTURES, VLA, build_vla
from vla.parallel import (
    action_chunk,
    is_parallel,
    parallel_inputs,
    parallel_loss,
    set_action_head,
    slot_mask,
)
from vla.policy import VLAPolicy
from vla.sft import ModelConfig, SFTConfig, TrainConfig, train

INSTRUCTIONS = ["pick up the red cube", "put the zebra-striped mug under the lamp, carefully", "stack"]
ARCHS = sorted(ARCHITECTURES)
D = 7


def observations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "instruction": INSTRUCTIONS[i % 3],
             "state": rng.normal(size=7).astype(np.float32)} for i in range(n)]


def reference_logits(vla: VLA, obs: list[dict], slots: int) -> list[torch.Tensor]:
    """Per observation, the logits (S, V) of the slots from a slow, independent path: the row alone (no padding),
    eager attention, a float mask written out entry by entry, every position through the LM head."""
    model = copy.deepcopy(vla.model)
    model.set_attn_implementation("eager")
    bidirectional_prefix = ARCHITECTURES[model.config.model_type].uses_token_type_ids
    out = []
    for o in obs:
        prompt = build_inputs(vla, o["image"][None], [o["instruction"]])
        L0 = prompt["input_ids"].shape[1]
        L = L0 + slots
        ids = torch.cat([prompt["input_ids"][0], torch.full((slots,), vla.tokenizer.pad_token_id)])
        mask = torch.full((L, L), float("-inf"))
        for q in range(L):
            for k in range(L):
                if k <= q or (q >= L0 and k >= L0) or (bidirectional_prefix and q < L0 and k < L0):
                    mask[q, k] = 0.0
        positions = prompt["position_ids"][0, 0] + torch.arange(L)
        with torch.no_grad():
            logits = model(input_ids=ids[None], pixel_values=prompt["pixel_values"], attention_mask=mask[None, None],
                           position_ids=positions[None]).logits[0, L0:]
        out.append(logits)
    return out


# ---- the forward pass ----


@pytest.mark.parametrize("arch", [*ARCHS, "fast_vlm/film"])
def test_greedy_parallel_decoding_equals_the_reference_token_for_token(arch, parallel_vla, action_tok):
    vla = parallel_vla(arch, chunk=2, plan=arch == "fast_vlm")
    policy = VLAPolicy(vla, action_tok)
    obs = observations(3)
    tokens, log_probs, first = policy.chunk_tokens(np.stack([o["image"] for o in obs]), INSTRUCTIONS)
    lo, S = action_tok.token_offset, policy.slots
    assert tokens.shape == (3, S) == (3, (PLAN_TOKENS if arch == "fast_vlm" else 0) + 2 * D)
    for row, logits in enumerate(reference_logits(vla, obs, S)):
        ref = torch.log_softmax(logits[:, lo : lo + 256], dim=-1)  # (S, 256)
        np.testing.assert_array_equal(tokens[row], ref.argmax(-1).numpy() + lo)
        np.testing.assert_allclose(log_probs[row], ref.max(-1).values.numpy(), atol=1e-4)
        np.testing.assert_allclose(first[row], ref[policy.plan : policy.plan + D].numpy(), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_slots_read_the_prefix_and_each_other_and_the_prefix_never_reads_them(arch, parallel_vla):
    vla, S = parallel_vla(arch), 5
    images = np.stack([o["image"] for o in observations(3)])
    batch = build_slots(vla, images, INSTRUCTIONS, S)
    mask = slot_mask(vla.model, batch, S)[:, 0]  # (B, L, L) bool: the SDPA form
    valid = batch["attention_mask"].bool()
    assert mask.dtype == torch.bool and mask[:, -S:, -S:].all()  # every slot sees every slot
    assert not mask[:, :-S, -S:].any()  # no prefix token sees a slot
    assert (mask[:, -S:, :-S] == valid[:, None, :-S]).all()  # slots see the whole prompt, no padding
    with torch.no_grad():
        full = vla.model(**{k: batch[k] for k in ("input_ids", "position_ids", "pixel_values")},
                         attention_mask=slot_mask(vla.model, batch, S)).logits
        alone = vla.model(**model_inputs(build_inputs(vla, images, INSTRUCTIONS))).logits
    L0 = alone.shape[1]
    torch.testing.assert_close(full[:, :L0][valid[:, :L0]], alone[valid[:, :L0]], atol=1e-5, rtol=0)
    # the slots do read each other: a mask causal among them changes the first slot's logits
    causal = slot_mask(vla.model, batch, S).clone()
    causal[:, 0, -S:, -S:] = torch.ones(S, S, dtype=torch.bool).tril()
    with torch.no_grad():
        one_way = vla.model(**{k: batch[k] for k in ("input_ids", "position_ids", "pixel_values")},
                            attention_mask=causal).logits
    assert (one_way[:, -S] - full[:, -S]).abs().max() > 1e-4


class Wrapped(torch.nn.Module):
    """A model behind ``.module``, as DistributedDataParallel holds it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_the_loss_scores_only_the_valid_slots(parallel_vla, action_tok):
    vla = parallel_vla("llava", chunk=3, plan=True)
    obs, rng = observations(3), np.random.default_rng(1)
    lo = action_tok.token_offset
    chunk_ids = rng.integers(lo, lo + 256, (3, 3, D))
    valid = np.array([[True, True, True], [True, True, False], [True, False, False]])  # episodes ending
    plan = rng.integers(lo, lo + 256, (3, PLAN_TOKENS))
    images = np.stack([o["image"] for o in obs])
    batch = parallel_inputs(vla, images, INSTRUCTIONS, chunk_ids, valid, plan_ids=plan)
    scored = batch["targets"] != IGNORE_INDEX
    assert scored.sum(1).tolist() == [2 + 21, 2 + 14, 2 + 7]
    with torch.no_grad():
        loss, logits, targets = parallel_loss(vla.model, batch, action_tok, 0.0, nullcontext, PLAN_TOKENS)
    np.testing.assert_array_equal(targets.numpy(), chunk_ids[:, 0])  # the Meter reads the first action
    with torch.no_grad():  # as DistributedDataParallel wraps it: no config of its own
        wrapped, _, _ = parallel_loss(Wrapped(vla.model), batch, action_tok, 0.0, nullcontext, PLAN_TOKENS)
    torch.testing.assert_close(wrapped, loss)
    assert logits.shape[:2] == (3, D)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values")}
    S = batch["targets"].shape[1]
    with torch.no_grad():
        full = vla.model(**inputs, attention_mask=slot_mask(vla.model, batch, S)).logits  # (B, L, V)
    at = torch.zeros(full.shape[:2], dtype=torch.bool)
    at[:, -S:] = scored
    manual = torch.nn.functional.cross_entropy(full[at], batch["targets"][scored])
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=0)
    full = full.clone().requires_grad_(True)
    again = sequence_loss(full[:, -S:], batch["targets"].clamp(min=0), scored, slice(lo, lo + 256), 4.0)
    (grad,) = torch.autograd.grad(again, full)
    assert (grad[~at] == 0).all() and (grad[at].abs().sum(-1) > 0).all()
    noisy = full.detach() + 100 * torch.randn_like(full) * (~at).unsqueeze(-1)
    torch.testing.assert_close(sequence_loss(noisy[:, -S:], batch["targets"].clamp(min=0), scored,
                                             slice(lo, lo + 256), 4.0), again.detach())
    other = np.where(valid[..., None], chunk_ids, lo)  # what lies past an episode's end changes nothing
    with torch.no_grad():
        same, _, _ = parallel_loss(vla.model, parallel_inputs(vla, images, INSTRUCTIONS, other, valid, plan_ids=plan),
                                   action_tok, 0.0, nullcontext, PLAN_TOKENS)
    torch.testing.assert_close(same, loss)


# ---- training and scoring ----


def test_frame_dataset_gives_the_next_actions_and_masks_those_past_the_end(tmp_path):
    ds = LeRobotDataset(write_dataset(tmp_path / "data", episodes=2, frames=4))
    tok = ActionTokenizer.from_stats(ds.stats["action"], 500)
    frames = FrameDataset(ds, tok, chunk=3)
    ids = tok.encode(ds.columns["action"].astype(np.float32))
    item = frames[(0, 0, 1)]
    np.testing.assert_array_equal(item["chunk_ids"], ids[1:4])
    assert item["chunk_valid"].all()
    last = frames[(0, 0, 3)]  # the last frame of episode 0: one real action, two past the end
    assert last["chunk_valid"].tolist() == [True, False, False]
    np.testing.assert_array_equal(last["chunk_ids"][0], ids[3])
    assert "chunk_ids" not in FrameDataset(ds, tok)[(0, 0, 1)]  # the autoregressive head's items are unchanged


def test_sft_learns_chunks_and_the_option_survives_save_and_load(tmp_path, tiny_model, action_tok):
    dataset = write_dataset(tmp_path / "synthetic-pick")
    cfg = SFTConfig(dataset=str(dataset), output_dir=str(tmp_path / "run"),
                    model=tiny_model(ModelConfig, arch="fast_vlm", action_head="parallel", action_chunk=3),
                    train=TrainConfig(steps=40, batch_size=8, warmup_steps=4, lr=3e-3, log_every=4, save_every=40,
                                      eval_every=40, label_sigma=0.0))
    summary = train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert read_metrics(tmp_path / "run")[-1]["action_accuracy"] > 0.6 and summary["val"] is not None
    config = json.loads((tmp_path / "run/final/config.json").read_text())
    assert config["action_head"] == "parallel" and config["action_chunk"] == 3
    vla, tokenizers = load_checkpoint(tmp_path / "run/final")
    assert is_parallel(vla.model) and action_chunk(vla.model) == 3
    ds = LeRobotDataset(dataset)
    obs = [{k: ds[i][k] for k in ("image", "state", "instruction")} for i in ds.episode_frames(0)]
    policy = VLAPolicy(vla, tokenizers["synthetic-pick"])
    actions = np.stack([policy.act(o)[0] for o in obs[:3]])
    assert np.abs(actions[:, 0] - ds.columns["action"][:3, 0]).max() < 0.01  # dx follows the instruction
    plain = SFTConfig(dataset=str(dataset), output_dir=str(tmp_path / "plain"), model=tiny_model(ModelConfig),
                      train=replace(cfg.train, steps=1, warmup_steps=0, save_every=1, eval_every=0))
    train(plain)
    assert "action_head" not in json.loads((tmp_path / "plain/final/config.json").read_text())


def test_grounded_sft_with_cotraining_puts_the_plan_in_the_block(tmp_path, tiny_model):
    data = write_labelled(tmp_path / "labelled")
    cfg = SFTConfig(dataset=str(data), output_dir=str(tmp_path / "run"),
                    model=tiny_model(ModelConfig, arch="fast_vlm", action_head="parallel", action_chunk=2),
                    train=TrainConfig(steps=40, batch_size=8, warmup_steps=2, lr=3e-3, log_every=5, save_every=40,
                                      eval_every=40, grounded=True, cotrain={"list": 0.25}))
    train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses[-1] < 0.8 * losses[0], losses  # plan, chunk and list answers in one mean
    vla, tokenizers = load_checkpoint(tmp_path / "run/final")
    ds = LeRobotDataset(data)
    _, info = VLAPolicy(vla, next(iter(tokenizers.values()))).act({k: ds[0][k] for k in ("image", "state",
                                                                                          "instruction")})
    assert info["token_ids"].shape == (PLAN_TOKENS + D,) and info["plan"].shape == (2,)


# ---- refusals ----


@pytest.mark.parametrize("kw, match", [
    ({"action_head": "diffusion"}, "model.action_head='diffusion' is not one of"),
    ({"action_head": "parallel", "action_chunk": 0}, "model.action_chunk=0 must be an integer >= 1"),
    ({"action_chunk": 4}, "model.action_chunk=4 needs model.action_head=parallel"),
])
def test_config_composes_and_refuses_bad_heads(kw, match, tiny_model):
    with pytest.raises(UsageError, match=match):
        tiny_model(ModelConfig, **kw)
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "conf"), version_base=None):
        cfg = compose("train_sft", overrides=["dataset=d", "output_dir=o", "model=tiny",
                                              *(f"model.{k}={v}" for k, v in kw.items())])
    with pytest.raises(UsageError, match=match):
        OmegaConf.to_object(cfg)


def test_models_that_cannot_decode_in_parallel_are_refused(parallel_vla, action_tok, parallel_tokenizer, tiny_model):
    vla = build_vla(tiny_model(arch="llava"), parallel_tokenizer)
    vla.model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(UsageError, match="attention implementation 'flash_attention_2' cannot apply the slot mask"):
        set_action_head(vla.model, "parallel", 2)
    vla = build_vla(tiny_model(arch="paligemma"), parallel_tokenizer)
    vla.model.config.get_text_config().sliding_window = 16
    with pytest.raises(UsageError, match="sliding window"):
        set_action_head(vla.model, "parallel", 2)
    with pytest.raises(ValueError, match="chunk_execution='replan' is not one of"):
        VLAPolicy(parallel_vla(), action_tok, chunk_execution="replan")
    with pytest.raises(ValueError, match=r"offsets must be \(n=1,\) in \[0, 3\)"):
        step_inputs(parallel_vla(), observations(1)[0]["image"][None], INSTRUCTIONS[:1], np.full((1, D), 600), None,
                    [3])
    parallel = parallel_vla(chunk=2)
    with pytest.raises(UsageError, match="fine-tune it with model.action_head=parallel"):
        set_action_head(parallel.model, "autoregressive", 1)
    set_action_head(parallel.model, "parallel", 4)  # its chunk may change
    assert is_parallel(parallel.model) and action_chunk(parallel.model) == 4
