"""Tests for vla/pretrain.py and scripts/pretrain_vlm.py: stage 0 on real rendered scenes, its checkpoint as the
base of grounded SFT, and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store.scenes import SceneSet
from tasks.scenes import SceneConfig, generate_scenes
from vla.grounding import QUERIES, Queries
from vla.model import load_model
from vla.pretrain import PretrainConfig, PretrainTrainConfig, pretrain

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "s"
    generate_scenes(SceneConfig(output_dir=str(root), num_scenes=48, val_scenes=4, image_size=32, max_objects=3))
    return root


def _cfg(tiny_model, scenes: Path, out: Path, **train) -> PretrainConfig:
    kw = {"steps": 120, "batch_size": 16, "warmup_steps": 5, "lr": 3e-3, "log_every": 20, "eval_every": 60,
          "save_every": 60, "val_scenes": 4, "vocab_size": 400, "label_sigma": 0.0}
    return PretrainConfig(scenes=str(scenes), output_dir=str(out), model=tiny_model(arch="fast_vlm"),
                          train=PretrainTrainConfig(**{**kw, **train}))


def test_pretraining_learns_the_queries_and_saves_a_base(scenes, tiny_model, tmp_path):
    summary = pretrain(_cfg(tiny_model, scenes, tmp_path / "base"))
    rows = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.7 * losses[0]
    assert {f"{kind}/nearest" for kind in QUERIES} <= set(summary["grounding"])
    vla = load_model(tmp_path / "base" / "final")
    assert vla.location_tokenizer is not None and vla.state_tokenizer is None
    # The answers it was trained on decode back to the scene's places (the bins are 1.5 mm wide in x).
    s = SceneSet(scenes)
    prompt, answer = Queries(vla, s.templates).sample("where", s.names[0], s.positions[0], np.random.default_rng(0))
    xy = vla.location_tokenizer.decode(np.asarray([answer + answer[:1]]))[0, :2]
    assert min(np.linalg.norm(s.positions[0][:, :2] - xy, axis=1)) < 0.003


def test_the_script_refuses_bad_input_in_one_line(scenes, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts/pretrain_vlm.py"), *args], capture_output=True,
                              text=True, cwd=tmp_path)

    for args, message in (
        ([f"output_dir={tmp_path / 'a'}"], "scenes is required"),
        ([f"scenes={tmp_path / 'none'}", f"output_dir={tmp_path / 'b'}"], "generate_scenes.py"),
        ([f"scenes={scenes}", f"output_dir={tmp_path / 'c'}", "train.queries.list=-1"], "train.queries"),
        ([f"scenes={scenes}", f"output_dir={tmp_path / 'd'}", "+train.step=5"], "unknown config key"),
    ):
        done = run(*args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr.strip().splitlines()[-1], (args, done.stderr)
