"""Every script refuses bad input in one line, ``error: <what is wrong and the fix>``, exit status 1, no traceback,
nothing on disk changed: damaged inputs (a file cut in half, JSON that does not parse), an output path that is a file.
Tiny inputs made here without the simulator; each case damages a copy. The cases run in process as the scripts run
them (``harness.cli.run``, an argparse ``main``); one damaged-file case per Hydra script also runs as a process."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from harness.calibrate import calibrate
from harness.cli import register_configs, run
from harness.evaluate import evaluate
from harness.pipeline import STATE_FILE, Pipeline, _digest
from harness.preferences import collect
from sim.env import ACTION_NAMES, CONTROL_HZ, STATE_NAMES
from store import scenes as scene_store
from store.lerobot import Episode
from store.writer import DatasetWriter
from tasks.demos import DemoConfig, generate
from tasks.scenes import SceneConfig, generate_scenes
from tests.vla.test_dpo import write_prefs
from tests.vla.test_sft import INSTRUCTIONS, write_dataset
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import save_checkpoint
from vla.dpo import train_dpo
from vla.inputs import PROMPT_TEMPLATE
from vla.lora import ADAPTER_CONFIG, LoraConfig, add_lora
from vla.model import build_vla, load_model
from vla.pretrain import pretrain
from vla.run_state import STATE_FILE as TRAINER_STATE, STATE_TENSORS
from vla.sft import train
from vla.text_tokenizer import action_token_offset, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMOS = ["task=pick", "num_episodes=2", "image_size=32"]  # the config the demos input was written with
SCENES = ["num_scenes=4", "val_scenes=2", "image_size=32"]  # and the scenes input
DATA = "data/chunk-000/file-000.parquet"
IS_A_FILE = "is a file, not a directory"


def script_main(name: str) -> Callable:
    """``main`` of scripts/<name>.py (scripts/ is no package)."""
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"))["main"]


# ---- damage: steps applied to the case's copy of the inputs ----

Step = Callable[[Path], None]


def cut(rel: str) -> Step:
    """Cut the file in half, as an interrupted copy leaves it."""
    def step(tmp: Path) -> None:
        data = (tmp / rel).read_bytes()
        (tmp / rel).write_bytes(data[: len(data) // 2])
    return step


def garble(rel: str, text: str = '{"truncated": ') -> Step:
    """Write ``text`` (by default JSON cut short) over the file, or as a new one."""
    def step(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return step


def file_at(rel: str) -> Step:
    """A regular file where a directory should be."""
    return garble(rel, "a file\n")


def move(src: str, dst: str) -> Step:
    def step(tmp: Path) -> None:
        (tmp / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp / src, tmp / dst)
    return step


def finished(stage: str) -> Step:
    """p/pipeline.json saying that ``stage`` finished (with the settings of a run of that stage alone)."""
    def step(tmp: Path) -> None:
        overrides = [f"output_dir={tmp}/p", f"stages={stage}", "base=none"]
        settings = getattr(Pipeline(OmegaConf.to_object(compose_cfg("pipeline", overrides))), stage)()[0]
        state = {"stages": {stage: {"settings": _digest(settings), "seconds": 1.0}}}
        (tmp / "p" / STATE_FILE).write_text(json.dumps(state))
    return step


class Case(NamedTuple):
    name: str
    damage: list[Step]
    args: list[str]  # overrides or argv; {tmp} is the case's directory, holding a copy of every input
    expect: str  # what the error line must mention: the damaged file, or the key

    def prepare(self, tmp: Path, inputs: Path) -> list[str]:
        shutil.copytree(inputs, tmp, dirs_exist_ok=True, symlinks=True)
        for step in self.damage:
            step(tmp)
        return [a.format(tmp=tmp) for a in self.args]


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def compose_cfg(config: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config, overrides=overrides)


def refused(config: str, fn: Callable, overrides: list[str], root: Path) -> str:
    """Run ``fn`` on conf/<config>.yaml with ``overrides`` as its script does; check that it is refused in one line
    and that nothing under ``root`` changed; return the line."""
    cfg = compose_cfg(config, overrides)
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_:
        run(fn, cfg)
    line = str(exit_.value.code)
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    assert snapshot(root) == before, f"the refused run changed files under {root}"
    return line


def refused_main(main: Callable, argv: list[str], root: Path, capsys) -> str:
    """The same for an argparse script's ``main(argv)``: exit status 1, and what it printed."""
    before = snapshot(root)
    assert main(argv) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert snapshot(root) == before, f"the refused run changed files under {root}"
    return out.out + out.err


# ---- the inputs, written once ----


def demo_set(root: Path, finalize: bool) -> None:
    """Two fake episodes written as scripts/generate_demos.py with DEMOS would write them (complete, or staged)."""
    writer = DatasetWriter(root, fps=CONTROL_HZ, state_names=list(STATE_NAMES), action_names=list(ACTION_NAMES),
                           config=DemoConfig(task="pick", num_episodes=2, image_size=32).dataset_config())
    rng = np.random.default_rng(0)
    for e in range(2):
        writer.write_episode(e, Episode(task="pick", instruction="pick up the red cube", seed=e * 8, success=True,
                                        images=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
                                        states=np.zeros((3, 7), np.float32), actions=np.zeros((3, 7), np.float32)))
    if finalize:
        writer.finalize()


def scene_set(root: Path) -> None:
    """The set scripts/generate_scenes.py with SCENES would write, with blank images."""
    cfg = SceneConfig(num_scenes=4, val_scenes=2, image_size=32)
    rows = [{"index": i, "split": "train" if i < 4 else "val", "seed": i, "image": np.zeros((32, 32, 3), np.uint8),
             "state": np.zeros(7), "names": ["red cube", "blue bar"], "positions": np.zeros((2, 3))} for i in range(6)]
    scene_store.write_chunk(root, 0, rows)
    scene_store.finalize(root, cfg.set_config(), {"train": 4, "val": 2}, ["pick up the {target}"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model) -> Path:
    """ckpt/ (a tiny policy checkpoint), dataset/, prefs/, scenes/, demos/ (complete), staged/ (demos not yet
    finalized), run/ (a training run with checkpoints/step-2), base/ and adapter/ (a LoRA adapter on base/)."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = build_tokenizer([PROMPT_TEMPLATE.format(instruction=t) for t in INSTRUCTIONS] * 5, vocab_size=300)
    torch.manual_seed(0)
    vla = build_vla(tiny_model(), tokenizer)
    q01 = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0])
    stats = {"synthetic": ActionTokenizer(q01, -q01 + np.eye(7)[6], action_token_offset(tokenizer))}
    save_checkpoint(vla, stats, root / "ckpt")
    write_dataset(root / "dataset", episodes=4, frames=4)
    write_prefs(root / "prefs", root / "ckpt")
    scene_set(root / "scenes")
    demo_set(root / "demos", finalize=True)
    demo_set(root / "staged", finalize=False)
    step = root / "run/checkpoints/step-2"
    shutil.copytree(root / "ckpt", step)
    (step / TRAINER_STATE).write_text(json.dumps({"step": 2}))
    save_file({"rng.torch": torch.get_rng_state()}, step / STATE_TENSORS)
    vla.save_pretrained(root / "base")
    base = load_model(root / "base")  # as LoRA SFT loads model.pretrained (peft records where it came from)
    save_checkpoint(base._replace(model=add_lora(base.model, LoraConfig(r=2, alpha=4.0), root / "base")), stats,
                    root / "adapter")
    return root


def rebase_adapter(tmp: Path) -> None:
    """Point the copied adapter at the copied base (adapter_config.json holds the base's absolute path)."""
    config = json.loads((tmp / "adapter" / ADAPTER_CONFIG).read_text())
    (tmp / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(tmp / "base")}))


# ---- the cases, per script ----

CKPT_DAMAGE = [  # a policy checkpoint's files, each damaged
    ("weights cut", cut("ckpt/model.safetensors"), "ckpt/model.safetensors"),
    ("config.json", garble("ckpt/config.json"), "ckpt/config.json"),
    ("action stats", garble("ckpt/action_tokenizer.json"), "ckpt/action_tokenizer.json"),
    ("tokenizer.json", cut("ckpt/tokenizer.json"), "ckpt/tokenizer.json"),
]
DATASET_DAMAGE = [  # a LeRobot dataset's files, each damaged
    ("data cut", cut(f"dataset/{DATA}"), DATA),
    ("info.json", garble("dataset/meta/info.json"), "meta/info.json"),
    ("stats.json", garble("dataset/meta/stats.json"), "meta/stats.json"),
    ("tasks cut", cut("dataset/meta/tasks.parquet"), "meta/tasks.parquet"),
    ("episodes cut", cut("dataset/meta/episodes/chunk-000/file-000.parquet"), "meta/episodes/chunk-000"),
]
CASES = {
    "generate_demos": [
        Case("output is a file", [file_at("out")], [*DEMOS, "output_dir={tmp}/out"], IS_A_FILE),
        Case("output under a file", [file_at("out")], [*DEMOS, "output_dir={tmp}/out/demos"], IS_A_FILE),
        Case("info.json", [garble("demos/meta/info.json")], [*DEMOS, "output_dir={tmp}/demos"], "meta/info.json"),
        Case("data cut", [cut(f"demos/{DATA}")], [*DEMOS, "output_dir={tmp}/demos"], DATA),
        Case("episodes cut", [cut("demos/meta/episodes/chunk-000/file-000.parquet")],
             [*DEMOS, "output_dir={tmp}/demos"], "meta/episodes"),
        Case("staged config", [garble("staged/.staging/config.json")], [*DEMOS, "output_dir={tmp}/staged"],
             ".staging/config.json"),
        Case("staged episode cut", [cut("staged/.staging/episode-000001.parquet")],
             [*DEMOS, "output_dir={tmp}/staged"], "episode-000001.parquet"),
    ],
    "generate_scenes": [
        Case("output is a file", [file_at("out")], [*SCENES, "output_dir={tmp}/out"], IS_A_FILE),
        Case("meta.json", [garble("scenes/meta.json")], [*SCENES, "output_dir={tmp}/scenes"], "scenes/meta.json"),
        Case("chunk cut", [cut("scenes/data/chunk-000.parquet")], [*SCENES, "output_dir={tmp}/scenes"],
             "chunk-000.parquet"),
    ],
    "pretrain_vlm": [
        Case("meta.json", [garble("scenes/meta.json")], ["scenes={tmp}/scenes", "output_dir={tmp}/out"], "meta.json"),
        Case("meta.json a list", [garble("scenes/meta.json", "[]")], ["scenes={tmp}/scenes", "output_dir={tmp}/o"],
             "meta.json"),
        Case("chunk cut", [cut("scenes/data/chunk-000.parquet")], ["scenes={tmp}/scenes", "output_dir={tmp}/out"],
             "chunk-000.parquet"),
        Case("output is a file", [file_at("out")], ["scenes={tmp}/scenes", "output_dir={tmp}/out"], IS_A_FILE),
        Case("resume, weights cut", [cut("run/checkpoints/step-2/model.safetensors")],
             ["scenes={tmp}/scenes", "output_dir={tmp}/run", "resume=true"], "step-2/model.safetensors"),
        Case("resume, config.json", [garble("run/config.json")],
             ["scenes={tmp}/scenes", "output_dir={tmp}/run", "resume=true"], "run/config.json"),
    ],
    "train_sft": [
        *(Case(f"dataset {name}", [step], ["dataset={tmp}/dataset", "output_dir={tmp}/out"], expect)
          for name, step, expect in DATASET_DAMAGE),
        *(Case(f"pretrained {name}", [step], ["dataset={tmp}/dataset", "output_dir={tmp}/out",
                                              "model.pretrained={tmp}/ckpt"], expect)
          for name, step, expect in CKPT_DAMAGE),
        Case("output is a file", [file_at("out")], ["dataset={tmp}/dataset", "output_dir={tmp}/out"], IS_A_FILE),
        Case("resume, trainer state", [garble(f"run/checkpoints/step-2/{TRAINER_STATE}")],
             ["dataset={tmp}/dataset", "output_dir={tmp}/run", "resume=true"], TRAINER_STATE),
    ],
    "evaluate": [
        *(Case(f"policy {name}", [step], ["policy={tmp}/ckpt", "output_dir={tmp}/out"], expect)
          for name, step, expect in CKPT_DAMAGE),
        Case("baseline weights cut", [cut("ckpt/model.safetensors")],
             ["policy=expert", "baseline={tmp}/ckpt", "output_dir={tmp}/out"], "model.safetensors"),
        Case("baseline report", [garble("report/manifest.json"), garble("report/metrics.json", "{}")],
             ["policy=expert", "baseline={tmp}/report", "output_dir={tmp}/out"], "report/manifest.json"),
        Case("calibration", [garble("calibration.json")],
             ["policy=expert", "calibration={tmp}/calibration.json", "output_dir={tmp}/out"], "calibration.json"),
        Case("output is a file", [file_at("out")], ["policy=expert", "output_dir={tmp}/out"], IS_A_FILE),
        Case("output manifest", [garble("manifest.json")], ["policy=expert", "output_dir={tmp}"], "manifest.json"),
    ],
    "calibrate": [
        *(Case(f"policy {name}", [step], ["policy={tmp}/ckpt"], expect) for name, step, expect in CKPT_DAMAGE),
        Case("output is a file", [file_at("out")], ["policy=perturbed", "output_dir={tmp}/out"], IS_A_FILE),
        Case("output manifest", [garble("calibration/manifest.json")], ["policy=perturbed", "output_dir={tmp}"],
             "calibration/manifest.json"),
    ],
    "collect_preferences": [
        *(Case(f"policy {name}", [step], ["policy={tmp}/ckpt", "output_dir={tmp}/out"], expect)
          for name, step, expect in CKPT_DAMAGE),
        Case("output is a file", [file_at("out")], ["policy={tmp}/ckpt", "output_dir={tmp}/out"], IS_A_FILE),
        Case("staged config", [garble("staged/.staging/config.json")],
             ["policy={tmp}/ckpt", "output_dir={tmp}/staged"], ".staging/config.json"),
    ],
    "train_dpo": [
        *(Case(f"policy {name}", [step], ["policy={tmp}/ckpt", "preferences={tmp}/prefs", "output_dir={tmp}/out"],
               expect) for name, step, expect in CKPT_DAMAGE),
        *(Case(f"preferences {name}", [cut(f"prefs/{file}")],
               ["policy={tmp}/ckpt", "preferences={tmp}/prefs", "output_dir={tmp}/out"], file)
          for name, file in (("pairs cut", "pairs.parquet"), ("rollouts cut", "rollouts.parquet"),
                             ("data cut", DATA))),
        Case("preferences info.json", [garble("prefs/meta/info.json")],
             ["policy={tmp}/ckpt", "preferences={tmp}/prefs", "output_dir={tmp}/out"], "meta/info.json"),
        Case("output is a file", [file_at("out")],
             ["policy={tmp}/ckpt", "preferences={tmp}/prefs", "output_dir={tmp}/out"], IS_A_FILE),
    ],
    "pipeline": [  # a rerun into output_dir p/, whose stage outputs are damaged
        Case("output is a file", [file_at("p")], ["output_dir={tmp}/p"], IS_A_FILE),
        Case("pipeline.json", [garble(f"p/{STATE_FILE}")], ["output_dir={tmp}/p"], STATE_FILE),
        Case("demos data cut", [move("dataset", "p/demos"), cut(f"p/demos/{DATA}")],
             ["output_dir={tmp}/p", "stages=sft"], "delete {tmp}/p/demos"),
        Case("dpo weights cut", [move("ckpt", "p/dpo/final"), cut("p/dpo/final/model.safetensors")],
             ["output_dir={tmp}/p", "stages=eval_dpo"], "delete {tmp}/p/dpo"),
        Case("eval summary", [garble("p/eval/expert-success/summary.json"), finished("eval")],
             ["output_dir={tmp}/p", "stages=eval"], "delete {tmp}/p/eval"),
    ],
}
RUNS = {"generate_demos": generate, "generate_scenes": generate_scenes, "pretrain_vlm": pretrain, "train_sft": train,
        "evaluate": evaluate, "calibrate": calibrate, "collect_preferences": collect, "train_dpo": train_dpo,
        "pipeline": lambda cfg: Pipeline(cfg).run()}
FIXED = {  # overrides every case of a script adds: tiny models, one worker, one episode
    "pretrain_vlm": ["model=tiny"], "train_sft": ["model=tiny"], "evaluate": ["task=reach", "episodes_per_task=1"],
    "calibrate": ["task=reach", "episodes_per_task=1"], "collect_preferences": ["starts=1", "rollouts_per_start=2"],
    "pipeline": ["base=none", "workers=1"],
}


@pytest.mark.parametrize("script, case", [(s, c) for s, cases in CASES.items() for c in cases],
                         ids=[f"{s}: {c.name}" for s, cases in CASES.items() for c in cases])
def test_a_hydra_script_refuses_damaged_input_in_one_line(script, case, inputs, tmp_path):
    overrides = [*case.prepare(tmp_path, inputs), *FIXED.get(script, [])]
    line = refused(script, RUNS[script], overrides, tmp_path)
    assert case.expect.format(tmp=tmp_path) in line, line


VALIDATE = [
    Case("missing", [], ["{tmp}/nowhere"], "nowhere"),
    Case("a file", [file_at("data.json")], ["{tmp}/data.json"], "data.json"),
    *(Case(name, [step], ["{tmp}/dataset"], expect) for name, step, expect in DATASET_DAMAGE),
    Case("info.json a list", [garble("dataset/meta/info.json", "[]")], ["{tmp}/dataset"], "meta/info.json"),
]
MERGE = [
    Case("adapter config", [garble(f"adapter/{ADAPTER_CONFIG}")], ["{tmp}/adapter", "{tmp}/out"], ADAPTER_CONFIG),
    Case("adapter weights cut", [cut("adapter/adapter_model.safetensors")], ["{tmp}/adapter", "{tmp}/out"],
         "adapter_model.safetensors"),
    Case("action stats", [garble("adapter/action_tokenizer.json")], ["{tmp}/adapter", "{tmp}/out"],
         "action_tokenizer.json"),
    Case("base weights cut", [rebase_adapter, cut("base/model.safetensors")], ["{tmp}/adapter", "{tmp}/out"],
         "base/model.safetensors"),
    Case("base gone", [rebase_adapter, lambda tmp: shutil.rmtree(tmp / "base")], ["{tmp}/adapter", "{tmp}/out"],
         "base"),
    Case("output is a file", [file_at("out")], ["{tmp}/adapter", "{tmp}/out"], "out exists"),
]
BENCHMARK = [
    Case("results not JSON", [garble("results.json")], ["--only", "sim", "--out", "{tmp}/results.json"],
         "results.json"),
    Case("results a list", [garble("results.json", "[]")], ["--only", "sim", "--out", "{tmp}/results.json"],
         "results.json"),
    Case("out is a directory", [], ["--only", "sim", "--out", "{tmp}/dataset"], "is a directory"),
    Case("out under a file", [file_at("f")], ["--only", "sim", "--out", "{tmp}/f/results.json"], IS_A_FILE),
    Case("seconds", [], ["--only", "sim", "--seconds", "0", "--out", "{tmp}/r.json"], "--seconds"),
    Case("pipeline dir is a file", [file_at("p")],
         ["--only", "pipeline", "--out", "{tmp}/r.json", "--pipeline-dir", "{tmp}/p"], IS_A_FILE),
]


@pytest.mark.parametrize("case", VALIDATE, ids=[c.name for c in VALIDATE])
def test_validate_dataset_reports_a_damaged_dataset(case, inputs, tmp_path, capsys):
    printed = refused_main(script_main("validate_dataset"), case.prepare(tmp_path, inputs), tmp_path, capsys)
    problem = printed.splitlines()[1]
    assert printed.splitlines()[0].endswith("1 problem(s)") and case.expect in problem, printed


@pytest.mark.parametrize("name, case", [("merge_lora", c) for c in MERGE] + [("benchmark", c) for c in BENCHMARK],
                         ids=[f"merge_lora: {c.name}" for c in MERGE] + [f"benchmark: {c.name}" for c in BENCHMARK])
def test_an_argparse_script_refuses_damaged_input_in_one_line(name, case, inputs, tmp_path, capsys):
    printed = refused_main(script_main(name), case.prepare(tmp_path, inputs), tmp_path, capsys)
    assert printed.startswith("error: ") and len(printed.strip().splitlines()) == 1, printed
    assert case.expect in printed, printed


ONE_EACH = {"generate_demos": "info.json", "generate_scenes": "meta.json", "pretrain_vlm": "chunk cut",
            "train_sft": "dataset data cut", "evaluate": "policy weights cut", "calibrate": "policy config.json",
            "collect_preferences": "policy action stats", "train_dpo": "preferences pairs cut",
            "pipeline": "pipeline.json"}


@pytest.mark.slow
def test_each_hydra_script_refuses_a_damaged_file_as_a_real_process(inputs, tmp_path):
    """One case per script as a user runs it, all at once: exit status 1 and one stderr line, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for shell, name in ONE_EACH.items():
        case = next(c for c in CASES[shell] if c.name == name)
        (tmp_path / shell).mkdir()
        overrides = [*case.prepare(tmp_path / shell, inputs), *FIXED.get(shell, [])]
        proc = subprocess.Popen([sys.executable, f"scripts/{shell}.py", *overrides], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[shell] = proc, case.expect.format(tmp=tmp_path / shell)
    for shell, (proc, expect) in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 1 and "Traceback" not in err and len(lines) == 1, f"{shell}: {err}"
        assert lines[0].startswith("error: ") and expect in lines[0], f"{shell}: {err}"
