"""Tests for vla/dpo.py: the pure loss functions against their published formulas, log-probs against the policy,
and real DPO runs of a tiny model on a tiny synthetic preference set (no simulator)."""

import json
import math
import shutil
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from store.errors import UsageError
from store.lerobot import Episode
from store.preferences import PAIRS_FILE, ROLLOUTS_FILE, PreferenceSet
from store.writer import DatasetWriter
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import load_checkpoint, save_checkpoint
from vla.dpo import DPOConfig, action_logps, example_logps, pair_batch, reference_logps, train_dpo
from vla.dpo_loss import chosen_shift, dpo_loss, dpo_metrics, sequence_logps
from vla.inputs import PROMPT_TEMPLATE, build_inputs
from vla.loop import LoopConfig
from vla.lora import ADAPTER_CONFIG, LoraConfig, add_lora
from vla.model import build_vla, load_model
from vla.policy import VLAPolicy
from vla.run_state import weights_digest
from vla.text_tokenizer import action_token_offset, build_tokenizer

INSTRUCTIONS = ["touch the red cube", "pick up the long blue bar and lift it"]  # different prompt lengths
NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
LOG2 = math.log(2)


# ---- pure functions ----


def published_dpo(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def test_equal_log_probs_give_log_2_and_zero_rewards():
    logps = torch.tensor([-3.0, -120.5, 0.0])
    losses, chosen, rejected = dpo_loss(logps, logps, logps - 1, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), LOG2))
    assert torch.allclose(chosen, torch.full((3,), 0.1)) and torch.allclose(rejected, chosen)  # beta * (pi - ref)
    losses, chosen, rejected = dpo_loss(logps, logps, logps, logps, beta=0.1)
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))
    metrics = dpo_metrics(losses, chosen, rejected)
    assert metrics == pytest.approx({"loss": LOG2, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
                                     "rewards/accuracies": 0.0, "rewards/margins": 0.0})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    torch.manual_seed(0)
    pc, pr = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    rc, rr = pc.detach() + 0.01 * torch.randn(8), pr.detach() + 0.01 * torch.randn(8)  # near the reference
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_sigmoid_loss_and_rewards_match_the_published_formula():
    torch.manual_seed(1)
    pc, pr, rc, rr = (50 * torch.randn(64, dtype=torch.float64) for _ in range(4))
    for beta in (0.01, 0.1, 0.5):
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
        assert torch.allclose(losses, published_dpo(pc, pr, rc, rr, beta))
        assert torch.allclose(chosen, beta * (pc - rc)) and torch.allclose(rejected, beta * (pr - rr))
    metrics = dpo_metrics(losses, chosen, rejected)
    assert metrics["rewards/accuracies"] == pytest.approx(((pc - rc) > (pr - rr)).double().mean().item())
    assert metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item())


def test_ipo_and_hinge_formulas():
    torch.manual_seed(2)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) for _ in range(4))
    z, beta = (pc - pr) - (rc - rr), 0.2
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta, "ipo")[0], (z - 1 / (2 * beta)) ** 2)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta, "hinge")[0], torch.clamp(1 - beta * z, min=0))
    with pytest.raises(ValueError, match="loss_type='kto'"):
        dpo_loss(pc, pr, rc, rr, beta, "kto")


def test_sequence_logps_is_a_shifted_gather_that_skips_ignored_labels():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 6, -100], [-100, 1, -100, 2, 0]])
    logp = torch.log_softmax(logits, dim=-1)
    manual = torch.stack([logp[0, 1, 3] + logp[0, 2, 6], logp[1, 0, 1] + logp[1, 2, 2] + logp[1, 3, 0]])
    assert torch.allclose(sequence_logps(logits, labels), manual)

    changed = logits.clone()
    changed[0, [0, 3, 4]] = 100 * torch.randn(3, 7)  # positions that score ignored labels (or nothing)
    changed[1, [1, 4]] = 100 * torch.randn(2, 7)
    assert torch.allclose(sequence_logps(changed, labels), manual)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False  # drop the last scored token of row 1
    expected = manual.clone()
    expected[1] -= logp[1, 3, 0]
    assert torch.allclose(sequence_logps(logits, labels, mask), expected)


# ---- log-probs of a real model ----


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_model) -> Path:
    """A tiny random-init Llava checkpoint with action statistics, as scripts/train_sft.py would write."""
    tokenizer = build_tokenizer([PROMPT_TEMPLATE.format(instruction=t) for t in INSTRUCTIONS] * 5, vocab_size=300)
    torch.manual_seed(0)
    vla = build_vla(tiny_model(arch="fast_vlm"), tokenizer)
    q01 = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0])
    tok = ActionTokenizer(q01, -q01 + np.eye(7)[6], action_token_offset(tokenizer))
    path = tmp_path_factory.mktemp("policy") / "final"
    save_checkpoint(vla, {"synthetic": tok}, path)
    return path


def test_action_logps_equal_what_the_policy_sampled(policy_dir):
    policy = VLAPolicy.from_pretrained(policy_dir, temperature=1.0, seed=5)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    _, info = policy.act_batch([{"image": i, "instruction": t} for i, t in zip(images, INSTRUCTIONS)])
    batch = build_inputs(policy.vla, images, INSTRUCTIONS, info["token_ids"])
    with torch.no_grad():
        logps = action_logps(policy.vla.model, batch, policy.ids)
    assert np.allclose(logps.numpy(), info["log_probs"], atol=1e-4)
    for row in range(2):  # padding changes nothing: each row alone gives the same value
        one = slice(row, row + 1)
        alone = build_inputs(policy.vla, images[one], INSTRUCTIONS[one], info["token_ids"][one])
        with torch.no_grad():
            alone_logp = action_logps(policy.vla.model, alone, policy.ids).item()
        assert alone_logp == pytest.approx(logps[row].item(), abs=1e-5)


# ---- preference sets and runs ----


def write_prefs(root: Path, policy_dir: Path, lengths=((3, 5), (4, 2), (3, 3), (2, 4)), seed: int = 0,
                shared: bool = False) -> Path:
    """One start per entry of ``lengths``: two rollouts of those lengths, the first chosen; every chosen rollout
    succeeded except the last start's. ``shared``: the two rollouts of a start see the same frames and emit the same
    tokens, one bin (bin 100) everywhere, but for the chosen one's last token (bin 200): near-identical pairs."""
    tok = VLAPolicy.from_pretrained(policy_dir).action_tokenizer
    writer = DatasetWriter(root, fps=10, state_names=NAMES, action_names=NAMES, config={"synthetic": seed})
    rng = np.random.default_rng(seed)
    rollouts, pairs = [], []
    for s, episode_lengths in enumerate(lengths):
        images = rng.integers(0, 256, (max(episode_lengths), 32, 32, 3), dtype=np.uint8)
        for k, T in enumerate(episode_lengths):
            success = k == 0 and s + 1 < len(lengths)
            ids = rng.integers(tok.token_offset, tok.token_offset + tok.n_bins, (T, 7))
            if shared:
                ids[:] = tok.token_offset + 100
                ids[-1, -1] += 100 * (k == 0)
            else:
                images = rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8)
            writer.write_episode(2 * s + k, Episode(
                task="synthetic", instruction=INSTRUCTIONS[s % 2], seed=s, success=success, images=images[:T],
                states=np.zeros((T, 7), np.float32), actions=tok.decode(ids).astype(np.float32)))
            rollouts.append({"episode_index": 2 * s + k, "token_ids": ids.tolist(), "success": success})
        pairs.append({"start_index": s, "chosen": 2 * s, "rejected": 2 * s + 1})
    writer.finalize()
    pq.write_table(pa.Table.from_pylist(rollouts), root / ROLLOUTS_FILE)
    pq.write_table(pa.Table.from_pylist(pairs), root / PAIRS_FILE)
    return root


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory, policy_dir) -> Path:
    return write_prefs(tmp_path_factory.mktemp("prefs") / "prefs", policy_dir)


def make_cfg(policy_dir: Path, prefs_dir: Path, out: Path, **kw) -> DPOConfig:
    """A DPOConfig; keyword arguments that name loop keys (steps, batch_size, ...) go into its ``train``."""
    loop = {"steps": 4, "batch_size": 2, "warmup_steps": 1, "lr": 3e-3, "log_every": 1, "save_every": 2,
            "eval_every": 2, "val_fraction": 0.25}
    loop.update({k: kw.pop(k) for k in list(kw) if k in {f.name for f in fields(LoopConfig)}})
    return DPOConfig(policy=str(policy_dir), preferences=str(prefs_dir), output_dir=str(out),
                     train=replace(DPOConfig().train, **loop), **kw)


def read_metrics(out: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in rows if r["split"] == split]


@pytest.mark.parametrize("level, examples", [("trajectory", 4), ("step", 3 + 2 + 3 + 2)])
def test_pair_batch_matches_the_stored_reference_at_the_start(policy_dir, prefs_dir, level, examples):
    prefs, policy = PreferenceSet(prefs_dir), VLAPolicy.from_pretrained(policy_dir)
    vla, ids = policy.vla, policy.ids
    ref = reference_logps(vla, prefs, ids, torch.device("cpu"), batch_frames=3)
    assert {ep: len(v) for ep, v in ref.items()} == {0: 3, 1: 5, 2: 4, 3: 2, 4: 3, 5: 3, 6: 2, 7: 4}
    batch = pair_batch(prefs, prefs.pairs, level, vla, ref)
    assert batch["n"] == examples and batch["ref"].shape == (2 * examples,)
    with torch.no_grad():
        logps = example_logps(vla.model, batch, ids, torch.device("cpu"))
    assert torch.allclose(logps, batch["ref"], atol=1e-4)  # policy == reference: every DPO logit is 0
    if level == "trajectory":
        assert batch["ref"][0].item() == pytest.approx(ref[0].sum())
        assert batch["ref"][4].item() == pytest.approx(ref[1].sum())
    else:  # pair 0 aligns steps 0..2 of episode 0 with steps 0..2 of episode 1
        assert batch["ref"][:3].numpy() == pytest.approx(ref[0])
        assert batch["ref"][examples : examples + 3].numpy() == pytest.approx(ref[1][:3])


@pytest.mark.parametrize("level, alpha", [("trajectory", 0.0), ("step", 0.5)])
def test_run_starts_at_log_2_learns_and_writes_a_loadable_policy(policy_dir, prefs_dir, tmp_path, level, alpha):
    out = tmp_path / "run"
    summary = train_dpo(make_cfg(policy_dir, prefs_dir, out, steps=6, level=level, alpha=alpha, val_fraction=0.0,
                                 batch_size=4, warmup_steps=0))
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-5)  # step 1 is scored before any update: policy == reference
    assert abs(rows[0]["rewards/margins"]) < 1e-5
    assert rows[-1]["rewards/margins"] > 0.05 and rows[-1]["rewards/accuracies"] > 0.5 and rows[-1]["loss"] < LOG2
    assert ("nll_loss" in rows[0]) == (alpha > 0)
    assert summary["steps"] == 6 and summary["level"] == level and summary["train"]["loss"] == rows[-1]["loss"]
    policy = VLAPolicy.from_pretrained(out / "final")
    assert weights_digest(policy.vla.model) == summary["weights_digest"] != weights_digest(load_model(policy_dir).model)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_resume_reproduces_the_uninterrupted_run(policy_dir, prefs_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    summary = train_dpo(make_cfg(policy_dir, prefs_dir, straight, steps=4, grad_accum=2, batch_size=1))
    assert read_metrics(straight, "val")  # the held-out start was evaluated
    shutil.copytree(straight, killed, ignore=shutil.ignore_patterns("step-4", "final", "summary.json"))
    (killed / "checkpoints/.tmp-step-3").mkdir()  # a checkpoint write the crash interrupted
    resumed = train_dpo(replace(make_cfg(policy_dir, prefs_dir, killed, steps=4, grad_accum=2, batch_size=1),
                                resume=True))
    assert resumed["resumed_from_step"] == 2
    for split in ("train", "val"):
        assert read_metrics(killed, split) == read_metrics(straight, split)  # equal float for float
    assert resumed["weights_digest"] == summary["weights_digest"]
    assert not (killed / "checkpoints/.tmp-step-3").exists()
    again = train_dpo(replace(make_cfg(policy_dir, prefs_dir, killed, steps=4, grad_accum=2, batch_size=1),
                              resume=True))
    assert again == json.loads((killed / "summary.json").read_text())  # finished: nothing to do


def test_bad_inputs_fail_with_a_message_before_anything_is_written(policy_dir, prefs_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"preferences=.*nope does not exist; collect it with scripts/collect_pref"):
        train_dpo(make_cfg(policy_dir, tmp_path / "nope", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"policy=.*empty holds no config.json"):
        train_dpo(make_cfg(tmp_path / "empty", prefs_dir, out))
    with pytest.raises(UsageError, match="holds no pairs.parquet"):
        train_dpo(make_cfg(policy_dir, tmp_path / "empty", out))
    with pytest.raises(UsageError, match="loss_type='kto' must be one of"):
        make_cfg(policy_dir, prefs_dir, out, loss_type="kto")
    with pytest.raises(UsageError, match="2 training examples cannot fill one batch of train.batch_size=3"):
        train_dpo(make_cfg(policy_dir, prefs_dir, out, batch_size=3, val_fraction=0.5))
    assert not out.exists()
    train_dpo(make_cfg(policy_dir, prefs_dir, out, steps=1, warmup_steps=0, save_every=1))
    with pytest.raises(UsageError, match="already holds a run"):
        train_dpo(make_cfg(policy_dir, prefs_dir, out, steps=1, warmup_steps=0))
    with pytest.raises(UsageError, match="resume=true but .* was trained with beta=0.1, not 0.2"):
        train_dpo(make_cfg(policy_dir, prefs_dir, out, steps=2, warmup_steps=0, beta=0.2, resume=True))


def test_pairs_chosen_success_trains_on_the_pairs_whose_chosen_succeeded(policy_dir, prefs_dir, tmp_path):
    assert [p["start_index"] for p in PreferenceSet(prefs_dir).pairs] == [0, 1, 2, 3]
    assert [p["start_index"] for p in PreferenceSet(prefs_dir, "chosen_success").pairs] == [0, 1, 2]
    summary = train_dpo(make_cfg(policy_dir, prefs_dir, tmp_path / "run", pairs="chosen_success", steps=1,
                                 warmup_steps=0, val_fraction=0.0))
    assert summary["train_pairs"] == 3
    with pytest.raises(UsageError, match="pairs='best' must be one of"):
        make_cfg(policy_dir, prefs_dir, tmp_path / "other", pairs="best")
    failed = write_prefs(tmp_path / "failed", policy_dir, lengths=((3, 2),))  # its one chosen rollout failed
    with pytest.raises(UsageError, match="holds no pair whose chosen rollout succeeded; pass pairs=all"):
        train_dpo(make_cfg(policy_dir, failed, tmp_path / "other", pairs="chosen_success"))
    assert not (tmp_path / "other").exists()


def test_dpo_on_a_lora_policy_trains_its_adapters_only(policy_dir, prefs_dir, tmp_path):
    vla, stats = load_checkpoint(policy_dir)
    torch.manual_seed(0)
    save_checkpoint(vla._replace(model=add_lora(vla.model, LoraConfig(r=4), policy_dir)), stats, tmp_path / "lora")
    out = tmp_path / "run"
    train_dpo(make_cfg(tmp_path / "lora", prefs_dir, out, steps=6, val_fraction=0.0, batch_size=4, warmup_steps=0))
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-5)  # B starts at zero: the adapted policy is its reference
    assert rows[-1]["rewards/margins"] > 0.05 and rows[-1]["loss"] < LOG2
    assert (out / "final" / ADAPTER_CONFIG).is_file() and not (out / "final/model.safetensors").exists()
    trained = load_model(out / "final").model.get_base_model().state_dict()
    source = load_model(policy_dir).model.state_dict()
    for name, value in trained.items():
        if "lora_" not in name:
            torch.testing.assert_close(value, source[name.replace(".base_layer", "")], rtol=0, atol=0)


def test_dpo_positive_penalises_only_a_chosen_side_below_its_reference():
    pc, pr = torch.tensor([-5.0, -2.0]), torch.tensor([-9.0, -8.0])
    rc, rr = torch.tensor([-3.0, -3.0]), torch.tensor([-6.0, -6.0])  # pair 0: chosen 2 nats below ref; pair 1: above
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    dpop, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=50.0)
    assert dpop[0].item() == pytest.approx(-F.logsigmoid(torch.tensor(0.1 * ((-5 + 9) - (-3 + 6) - 50 * 2))).item())
    assert dpop[1].item() == pytest.approx(plain[1].item())  # chosen above its reference: plain DPO
    torch.testing.assert_close(chosen_rewards, 0.1 * (pc - rc))
    pc = pc.clone().requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=50.0)[0].sum().backward()
    assert pc.grad[0] < 50 * plain_grad(0) and pc.grad[1] == pytest.approx(plain_grad(1))


def plain_grad(i: int) -> float:
    pc = torch.tensor([-5.0, -2.0], requires_grad=True)
    dpo_loss(pc, torch.tensor([-9.0, -8.0]), torch.tensor([-3.0, -3.0]), torch.tensor([-6.0, -6.0]), 0.1)[0].sum() \
        .backward()
    return pc.grad[i].item()


def test_chosen_shift_is_the_mean_per_token_change():
    assert chosen_shift(torch.tensor([-10.0, -4.0]), torch.tensor([-6.0, -4.0]), torch.tensor([8, 3])).item() == \
        pytest.approx((-4 / 8 + 0) / 2)


@pytest.mark.slow
def test_on_near_identical_pairs_plain_dpo_collapses_the_guard_warns_and_dpo_positive_holds(policy_dir, tmp_path,
                                                                                            capsys):
    """Pairs that differ in one token of 42: plain DPO lowers that token for the rejected side and, with it, the same
    token on every shared step, so the chosen side loses likelihood while the margin grows (docs/dpo.md)."""
    prefs = write_prefs(tmp_path / "shared", policy_dir, lengths=((6, 6),) * 4, shared=True)
    runs = {lam: train_dpo(make_cfg(policy_dir, prefs, tmp_path / f"lam{lam}", steps=16, val_fraction=0.0,
                                    batch_size=4, warmup_steps=0, dpop_lambda=lam, collapse_nats=0.5))
            for lam in (0.0, 50.0)}
    log = capsys.readouterr().out
    plain, positive = runs[0.0], runs[50.0]
    assert plain["train"]["rewards/margins"] > 0.1  # the margin grows ...
    assert plain["collapsed"] and plain["train"]["logps/chosen_shift"] < -0.5  # ... as the chosen side collapses
    assert not positive["collapsed"] and positive["train"]["logps/chosen_shift"] > 0.0  # DPO-Positive holds it
    assert log.count("warning: the chosen steps have lost") == 1  # once, for the plain run
