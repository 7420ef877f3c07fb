"""Does a policy find the named object, or does it continue the motion it sees? Closed-loop heading probe.

    python bench/heading_probe.py runs/sft/final [--task reach] [--scenes 40] [--start home|random]

On held-out scenes, the scripted expert drives the first few steps; at each of them the policy is asked for its
action from the same observation, and the probe reports the cosine between the policy's and the expert's (dx, dy).
At step 0 the gripper has not moved, so only the image of the scene and the instruction can give the heading. A
policy whose heading is right from step 1 on but not at step 0 reads the direction from the gripper's displacement
(a shortcut that fixed starts allow), not from where the named object is.
``--start home`` puts every episode's tip at the old fixed start (45, 0, 22) cm; ``random`` keeps the env's draw.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from sim.robot import HOME_POSITION
from tasks import TEST_SEEDS, make_env
from vla.policy import VLAPolicy

SEED0 = TEST_SEEDS.start + 950_000  # held out, and apart from every evaluation suite's block


def heading_probe(policy, task: str, scenes: int, steps: int = 3, start: str = "random", image_size: int = 96) -> dict:
    env = make_env(task, image_size=image_size)
    cosines = np.zeros((scenes, steps))
    for i in range(scenes):
        options = {"start": tuple(HOME_POSITION)} if start == "home" else {}
        obs, _ = env.reset(seed=SEED0 + i, options=options)
        expert = env.task.expert(env, seed=SEED0 + i)
        policy.reset(seed=SEED0 + i)
        for t in range(steps):
            want, _ = expert.act(obs)
            got, _ = policy.act(obs)
            a, b = want[:2], got[:2]
            cosines[i, t] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
            obs, *_ = env.step(want)
    env.close()
    return {
        "task": task, "scenes": scenes, "start": start,
        "mean_cosine_per_step": cosines.mean(axis=0).round(3).tolist(),
        "fraction_within_25deg_per_step": (cosines > np.cos(np.radians(25))).mean(axis=0).round(3).tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policy")
    p.add_argument("--task", default="reach")
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--start", choices=("home", "random"), default="random")
    args = p.parse_args()
    torch.set_num_threads(2)
    policy = VLAPolicy.from_pretrained(args.policy)
    print(json.dumps({"policy": args.policy, **heading_probe(policy, args.task, args.scenes, start=args.start)}))


if __name__ == "__main__":
    main()
