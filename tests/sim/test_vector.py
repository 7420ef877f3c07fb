"""Every registered env id works as a Gymnasium vector env (``gym.make_vec``), in one process and in subprocesses."""

import gymnasium as gym
import numpy as np
import pytest

import tasks

ENV_IDS = [tasks.env_id(name) for name in tasks.TASKS] + ["Tabletop-v0"]


def reset_and_step(env: gym.vector.VectorEnv, seed: int) -> tuple[dict, dict]:
    obs, info = env.reset(seed=seed)
    assert env.observation_space.contains(obs)
    action = np.zeros(env.action_space.shape, dtype=np.float32)  # (N, 7): stand still, gripper closed
    action[:, 6] = 1.0  # gripper open
    obs2, reward, terminated, truncated, info2 = env.step(action)
    assert env.observation_space.contains(obs2)
    assert reward.shape == terminated.shape == truncated.shape == (env.num_envs,)
    assert list(info2["instruction"]) == list(obs2["instruction"]) == list(info["instruction"])
    return obs, info


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sync_vector_env_matches_single_envs(env_id):
    env = gym.make_vec(env_id, num_envs=2, vectorization_mode="sync", image_size=32)
    obs, _ = reset_and_step(env, seed=3)
    env.close()
    for i in range(2):  # sub-env i is seeded with seed + i
        single = gym.make(env_id, image_size=32)
        assert env.single_observation_space == single.observation_space
        single_obs, _ = single.reset(seed=3 + i)
        assert obs["instruction"][i] == single_obs["instruction"]
        np.testing.assert_array_equal(obs["image"][i], single_obs["image"])
        single.close()


def test_async_vector_env_equals_sync():
    # The default shared memory, where Gymnasium would return the first read of the instruction buffer forever
    sync = gym.make_vec("TabletopPick-v0", num_envs=2, vectorization_mode="sync", image_size=32)
    run = gym.make_vec("TabletopPick-v0", num_envs=2, vectorization_mode="async", image_size=32)
    try:
        for seed in (0, 7):
            expected, _ = reset_and_step(sync, seed)
            got, _ = reset_and_step(run, seed)
            assert got["instruction"] == expected["instruction"]
            np.testing.assert_array_equal(got["image"], expected["image"])
            np.testing.assert_array_equal(got["state"], expected["state"])
    finally:
        sync.close()
        run.close()
