"""Tests for vla/chunking.py through the policy (vla/policy.py), and DPO's scoring of a chunked policy's steps
(vla/dpo.py, store/preferences.py): tiny parallel models on random frames, decoded greedily or sampled."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from store.lerobot import Episode
from store.preferences import PAIRS_FILE, ROLLOUTS_FILE, PreferenceSet
from store.writer import DatasetWriter
from test_parallel_decoding import D, INSTRUCTIONS, observations
from test_sft import ACTION_NAMES
from vla.checkpoint import load_checkpoint, save_checkpoint
from vla.dpo import DPOConfig, action_logps, reference_logps, step_inputs, train_dpo
from vla.grounding import PLAN_TOKENS
from vla.parallel import is_parallel
from vla.policy import VLAPolicy


class Counting:
    """Wraps a policy's ``chunk_tokens`` and records every chunk it predicts: (rows' observations, outputs)."""

    def __init__(self, policy: VLAPolicy):
        self.calls, self.inner = [], policy.chunk_tokens
        policy.chunk_tokens = self

    def __call__(self, images, instructions, states=None):
        out = self.inner(images, instructions, states)
        self.calls.append((len(images), out))
        return out


def test_open_loop_executes_each_chunk_then_predicts_again(parallel_vla, action_tok):
    vla = parallel_vla("fast_vlm", chunk=3, plan=True)
    policy = VLAPolicy(vla, action_tok, binarize_gripper=False)  # the executed tokens' bin centres, gripper too
    calls = Counting(policy).calls
    obs, P = observations(7), PLAN_TOKENS
    steps = [policy.act(o) for o in obs]
    assert len(calls) == 3  # at steps 0, 3 and 6
    assert [info["chunk_offset"] for _, info in steps] == [0, 1, 2, 0, 1, 2, 0]
    for t, (action, info) in enumerate(steps):
        tokens, log_probs, _ = calls[t // 3][1]
        k = t % 3
        executed = tokens[0, P + k * D : P + (k + 1) * D]
        np.testing.assert_array_equal(info["token_ids"], np.concatenate([tokens[0, :P], executed]))
        np.testing.assert_array_equal(action, action_tok.decode(executed))
        expected = log_probs[0, P + k * D : P + (k + 1) * D].sum() + (log_probs[0, :P].sum() if k == 0 else 0.0)
        assert info["log_probs"] == pytest.approx(expected, abs=1e-9)  # the plan counts once per chunk
        np.testing.assert_allclose(info["probs"], np.exp(log_probs[0, P + k * D : P + (k + 1) * D]), rtol=1e-6)
    policy.reset()
    assert policy.act(obs[5])[1]["chunk_offset"] == 0 and len(calls) == 4  # reset drops the chunk


def test_ensemble_blends_the_chunks_of_the_last_steps_with_act_weights(parallel_vla, action_tok):
    vla, K, decay = parallel_vla("llava", chunk=3), 3, 0.7
    policy = VLAPolicy(vla, action_tok, chunk_execution="ensemble", ensemble_decay=decay, binarize_gripper=False)
    calls = Counting(policy).calls
    obs = observations(5, seed=3)
    steps = [policy.act(o) for o in obs]
    assert len(calls) == 5 and all(info["chunk_offset"] == 0 for _, info in steps)
    chunks = [action_tok.decode(c[1][0][0].reshape(K, D)) for c in calls]  # (K, D) each
    for t, (action, info) in enumerate(steps):
        oldest = max(0, t - K + 1)
        candidates = [chunks[s][t - s] for s in range(oldest, t + 1)]  # oldest first
        weights = np.exp(-decay * np.arange(len(candidates)))
        blend = (weights[:, None] * np.asarray(candidates, dtype=np.float64)).sum(0) / weights.sum()
        ids = action_tok.encode(blend)
        np.testing.assert_array_equal(info["token_ids"], ids)
        np.testing.assert_array_equal(action, action_tok.decode(ids))
        first = calls[t][1][2][0]  # (D, 256): this step's own chunk scores what is executed
        expected = first[np.arange(D), ids - action_tok.token_offset]
        assert info["log_probs"] == pytest.approx(expected.sum(), abs=1e-9)
    assert any(not np.array_equal(steps[t][1]["token_ids"], calls[t][1][0][0, :D]) for t in range(1, 5))
    # with chunks of one action there is nothing to blend: the ensemble is the open loop
    one = parallel_vla("llava", chunk=1)
    runs = [[VLAPolicy(one, action_tok, chunk_execution=m).act(o)[1]["token_ids"] for o in obs]
            for m in ("open_loop", "ensemble")]
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("mode", ["open_loop", "ensemble"])
def test_rows_keep_their_chunks_and_keep_rows_follows_a_shrinking_batch(parallel_vla, action_tok, mode):
    vla = parallel_vla("fast_vlm", chunk=3)
    obs = observations(3)
    batched, single = VLAPolicy(vla, action_tok, chunk_execution=mode), VLAPolicy(vla, action_tok,
                                                                                          chunk_execution=mode)
    alone = [[], [], []]
    for row in range(3):
        single.reset()
        alone[row] = [single.act(obs[row])[1]["token_ids"] for _ in range(4)]
    for t in range(2):
        _, info = batched.act_batch(obs)
        np.testing.assert_array_equal(info["token_ids"], [alone[row][t] for row in range(3)])
    batched.keep_rows([0, 2])  # episode 1 ended
    for t in range(2, 4):
        _, info = batched.act_batch([obs[0], obs[2]])
        np.testing.assert_array_equal(info["token_ids"], [alone[0][t], alone[2][t]])
    _, info = batched.act_batch([obs[0]])  # another size without keep_rows: every row starts afresh
    np.testing.assert_array_equal(info["token_ids"][0], alone[0][0])



# ---- DPO ----


def write_chunked_prefs(root: Path, policy_dir: Path, mode: str, lengths=((5, 4), (3, 6))) -> tuple[Path, dict]:
    """A preference set of a sampled chunked policy's own rollouts over random frames: one start per entry of
    ``lengths``, two rollouts each, the first chosen; returns it and the log-probs (T,) the policy reported."""
    policy = VLAPolicy.from_pretrained(policy_dir, temperature=1.0, seed=3, chunk_execution=mode)
    writer = DatasetWriter(root, fps=10, state_names=ACTION_NAMES, action_names=ACTION_NAMES, config={"mode": mode})
    rollouts, pairs, reported = [], [], {}
    for s, episode_lengths in enumerate(lengths):
        for k, T in enumerate(episode_lengths):
            ep, obs = 2 * s + k, [{**o, "instruction": INSTRUCTIONS[s]} for o in observations(T, seed=10 * s + k)]
            policy.reset(seed=ep)
            steps = [policy.act(o) for o in obs]
            writer.write_episode(ep, Episode(
                task="synthetic", instruction=obs[0]["instruction"], seed=s, success=k == 0,
                images=np.stack([o["image"] for o in obs]), states=np.stack([o["state"] for o in obs]),
                actions=np.stack([a for a, _ in steps])))
            rollouts.append({"episode_index": ep, "success": k == 0,
                             "token_ids": np.stack([i["token_ids"] for _, i in steps]).tolist(),
                             "chunk_offsets": [int(i["chunk_offset"]) for _, i in steps]})
            reported[ep] = np.array([i["log_probs"] for _, i in steps])
        pairs.append({"start_index": s, "chosen": 2 * s, "rejected": 2 * s + 1})
    writer.finalize()
    pq.write_table(pa.Table.from_pylist(rollouts), root / ROLLOUTS_FILE)
    pq.write_table(pa.Table.from_pylist(pairs), root / PAIRS_FILE)
    return root, reported


@pytest.mark.parametrize("mode", ["open_loop", "ensemble"])
def test_dpo_scores_each_step_as_the_policy_reported_it_and_trains(tmp_path, parallel_vla, action_tok, mode):
    vla = parallel_vla("fast_vlm", chunk=3, plan=True)
    save_checkpoint(vla, {"synthetic": action_tok}, tmp_path / "policy")
    prefs_dir, reported = write_chunked_prefs(tmp_path / "prefs", tmp_path / "policy", mode)
    prefs = PreferenceSet(prefs_dir)
    if mode == "open_loop":
        assert prefs.steps(0)[4].tolist() == [0, 1, 2, 0, 1]
        np.testing.assert_array_equal(prefs.steps(0)[0][1], prefs.steps(0)[0][0])  # step 1 reads frame 0
    policy = VLAPolicy.from_pretrained(tmp_path / "policy")
    ref = reference_logps(policy.vla, prefs, policy.ids, torch.device("cpu"), batch_frames=4)
    for ep, logps in reported.items():
        np.testing.assert_allclose(ref[ep], logps, atol=1e-4)
    summary = train_dpo(DPOConfig(policy=str(tmp_path / "policy"), preferences=str(prefs_dir),
                                  output_dir=str(tmp_path / "dpo"),
                                  train=replace(DPOConfig().train, steps=2, batch_size=1, warmup_steps=0, lr=1e-3,
                                                log_every=1, save_every=2, eval_every=0, val_fraction=0.0)))
    first = json.loads((tmp_path / "dpo/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-4)  # the policy starts as its reference
    assert is_parallel(load_checkpoint(tmp_path / "dpo/final")[0].model) and summary["train"] is not None


def test_policy_log_probs_equal_dpo_scores_batch_by_batch(parallel_vla, action_tok):
    vla = parallel_vla("paligemma", chunk=2, plan=True)
    policy = VLAPolicy(vla, action_tok, temperature=1.0)
    frames = [observations(3, seed=t) for t in range(3)]
    for t, obs in enumerate(frames):
        _, info = policy.act_batch(obs)
        source = [frames[t - o][row] for row, o in enumerate(info["chunk_offset"])]
        batch = step_inputs(vla, np.stack([o["image"] for o in source]), [o["instruction"] for o in source],
                            info["token_ids"], None, info["chunk_offset"])
        with torch.no_grad():
            np.testing.assert_allclose(action_logps(vla.model, batch, policy.ids).numpy(), info["log_probs"],
                                       atol=1e-4)


