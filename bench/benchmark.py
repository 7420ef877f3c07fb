"""Speed benchmarks, each a ratio against a peer measured side by side in the same run (plus absolute figures).

    python scripts/benchmark.py                      # every section, JSON to bench/results.json
    python scripts/benchmark.py --only sim --seconds 5

Sections: sim (control steps/s with a 128 px image vs panda-gym PandaPickAndPlace-v3 rendering 128 px; 1 vs 2
worker processes), demos (generation frames/s, 1 vs 2 workers), policy (one action, autoregressive, parallel and
in chunks of 4 and 8, vs one prompt forward and HF generate), train (SFT step vs a naive transformers
forward/backward), eval (episodes/min of the expert and of the default VLA on the success suite, 2 workers), pipeline
(stage times of the pipeline on its embedded defaults: runs it into --pipeline-dir, or reads the times of a finished
run there).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from store.errors import UsageError, require_dir
from store.files import write_json
from store.intact import read_json

ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/ and bench/results.json


def _ours_steps(seconds: float, image_size: int = 128, seed: int = 0) -> float:
    """Control steps/s of TabletopPick with a `image_size` RGB observation, random actions, resets included."""
    import tasks

    env = tasks.make_env("pick", image_size=image_size)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
        _, _, terminated, _, _ = env.step(action)
        steps += 1
        if terminated or env.steps >= env.task.max_steps:
            env.reset(seed=seed + steps)
    return steps / (time.perf_counter() - start)


def _panda_gym_steps(seconds: float, image_size: int = 128) -> float | None:
    """Control steps/s of panda-gym's PandaPickAndPlace-v3 with a `image_size` render each step (None if absent)."""
    try:
        import gymnasium as gym
        import panda_gym  # noqa: F401
    except ImportError:
        return None
    env = gym.make("PandaPickAndPlace-v3", render_mode="rgb_array", render_width=image_size, render_height=image_size)
    env.reset(seed=0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        env.render()
        steps += 1
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def _worker(args) -> float:
    seconds, seed = args
    return _ours_steps(seconds, seed=seed) * seconds  # steps done


def bench_sim(seconds: float) -> dict:
    ours = _ours_steps(seconds)
    peer = _panda_gym_steps(seconds)
    with mp.get_context("spawn").Pool(2) as pool:  # warm the worker imports before timing
        pool.map(_worker, [(0.5, 0), (0.5, 1)])
        start = time.perf_counter()
        done = pool.map(_worker, [(seconds, 0), (seconds, 1)])
        two = sum(done) / (time.perf_counter() - start)
    one = _ours_steps(seconds)
    return {
        "ours_steps_per_s_128px": round(ours, 1),
        "panda_gym_steps_per_s_128px": None if peer is None else round(peer, 1),
        "ratio_vs_panda_gym": None if peer is None else round(ours / peer, 2),
        "one_worker_steps_per_s": round(one, 1),
        "two_workers_steps_per_s": round(two, 1),
        "two_worker_speedup": round(two / one, 2),
    }


def bench_demos(seconds: float) -> dict:
    """Demo generation frames/s with 1 and 2 worker processes (pick, 40 episodes, 96 px), spawn start-up included."""
    from tasks.demos import DemoConfig, generate

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            summary = generate(DemoConfig(task="pick", num_episodes=40, workers=workers, output_dir=f"{tmp}/w{workers}"))
            out[f"frames_per_s_{workers}_worker"] = summary["frames_per_second"]
    out["two_worker_speedup"] = round(out["frames_per_s_2_worker"] / out["frames_per_s_1_worker"], 2)
    return out


def bench_policy(seconds: float) -> dict:
    from bench.policy_latency import measure

    return measure()


def bench_train(seconds: float) -> dict:
    from bench.train_throughput import naive_step_throughput

    return naive_step_throughput()


def bench_eval(seconds: float) -> dict:
    """Episodes/min and control steps/s of the expert and of the default VLA (random init: every episode runs its
    full step budget) on the success suite, reach and pick, 8 episodes each, 2 workers, lockstep batches of 8."""
    from harness.policies import PolicySpec
    from tasks import get_task
    from tasks.evaluation import evaluate_manifest
    from tasks.suites import build_manifest
    from vla.action_tokenizer import ActionTokenizer
    from vla.checkpoint import save_checkpoint
    from vla.inputs import PROMPT_TEMPLATE
    from vla.model import VLAModelConfig, build_vla
    from vla.text_tokenizer import action_token_offset, build_tokenizer

    manifest = build_manifest("success", 8, ["reach", "pick"])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = [PROMPT_TEMPLATE.format(instruction=t) for name in ("reach", "pick") for t in get_task(name).templates]
        tokenizer = build_tokenizer(prompts * 4, vocab_size=1024)
        q01 = np.array([-0.03, -0.03, -0.035, -0.005, -0.005, -0.3, 0.0])
        save_checkpoint(build_vla(VLAModelConfig(), tokenizer),
                        {"bench": ActionTokenizer(q01, -q01 + np.eye(7)[6], action_token_offset(tokenizer))},
                        Path(tmp) / "vla")
        for name, policy in (("expert", "expert"), ("vla", f"{tmp}/vla")):
            start = time.perf_counter()
            rows = evaluate_manifest(manifest, PolicySpec(policy), f"{tmp}/{name}", workers=2, batch=8)
            elapsed = time.perf_counter() - start
            out[f"{name}_episodes_per_min"] = round(60 * len(rows) / elapsed, 1)
            out[f"{name}_steps_per_s"] = round(sum(r["steps"] for r in rows) / elapsed, 1)
    return out


def bench_pipeline(seconds: float, pipeline_dir: str = "runs/pipeline") -> dict:
    """Stage times of the pipeline on its embedded defaults (cached stages report the time they took)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.cli import register_configs
    from harness.pipeline import Pipeline

    register_configs("pipeline_schema")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("pipeline", overrides=[f"output_dir={pipeline_dir}"]))
    results = Pipeline(cfg).run()
    return {"stage_seconds": results["stage_seconds"], "output_dir": pipeline_dir}


SECTIONS = {"sim": bench_sim, "demos": bench_demos, "policy": bench_policy, "train": bench_train, "eval": bench_eval,
            "pipeline": bench_pipeline}


def run_sections(names: list[str], seconds: float, out: Path, pipeline_dir: str) -> None:
    """Run the sections ``names`` and write their figures into ``out`` (sections not rerun keep their last ones)."""
    if not seconds > 0:
        raise UsageError(f"--seconds={seconds} must be > 0 (the timing window of each measurement)")
    if out.is_dir():
        raise UsageError(f"--out={out} is a directory; pass the JSON file to write, e.g. {out / 'results.json'}")
    require_dir(out.parent, "--out")
    results = read_json(out, "delete it or pass another --out") if out.is_file() else {}
    if not isinstance(results, dict):
        raise UsageError(f"{out} holds no JSON object of sections; delete it or pass another --out", path=out)
    if "pipeline" in names:
        require_dir(pipeline_dir, "--pipeline-dir")
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for name in names:
        print(f"== {name}", flush=True)
        extra = {"pipeline_dir": pipeline_dir} if name == "pipeline" else {}
        results[name] = SECTIONS[name](seconds, **extra)
        print(json.dumps(results[name], indent=2), flush=True)
    write_json(out, results)
    print(f"wrote {out}")
