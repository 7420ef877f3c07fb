import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import tasks
from sim.env import START_SPREAD, TabletopEnv
from sim.robot import HOME_POSITION
from sim.safety import COUNT_EVENTS
from tasks.rollout import rollout

ENV_IDS = [tasks.env_id(name) for name in tasks.TASKS] + ["Tabletop-v0"]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_every_registered_env_passes_the_gymnasium_checker(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
    assert env.spec.max_episode_steps == (env.unwrapped.task.max_steps if env_id != "Tabletop-v0" else 100)
    env.close()


def test_observation_contents_and_render():
    env = gym.make("TabletopPick-v0", render_mode="rgb_array", image_size=64, render_size=80)
    obs, info = env.reset(seed=3)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 10  # a real picture, not a blank frame
    assert obs["state"].shape == (7,) and obs["state"].dtype == np.float32
    assert obs["instruction"] == info["instruction"] and "the" in obs["instruction"]
    assert env.render().shape == (80, 80, 3)
    assert abs(obs["state"][6] - 0.08) < 0.005  # starts with the gripper open


def test_wrist_camera_adds_a_second_image():
    env = TabletopEnv(tasks.get_task("reach"), wrist_camera=True, image_size=48)
    obs, _ = env.reset(seed=0)
    assert obs["wrist_image"].shape == (48, 48, 3)
    assert not np.array_equal(obs["wrist_image"], obs["image"])


def _digest(env, seed, options=None):
    task = env.unwrapped.task
    r = rollout(env, task.expert(env.unwrapped, seed=seed, noise=0.003), seed, options)
    return r.images.tobytes() + r.states.tobytes() + r.actions.tobytes(), r


def test_reset_is_exact_whatever_ran_before():
    env = tasks.make_env("stack")
    first, _ = _digest(env, 7)
    _digest(env, 8, {"distractors": 4, "fragile": True})
    env.reset(seed=1)
    for _ in range(10):  # drive into the table: contacts from this must not leak into the next episode
        env.step(np.asarray([0.0, 0.0, -0.05, 0.0, 0.0, 0.0, 0.0], np.float32))
    again, _ = _digest(env, 7)
    assert first == again


_PROCESS_SCRIPT = """
import hashlib, sys, tasks
from tasks.rollout import rollout
env = tasks.make_env("pick")
expert = env.task.expert(env, seed=11, noise=0.003)
r = rollout(env, expert, 11)
print(hashlib.sha256(r.images.tobytes() + r.states.tobytes() + r.actions.tobytes()).hexdigest(), r.success)
"""


def test_two_fresh_processes_with_the_same_seed_agree_bit_for_bit():
    outs = [subprocess.run([sys.executable, "-c", _PROCESS_SCRIPT], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].strip().endswith("True")


def test_different_seeds_give_different_scenes():
    env = tasks.make_env("pick")
    a, _ = env.reset(seed=1)
    b, _ = env.reset(seed=2)
    assert not np.array_equal(a["image"], b["image"])


def test_the_tip_starts_at_a_seeded_point_near_home_or_where_options_say():
    env = tasks.make_env("reach", image_size=32)
    starts = []
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        starts.append(obs["state"][:3])
        assert np.allclose(obs["state"][3:6], 0.0, atol=0.02) and obs["state"][6] > 0.07  # pointing down, open
        again, _ = env.reset(seed=seed)
        assert np.array_equal(again["state"], obs["state"])
    offsets = np.abs(np.asarray(starts) - HOME_POSITION)
    assert np.all(offsets <= np.asarray(START_SPREAD) + 0.005)  # within the spread (IK and settling: < 5 mm)
    assert np.all(np.ptp(starts, axis=0) > np.asarray(START_SPREAD))  # and spread over it
    obs, _ = env.reset(seed=0, options={"start": (0.5, 0.1, 0.2)})
    assert np.allclose(obs["state"][:3], (0.5, 0.1, 0.2), atol=0.005)


def test_bad_actions_are_refused_with_a_clear_message():
    env = tasks.make_env("reach")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="not finite"):
        env.step(np.full(7, np.nan, np.float32))


def test_out_of_range_actions_are_clipped_to_the_action_space():
    env = tasks.make_env("reach")
    obs, _ = env.reset(seed=0)
    obs2, *_ = env.step(np.asarray([1.0, 0, 0, 0, 0, 0, 1], np.float32))  # asks for 1 m in one step
    assert obs2["state"][0] - obs["state"][0] < 0.06


def test_delta_control_moves_the_tip_by_the_commanded_amount():
    env = tasks.make_env("reach")
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs2, *_ = env.step(np.asarray([0.02, -0.01, 0.0, 0, 0, 0, 1], np.float32))
        assert np.allclose(obs2["state"][:3] - obs["state"][:3], (0.02, -0.01, 0.0), atol=0.004)
        obs = obs2


def test_a_physics_blow_up_ends_the_episode_as_an_error():
    env = tasks.make_env("reach")
    env.reset(seed=0)
    body = env.world.bodies[env.scene.target]
    env.world.client.resetBaseVelocity(body, (0.0, 0.0, 30.0), (0.0, 0.0, 0.0))
    _, _, terminated, _, info = env.step(np.asarray([0, 0, 0, 0, 0, 0, 1], np.float32))
    assert terminated and "flew away" in info["error"] and not info["is_success"]


def test_safety_monitor_sees_a_table_strike_and_counts_it_per_step():
    env = tasks.make_env("reach")
    env.reset(seed=0)
    strikes = 0
    for _ in range(12):
        _, _, _, _, info = env.step(np.asarray([0.0, 0.0, -0.05, 0, 0, 0, 0], np.float32))
        strikes += info["safety"]["table_strike"]
    assert strikes > 0 and info["safety_total"]["table_strike"] == strikes
    assert info["safety_total"]["table_peak_force"] > env.monitor.limits.table_force_limit


def test_safety_monitor_sees_fragile_contact_and_keepout_intrusion():
    env = tasks.make_env("pick")
    env.reset(seed=4, options={"fragile": True, "keepout": True})
    vase = next(o for o in env.scene.objects if o.fragile)
    totals = None
    for target in (np.append(env.scene.keepout, 0.05), np.append(vase.xy, 0.06) - (0.06, 0, 0), np.append(vase.xy, 0.06)):
        for _ in range(25):
            delta = np.clip(target - env.tip_position(), -0.05, 0.05)
            _, _, terminated, _, info = env.step(np.concatenate([delta, [0, 0, 0, 0]]).astype(np.float32))
            totals = info["safety_total"]
            if terminated:
                break
    assert totals["keepout_intrusion"] > 0
    assert totals["fragile_contact"] > 0 and totals["fragile_peak_force"] > 0


def test_safety_totals_start_at_zero_each_episode():
    env = tasks.make_env("reach")
    env.reset(seed=0)
    for _ in range(8):
        env.step(np.asarray([0.0, 0.0, -0.05, 0, 0, 0, 0], np.float32))
    env.reset(seed=0)
    assert all(env.monitor.totals[k] == 0 for k in COUNT_EVENTS)
