"""Tests for vla/policy.py and vla/decoding.py: decoding checked token by token against teacher-forced Hugging Face
forwards."""

import copy

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from store.errors import UsageError
from vla import decoding
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import save_checkpoint
from vla.decoding import fast_path_blocker
from vla.inputs import build_inputs, model_inputs
from vla.model import ARCHITECTURES, VLA, build_vla
from vla.policy import VLAPolicy, action_confidence, nucleus, predict_action
from vla.text_tokenizer import action_token_offset, build_tokenizer

CORPUS = ["pick up the red cube", "push the blue ball into the green bowl", "stack the yellow block on the cube"]
INSTRUCTIONS = ["pick up the red cube", "put the zebra-striped mug under the lamp, carefully", "stack"]
D = 7
ARCHS = sorted(ARCHITECTURES)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def action_tokenizer(tokenizer) -> ActionTokenizer:
    q01 = np.array([-0.03, -0.02, -0.05, -0.2, -0.1, -0.4, 0.0])
    return ActionTokenizer(q01, -2 * q01 + 0.01, action_token_offset(tokenizer))


@pytest.fixture(scope="module")
def make_vla(tiny_model):
    """``make_vla(tokenizer, arch, seed=0)``: a tiny random-init VLA of ``arch`` in eval mode."""

    def make(tokenizer, arch: str, seed: int = 0) -> VLA:
        torch.manual_seed(seed)
        vla = build_vla(tiny_model(arch=arch), tokenizer)
        vla.model.eval()
        return vla

    return make


@pytest.fixture(scope="module", params=ARCHS)
def vla(request, tokenizer, make_vla) -> VLA:
    return make_vla(tokenizer, request.param)


@pytest.fixture(scope="module")
def observations() -> list[dict]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(INSTRUCTIONS), 32, 32, 3), dtype=np.uint8)
    states = rng.normal(size=(len(INSTRUCTIONS), 7)).astype(np.float32)
    return [{"image": i, "state": s, "instruction": t} for i, s, t in zip(images, states, INSTRUCTIONS)]


def teacher_forced(vla: VLA, observations: list[dict], token_ids: np.ndarray, lo: int) -> torch.Tensor:
    """Log-probs (B, D, 256) over the action ids that one full HF forward assigns at each action position."""
    images = np.stack([o["image"] for o in observations])
    batch = build_inputs(vla, images, [o["instruction"] for o in observations], token_ids,
                         np.stack([o["state"] for o in observations]))  # the states count only for a state reader
    with torch.no_grad():
        logits = vla.model(**model_inputs(batch)).logits  # (B, L, V)
    rows = torch.arange(len(observations)).unsqueeze(1)
    scoring = logits[rows, batch["action_positions"] - 1]  # (B, D, V): position t scores the token at t + 1
    return torch.log_softmax(scoring[..., lo : lo + 256], dim=-1)


def check_against_hf(vla, policy, observations, greedy: bool) -> None:
    _, info = policy.act_batch(observations)
    lo = policy.action_tokenizer.token_offset
    reference = teacher_forced(vla, observations, info["token_ids"], lo)  # (B, D, 256)
    chosen = torch.from_numpy(info["token_ids"] - lo).unsqueeze(-1)
    ref_log_probs = reference.gather(-1, chosen).squeeze(-1).numpy()  # (B, D)
    if greedy:
        np.testing.assert_array_equal(info["token_ids"], reference.argmax(-1).numpy() + lo)
    np.testing.assert_allclose(info["probs"], np.exp(ref_log_probs), atol=1e-4, rtol=0)
    np.testing.assert_allclose(info["log_probs"], ref_log_probs.sum(-1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(info["confidence"], action_confidence(np.exp(ref_log_probs)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hf_loop"])
@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_decoding_matches_teacher_forced_hf_forward(vla, action_tokenizer, observations, fast, temperature):
    policy = VLAPolicy(vla, action_tokenizer, temperature=temperature, fast=fast)
    assert (policy.fallback_reason is None) == fast
    check_against_hf(vla, policy, observations, greedy=temperature == 0)


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hf_loop"])
def test_a_state_reading_model_acts_on_the_observed_state(vla, action_tokenizer, observations, fast):
    states = ActionTokenizer([-2.0] * 7, [2.0] * 7, action_tokenizer.token_offset, absolute_dims=())
    reader = vla._replace(state_tokenizer=states)
    policy = VLAPolicy(reader, action_tokenizer, fast=fast)
    check_against_hf(reader, policy, observations, greedy=True)
    moved = [{**o, "state": -o["state"]} for o in observations]
    assert not np.allclose(policy.act_batch(moved)[1]["log_probs"], policy.act_batch(observations)[1]["log_probs"])
    np.testing.assert_array_equal(
        predict_action(reader, observations[0]["image"], INSTRUCTIONS[0], action_tokenizer, observations[0]["state"]),
        policy.act(observations[0])[0])


def test_lean_decoder_with_grouped_kv_heads_and_biases(tokenizer, action_tokenizer, observations, make_vla):
    """A Llama text model with 1 KV head for 2 query heads and biases in every projection (random, not zero)."""
    config = copy.deepcopy(make_vla(tokenizer, "llava").model.config)
    config.text_config.num_key_value_heads = 1
    config.text_config.attention_bias = config.text_config.mlp_bias = True
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    base = make_vla(tokenizer, "llava")
    vla = VLA(model, base.tokenizer, base.image_processor)
    policy = VLAPolicy(vla, action_tokenizer)
    assert policy.fallback_reason is None
    check_against_hf(vla, policy, observations, greedy=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_never_chooses_a_non_action_token(tokenizer, action_tokenizer, observations, arch, temperature, make_vla):
    vla = make_vla(tokenizer, arch)
    before, _ = VLAPolicy(vla, action_tokenizer, temperature=temperature).act_batch(observations)
    head = vla.model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    lo, hi = action_tokenizer.token_offset, action_tokenizer.token_offset + 256
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(1e4)
        biased.bias[lo:hi] = 0.0
    vla.model.set_output_embeddings(biased)
    batch = build_inputs(vla, np.stack([o["image"] for o in observations]), INSTRUCTIONS)
    with torch.no_grad():
        unconstrained = vla.model(**model_inputs(batch)).logits[:, -1].argmax(-1)
    assert ((unconstrained < lo) | (unconstrained >= hi)).all()  # the bias does dominate the full vocabulary
    for fast in (True, False):
        actions, info = VLAPolicy(vla, action_tokenizer, temperature=temperature, fast=fast).act_batch(observations)
        assert ((info["token_ids"] >= lo) & (info["token_ids"] < hi)).all()
        np.testing.assert_array_equal(actions, before)  # a constant shift outside the range changes nothing inside


def test_sampling_is_seeded(vla, action_tokenizer, observations):
    obs = observations[1]
    policy = VLAPolicy(vla, action_tokenizer, temperature=1.0, seed=3)
    first = [policy.act(obs)[1]["token_ids"] for _ in range(3)]
    policy.reset()
    assert all(np.array_equal(a, policy.act(obs)[1]["token_ids"]) for a in first)  # reset replays the seed
    assert not all(np.array_equal(first[0], a) for a in first[1:])  # the stream moves on between calls
    other = VLAPolicy(vla, action_tokenizer, temperature=1.0, seed=4)
    assert not np.array_equal(first[0], other.act(obs)[1]["token_ids"])
    other.reset(seed=3)
    assert np.array_equal(first[0], other.act(obs)[1]["token_ids"])


def test_low_temperature_sampling_is_greedy_and_greedy_ignores_the_seed(vla, action_tokenizer, observations):
    greedy, _ = VLAPolicy(vla, action_tokenizer).act_batch(observations)
    cold, _ = VLAPolicy(vla, action_tokenizer, temperature=1e-4, seed=1).act_batch(observations)
    hot, _ = VLAPolicy(vla, action_tokenizer, temperature=5.0, seed=1).act_batch(observations)
    np.testing.assert_array_equal(cold, greedy)
    assert not np.array_equal(hot, greedy)
    np.testing.assert_array_equal(VLAPolicy(vla, action_tokenizer, seed=7).act_batch(observations)[0], greedy)


def test_nucleus_keeps_the_most_probable_bins_that_reach_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(nucleus(probs, 0.75), torch.tensor([[0.0, 0.5, 0.0, 0.3], [0.0, 0.2, 0.3, 0.4]]))
    assert torch.equal(nucleus(probs, 0.35), torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.4]]))
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_top_p_narrows_sampling_and_keeps_the_full_log_probs(vla, action_tokenizer, observations):
    greedy, greedy_info = VLAPolicy(vla, action_tokenizer).act_batch(observations)
    narrow, info = VLAPolicy(vla, action_tokenizer, temperature=5.0, top_p=1e-6, seed=1).act_batch(observations)
    np.testing.assert_array_equal(narrow, greedy)  # a nucleus of one bin: the argmax, at any temperature
    np.testing.assert_allclose(info["log_probs"], greedy_info["log_probs"])  # scored under the full softmax
    hot, _ = VLAPolicy(vla, action_tokenizer, temperature=5.0, top_p=1.0, seed=1).act_batch(observations)
    assert not np.array_equal(hot, greedy)


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hf_loop"])
def test_batch_equals_single_acts(vla, action_tokenizer, observations, fast):
    """Instructions of different lengths: the batch is left-padded, which must change nothing."""
    policy = VLAPolicy(vla, action_tokenizer, fast=fast)
    actions, info = policy.act_batch(observations)
    assert actions.shape == (3, D) and actions.dtype == np.float32
    assert info["token_ids"].shape == info["probs"].shape == (3, D)
    assert info["confidence"].shape == info["log_probs"].shape == (3,)
    for row, obs in enumerate(observations):
        action, single = policy.act(obs)
        np.testing.assert_array_equal(action, actions[row])
        np.testing.assert_array_equal(single["token_ids"], info["token_ids"][row])
        np.testing.assert_allclose(single["probs"], info["probs"][row], atol=1e-5, rtol=0)


def test_action_is_the_decoded_token_ids_with_the_gripper_executed_as_0_or_1(vla, action_tokenizer, observations):
    action, info = VLAPolicy(vla, action_tokenizer).act(observations[0])
    assert action.shape == (D,) and action.dtype == np.float32
    decoded = action_tokenizer.decode(info["token_ids"])
    np.testing.assert_array_equal(action[:6], decoded[:6])
    assert action[6] == float(decoded[6] >= 0.5) and 0 < decoded[6] < 1  # a bin centre is never 0 or 1
    raw, raw_info = VLAPolicy(vla, action_tokenizer, binarize_gripper=False).act(observations[0])
    np.testing.assert_array_equal(raw_info["token_ids"], info["token_ids"])  # the tokens and their statistics stay
    np.testing.assert_array_equal(raw, decoded)
    batch, _ = VLAPolicy(vla, action_tokenizer).act_batch(observations)
    assert set(batch[:, 6].tolist()) <= {0.0, 1.0}
    assert 0 < float(info["confidence"]) <= 1
    np.testing.assert_allclose(np.log(info["confidence"]) * D, info["log_probs"], rtol=1e-5)
    np.testing.assert_array_equal(predict_action(vla, observations[0]["image"], INSTRUCTIONS[0], action_tokenizer),
                                  action)  # fmt: skip


def test_action_confidence_is_the_geometric_mean():
    probs = np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-7]])
    np.testing.assert_allclose(action_confidence(probs), [0.5, 1e-1], rtol=1e-9)
    assert action_confidence(np.zeros(7)) >= 0


@pytest.mark.parametrize("arch", ARCHS)
def test_follows_weight_updates_and_keeps_train_mode(tokenizer, action_tokenizer, observations, arch, make_vla):
    """The lean decoder caches fused weights: an optimizer step must invalidate them."""
    vla = make_vla(tokenizer, arch)
    policy = VLAPolicy(vla, action_tokenizer)
    _, before = policy.act_batch(observations)
    model = vla.model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = build_inputs(vla, np.stack([o["image"] for o in observations]), INSTRUCTIONS, before["token_ids"])
    model(**model_inputs(batch)).loss.neg().backward()  # push away from the current greedy tokens
    optimizer.step()
    _, after = policy.act_batch(observations)
    assert model.training  # restored after acting
    assert np.abs(after["log_probs"] - before["log_probs"]).min() > 1e-2
    model.eval()
    check_against_hf(vla, policy, observations, greedy=True)


def test_fallback_for_text_models_without_a_lean_decoder(vla, action_tokenizer, observations, monkeypatch):
    fast = VLAPolicy(vla, action_tokenizer)
    assert fast_path_blocker(vla.model) is None and fast.fallback_reason is None
    expected, _ = fast.act_batch(observations)
    text_type = vla.model.config.get_text_config().model_type
    monkeypatch.delitem(decoding._NORM_OFFSET, text_type)
    slow = VLAPolicy(vla, action_tokenizer)
    assert text_type in slow.fallback_reason and text_type in fast_path_blocker(vla.model)
    np.testing.assert_array_equal(slow.act_batch(observations)[0], expected)


def test_from_pretrained_round_trip(tmp_path, vla, action_tokenizer, observations):
    save_checkpoint(vla, {"sim": action_tokenizer}, tmp_path)
    original = VLAPolicy(vla, action_tokenizer)
    loaded = VLAPolicy.from_pretrained(tmp_path)
    for obs in observations:
        action, info = loaded.act(obs)
        expected, expected_info = original.act(obs)
        np.testing.assert_array_equal(action, expected)
        np.testing.assert_allclose(info["probs"], expected_info["probs"], atol=1e-6, rtol=0)
    assert VLAPolicy.from_pretrained(tmp_path, unnorm_key="sim", temperature=1.0).temperature == 1.0

    save_checkpoint(vla, {"sim": action_tokenizer, "real": action_tokenizer}, tmp_path)
    with pytest.raises(UsageError, match="pass unnorm_key"):
        VLAPolicy.from_pretrained(tmp_path)
    with pytest.raises(UsageError, match="not in this checkpoint"):
        VLAPolicy.from_pretrained(tmp_path, unnorm_key="lab")


def test_from_pretrained_without_action_statistics(tmp_path, vla):
    vla.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="action_tokenizer.json"):
        VLAPolicy.from_pretrained(tmp_path)


def test_rejects_bad_arguments(vla, action_tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        VLAPolicy(vla, action_tokenizer, temperature=-1.0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            VLAPolicy(vla, action_tokenizer, temperature=1.0, top_p=top_p)
    vocab = vla.model.config.get_text_config().vocab_size
    beyond = ActionTokenizer(action_tokenizer.q01, action_tokenizer.q99, token_offset=vocab - 100)
    with pytest.raises(ValueError, match="exceed the model's vocabulary"):
        VLAPolicy(vla, beyond)
