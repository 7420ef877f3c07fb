"""harness/pipeline.py (scripts/pipeline.py) end to end on tiny settings: every stage's output and summary, the
final table, caching of finished stages, a subset of stages, refusal of changed settings, the shipped configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.cli import register_configs
from harness.pipeline import STAGES, Pipeline, PipelineConfig
from store.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

TINY = [
    "task=reach", "workers=1", "demos.num_episodes=3", "model@sft.model=tiny", "sft.train.steps=4",
    "sft.train.warmup_steps=1", "sft.train.save_every=2", "sft.train.eval_every=2", "sft.train.log_every=2",
    "sft.train.val_max_samples=8", "sft.train.vocab_size=300", "eval.episodes_per_task=1",
    "eval.videos=1",
    "prefs.starts=2", "prefs.rollouts_per_start=2", "prefs.margin=0.0", "dpo.train.steps=2",
    "dpo.train.warmup_steps=0", "dpo.train.batch_size=1", "dpo.train.eval_every=0",
    # the whole recipe: scenes -> stage-0 pretraining -> grounded SFT from that base, with co-training rows
    "base=pretrain", "scenes.num_scenes=16", "scenes.val_scenes=2", "scenes.image_size=32",
    "model@pretrain.model=tiny", "pretrain.train.steps=4", "pretrain.train.warmup_steps=1",
    "pretrain.train.batch_size=4", "pretrain.train.save_every=2", "pretrain.train.eval_every=4",
    "pretrain.train.val_scenes=2", "pretrain.train.vocab_size=300", "sft.train.batch_size=8",
    "calibrate.episodes_per_task=2",
]


def _cfg(out: Path, *overrides: str) -> PipelineConfig:
    register_configs("pipeline_schema")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("pipeline", overrides=[f"output_dir={out}", *TINY, *overrides])
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pipe") / "run"
    return out, Pipeline(_cfg(out)).run()


def test_every_stage_writes_its_summary_and_the_table_has_all_policies(run):
    out, results = run
    for sub in ("scenes", "pretrain", "demos", "sft", "prefs", "dpo",
                *(f"eval/{p}-{s}" for p in ("expert", "random", "sft", "dpo") for s in ("success", "safety"))):
        assert (out / sub / ("meta.json" if sub == "scenes" else "summary.json")).is_file(), sub
    assert (out / "sft" / "final" / "config.json").is_file() and (out / "dpo" / "final" / "config.json").is_file()
    sft = json.loads((out / "sft" / "config.json").read_text())
    assert sft["model"]["pretrained"] == str(out / "pretrain" / "final") and sft["train"]["grounded"]
    assert json.loads((out / "sft" / "final" / "config.json").read_text())["plan_tokens"] == 2
    # the calibrate stage ran; a tiny model fails every episode, so it wrote no calibration and the pipeline went on
    calibration = json.loads((out / "sft" / "final" / "calibration" / "summary.json").read_text())
    assert calibration["calibration"] is None and calibration["successes"] == 0
    rows = {(r["policy"], r["suite"]): r for r in results["rows"]}
    assert set(rows) == {(p, s) for p in ("expert", "random", "sft", "dpo") for s in ("success", "safety")} | {
        ("sft", "instruction")}
    assert rows["expert", "success"]["success_rate"] == 1.0 and rows["random", "success"]["success_rate"] == 0.0
    assert rows["sft", "safety"]["ece"] is not None and rows["expert", "safety"]["ece"] is None
    assert json.loads((out / "eval" / "dpo-safety" / "summary.json").read_text())["comparison"] is not None
    assert set(results["stage_seconds"]) == {*STAGES, "total"}
    assert results["videos"] and all(Path(v).is_file() for v in results["videos"])
    table = (out / "results.md").read_text()
    assert "| dpo | safety |" in table and "DPO vs SFT" in table and "| names its look-alike |" in table
    assert "calibrated ECE | coverage at 90% success" in table


def test_rerun_skips_finished_stages(run, capsys):
    out, results = run
    before = {p: p.stat().st_mtime_ns for p in (out / "sft" / "final").iterdir()}
    again = Pipeline(_cfg(out)).run()
    assert capsys.readouterr().out.count("(cached)") == len(STAGES)
    assert again["rows"] == results["rows"]
    assert {p: p.stat().st_mtime_ns for p in (out / "sft" / "final").iterdir()} == before


def test_a_second_round_starts_from_the_first_rounds_policy_and_reports_its_verdicts(run):
    out, _ = run
    results = Pipeline(_cfg(out, "rounds=2")).run()  # round 1 cached; round 2 collects, trains, calibrates, evaluates
    dpo2 = json.loads((out / "dpo-r2" / "config.json").read_text())
    assert dpo2["policy"] == str((out / "dpo" / "final").resolve())  # its policy and reference: round 1's result
    assert dpo2["preferences"] == str((out / "prefs-r2").resolve())
    prefs2 = json.loads((out / "prefs-r2" / "summary.json").read_text())
    assert prefs2["policy"] == str((out / "dpo" / "final").resolve()) and sum(prefs2["pair_mix"].values()) == \
        prefs2["pairs"]
    assert (out / "dpo-r2" / "final" / "calibration" / "summary.json").is_file()  # calibrate_dpo_r2 ran
    rounds = {(r["round"], r["suite"]): r for r in results["rounds"]}
    assert set(rounds) == {(r, s) for r in (1, 2) for s in ("success", "safety")}
    assert all(isinstance(r["events_30pct_lower"], bool) for r in rounds.values())
    assert {(r["policy"], r["suite"]) for r in results["rows"]} >= {("dpo-r2", "success"), ("dpo-r2", "safety")}
    table = (out / "results.md").read_text()
    assert "| round | pairs | pair mix |" in table and "| 2 |" in table


def test_changed_settings_of_a_finished_stage_are_refused(run):
    out, _ = run
    with pytest.raises(UsageError, match="stage eval already ran .* with other settings"):
        Pipeline(_cfg(out, "stages=eval", "eval.episodes_per_task=2")).run()


def test_a_subset_of_stages_runs_alone(tmp_path):
    out = tmp_path / "demos-only"
    results = Pipeline(_cfg(out, "stages=demos")).run()
    assert (out / "demos" / "summary.json").is_file() and not (out / "sft").exists()
    assert results["rows"] == [] and set(results["stage_seconds"]) == {"demos", "total"}


def test_unknown_stage_and_key_fail_with_one_line(tmp_path):
    with pytest.raises(UsageError, match="unknown \\['train'\\]"):
        _cfg(tmp_path, 'stages="demos,train"')
    proc = subprocess.run([sys.executable, "scripts/pipeline.py", "sft.train.stepz=3", f"output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "stepz" in proc.stderr and not any(tmp_path.iterdir())


def test_distractors_reach_every_stage(tmp_path):
    p = Pipeline(_cfg(tmp_path, "distractors=1"))
    assert p.demos()[0]["distractors"] == 1 and p.prefs()[0]["distractors"] == 1
    assert p.eval()[0]["distractors"] == 1 and p.eval_dpo(2)[0]["distractors"] == 1
    assert {p._eval(policy, "safety").distractors for policy in ("expert", str(p.sft_ckpt))} == {1}
    with pytest.raises(UsageError, match="distractors=-1 must be >= 0"):
        _cfg(tmp_path, "distractors=-1")


def test_the_base_decides_where_sft_starts(tmp_path):
    assert Pipeline(_cfg(tmp_path, "base=none")).cfg.sft.model.pretrained is None
    assert _cfg(tmp_path, "base=none").selected()[0] == "demos"
    with pytest.raises(UsageError, match="they run with base=pretrain"):
        _cfg(tmp_path, "base=none", 'stages="pretrain,sft"')
    with pytest.raises(UsageError, match="base='vlm' is not one of"):
        _cfg(tmp_path, "base=vlm")


def test_full_experiment_composes():
    register_configs("pipeline_schema")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        base = OmegaConf.to_object(compose("pipeline"))
        cfg = OmegaConf.to_object(compose("pipeline", overrides=["experiment=full"]))
    assert cfg.task == "all" and cfg.distractors == 2 and cfg.sft.train.steps == 4400 > base.sft.train.steps == 3000
    assert cfg.demos.num_episodes == 400 and cfg.output_dir == "runs/full" and cfg.dpo.train.steps == 300
    # the stages' paths and shared keys follow the pipeline's by interpolation
    assert cfg.demos.output_dir == cfg.sft.dataset == "runs/full/demos" and cfg.demos.task == cfg.prefs.task == "all"
    assert cfg.dpo.policy == cfg.prefs.policy == "runs/full/sft/final" and cfg.dpo.preferences == "runs/full/prefs"


def test_a_stage_called_from_python_refuses_a_missing_path(tmp_path):
    with pytest.raises(UsageError, match="dataset is required; pass dataset=PATH"):
        Pipeline(PipelineConfig(stages="sft")).sft()[1]()
