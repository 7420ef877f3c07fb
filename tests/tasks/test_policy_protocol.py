"""The policy protocol: the scripted experts, RandomPolicy and VLAPolicy satisfy it; RandomPolicy's draws."""

import numpy as np
import pytest
import torch

import tasks
from tasks.policy import BatchPolicy, Policy, RandomPolicy
from vla.action_tokenizer import ActionTokenizer
from vla.inputs import PROMPT_TEMPLATE
from vla.model import build_vla
from vla.policy import VLAPolicy
from vla.text_tokenizer import action_token_offset, build_tokenizer

D = 7


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_every_expert_is_a_policy(task):
    env = tasks.make_env(task, image_size=64)
    expert = env.task.expert(env)
    assert isinstance(expert, Policy) and not isinstance(expert, BatchPolicy)  # experts act on their own env
    env.close()


def test_random_and_vla_policies_are_batch_policies(tiny_model):
    low = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0])
    assert isinstance(RandomPolicy(low, -low + np.eye(7)[6]), BatchPolicy)
    tokenizer = build_tokenizer([PROMPT_TEMPLATE.format(instruction="touch the red cube")], vocab_size=300)
    tok = ActionTokenizer(low, -low + np.eye(7)[6], action_token_offset(tokenizer))
    torch.manual_seed(0)
    assert isinstance(VLAPolicy(build_vla(tiny_model(), tokenizer), tok), BatchPolicy)


def test_random_policy_is_bounded_and_seeded():
    low = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0])
    high = -low
    high[6] = 1.0
    policy = RandomPolicy(low, high, seed=0)
    actions, _ = policy.act_batch([{}] * 500)
    assert actions.shape == (500, D) and actions.dtype == np.float32
    assert ((actions >= low) & (actions <= high)).all()
    assert set(np.unique(actions[:, 6])) == {0.0, 1.0}
    assert (actions[:, :6].std(axis=0) > 0.8 * (high[:6] - low[:6]) / np.sqrt(12)).all()  # uniform: std = w / sqrt 12
    action, info = policy.act({})
    assert action.shape == (D,) and info == {}
    policy.reset()
    np.testing.assert_array_equal(policy.act_batch([{}] * 500)[0], actions)
    policy.reset(seed=1)
    assert not np.array_equal(policy.act_batch([{}] * 500)[0], actions)
    free, _ = RandomPolicy(low, high, gripper_dim=None).act_batch([{}] * 500)
    assert len(np.unique(free[:, 6])) == 500  # a continuous gripper when asked
    with pytest.raises(ValueError, match="low <= high"):
        RandomPolicy(high, low)
