"""A successful run prints no traceback and no stray lines: real scripts, as a user runs them, in 2 workers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# PyBullet's C chatter, BulletClient.__del__ failing at exit, resource_tracker's "leaked semaphore" warnings
NOISE = re.compile(r"Traceback|argv\[|Exception ignored|leaked|pybullet build time|Warning")

pytestmark = pytest.mark.slow


def run_script(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_generate_demos_prints_only_its_progress_and_result(tmp_path):
    log = run_script("generate_demos.py", "task=pick", "num_episodes=2", "workers=2", "image_size=48",
                     f"output_dir={tmp_path}")
    assert not NOISE.findall(log), log
    assert "wrote 2 episodes" in log


def test_evaluate_prints_only_its_progress_and_result(tmp_path):
    log = run_script("evaluate.py", "policy=expert", "task=reach", "episodes_per_task=2", "workers=2", "videos=1",
                     "image_size=48", f"output_dir={tmp_path}")
    assert not NOISE.findall(log), log
    assert f"wrote {tmp_path}/report.md" in log
    gif, = (tmp_path / "videos").glob("*.gif")
    assert gif.with_suffix(".mp4").stat().st_size > 0  # the MP4 beside the GIF
