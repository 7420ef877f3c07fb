"""The main job in one command: demos -> SFT -> evaluation -> preferences -> DPO -> evaluation, then one table.

    python scripts/pipeline.py                                   # embedded defaults, ~20 min on 2 CPU cores
    python scripts/pipeline.py stages=eval,dpo output_dir=runs/pipeline
    python scripts/pipeline.py experiment=full                  # more demos, steps, episodes (conf/experiment/)

Every stage writes into its own directory under output_dir (demos/, sft/, eval/<policy>-<suite>/, prefs/, dpo/),
each with its summary.json, and is resumable by itself; ``pipeline.json`` records the finished stages with the
settings they ran with. A rerun skips finished stages and continues an interrupted one where it stopped; a finished
stage whose settings changed is refused (choose another output_dir, or delete that stage's directory and the later
ones). ``results.md`` and ``results.json`` hold the final table: expert, random, SFT and DPO on the success and
safety suites.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import hydra
from collect_preferences import CollectConfig, collect
from evaluate import EvalConfig, evaluate
from generate_demos import DemoConfig, generate
from hydra.core.config_store import ConfigStore
from policy_factory import BUILTIN
from omegaconf import OmegaConf

from tasks.judge import JudgeWeights
from tasks.parallel import check_backend
from store.files import atomic_write
from vla.dpo import DPOConfig, train_dpo
from store.files import write_json
from vla.sft import ModelConfig, SFTConfig, TrainConfig, train

STAGES = ("demos", "sft", "eval", "prefs", "dpo", "eval_dpo")
SUITES = ("success", "safety")
STATE_FILE = "pipeline.json"


class PipelineError(ValueError):
    """A problem with the pipeline's settings or output_dir; the message names the fix."""


@dataclass
class DemoStage:
    num_episodes: int = 1000  # per task
    noise: float = 0.003
    seed: int = 0


@dataclass
class SFTStage:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalStage:
    episodes_per_task: int = 20  # per task and suite axis, on the suites' test seeds
    videos: int = 2
    batch: int = 8


@dataclass
class PrefsStage:
    starts: int = 28
    rollouts_per_start: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    safety_fraction: float = 0.5
    margin: float = 0.05
    pairs_per_start: int = 1
    judge: JudgeWeights = field(default_factory=JudgeWeights)


@dataclass
class DPOStage:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    level: str = "trajectory"
    alpha: float = 0.0
    pairs: str = "all"
    steps: int = 24
    batch_size: int = 2
    lr: float = 2e-5
    warmup_steps: int = 5
    eval_every: int = 20


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    stages: str = "all"  # all, or a comma-separated subset of STAGES (run in pipeline order)
    task: str = "reach,pick"  # tasks of the demos, the suites and the preference starts
    distractors: int = 0  # objects besides the target in every scene of the demos, the suites and the starts
    workers: int = 2  # processes for demos, evaluation and preference collection
    backend: str = "local"  # local or ray (tasks.parallel)
    demos: DemoStage = field(default_factory=DemoStage)
    sft: SFTStage = field(default_factory=SFTStage)
    eval: EvalStage = field(default_factory=EvalStage)
    prefs: PrefsStage = field(default_factory=PrefsStage)
    dpo: DPOStage = field(default_factory=DPOStage)

    def __post_init__(self) -> None:
        unknown = [s for s in self.selected() if s not in STAGES]
        if unknown:
            raise PipelineError(f"stages={self.stages!r}: unknown {unknown}; choose from all, {', '.join(STAGES)}")
        if self.workers < 1:
            raise PipelineError(f"workers={self.workers} must be >= 1")
        if self.distractors < 0:
            raise PipelineError(f"distractors={self.distractors} must be >= 0")
        check_backend(self.backend)

    def selected(self) -> list[str]:
        if self.stages == "all":
            return list(STAGES)
        names = [s.strip() for s in self.stages.split(",") if s.strip()]
        return [s for s in STAGES if s in names] + [s for s in names if s not in STAGES]


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.dirs = {"demos": self.out / "demos", "sft": self.out / "sft", "prefs": self.out / "prefs",
                     "dpo": self.out / "dpo", "eval": self.out / "eval"}
        self.sft_ckpt, self.dpo_ckpt = self.dirs["sft"] / "final", self.dirs["dpo"] / "final"

    # ---- the stages: each returns (settings that determine its output, function that runs it) ----

    def demos(self):
        c = self.cfg
        demo = DemoConfig(task=c.task, distractors=c.distractors, workers=c.workers, backend=c.backend,
                          output_dir=str(self.dirs["demos"]), **asdict(c.demos))
        return demo.dataset_config(), lambda: generate(demo)

    def sft(self):
        c = self.cfg
        sft = SFTConfig(dataset=str(self.dirs["demos"]), output_dir=str(self.dirs["sft"]), resume=True,
                        model=c.sft.model, train=c.sft.train)
        return {"model": asdict(c.sft.model), "train": asdict(c.sft.train)}, lambda: train(sft)

    def _eval(self, policy: str, suite: str, baseline: str | None = None) -> EvalConfig:
        c, name = self.cfg, policy if policy in BUILTIN else Path(policy).parent.name
        return EvalConfig(policy=policy, suite=suite, task=c.task, distractors=c.distractors, workers=c.workers,
                          backend=c.backend, baseline=baseline, output_dir=str(self.dirs["eval"] / f"{name}-{suite}"),
                          **asdict(c.eval))

    def _eval_settings(self) -> dict:
        return {"task": self.cfg.task, "distractors": self.cfg.distractors, **asdict(self.cfg.eval)}

    def eval(self):
        runs = [self._eval(p, s) for p in ("expert", "random", str(self.sft_ckpt)) for s in SUITES]
        return self._eval_settings(), lambda: [evaluate(r) for r in runs]

    def prefs(self):
        c = self.cfg
        pc = CollectConfig(policy=str(self.sft_ckpt), output_dir=str(self.dirs["prefs"]), task=c.task,
                           distractors=c.distractors, workers=c.workers, backend=c.backend,
                           **{f.name: getattr(c.prefs, f.name) for f in fields(c.prefs)})
        return pc.dataset_config() | {"policy": None}, lambda: collect(pc)

    def dpo(self):
        d = self.cfg.dpo
        loop = replace(DPOConfig().train, steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup_steps=d.warmup_steps,
                       eval_every=d.eval_every)
        dc = DPOConfig(policy=str(self.sft_ckpt), preferences=str(self.dirs["prefs"]),
                       output_dir=str(self.dirs["dpo"]), resume=True, beta=d.beta, loss_type=d.loss_type,
                       level=d.level, alpha=d.alpha, pairs=d.pairs, train=loop)
        return asdict(self.cfg.dpo), lambda: train_dpo(dc)

    def eval_dpo(self):
        runs = [self._eval(str(self.dpo_ckpt), s, baseline=str(self.dirs["eval"] / f"sft-{s}")) for s in SUITES]
        return self._eval_settings(), lambda: [evaluate(r) for r in runs]

    # ---- running them ----

    def _state(self) -> dict:
        path = self.out / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def _save_state(self, state: dict) -> None:
        write_json(self.out / STATE_FILE, state)

    def run(self) -> dict:
        state, selected = self._state(), self.cfg.selected()
        plan = {name: getattr(self, name)() for name in selected}
        for name, (settings, _) in plan.items():  # refuse before any work
            digest = _digest(settings)
            done = state["stages"].get(name)
            if done and done["settings"] != digest:
                raise PipelineError(
                    f"stage {name} already ran in {self.out} with other settings; choose another output_dir, or "
                    f"delete {self.out / name.split('_')[0]} and the later stages' directories to rerun it")
        for i, (name, (settings, run)) in enumerate(plan.items(), 1):
            if name in state["stages"]:
                print(f"[{i}/{len(plan)}] {name}: done in {state['stages'][name]['seconds']:.0f} s (cached)")
                continue
            print(f"[{i}/{len(plan)}] {name} ...", flush=True)
            t0 = time.perf_counter()
            run()
            state["stages"][name] = {"settings": _digest(settings), "seconds": round(time.perf_counter() - t0, 1)}
            self._save_state(state)
        results = self.table()
        seconds = {k: v["seconds"] for k, v in state["stages"].items()}
        results["stage_seconds"] = seconds | {"total": round(sum(seconds.values()), 1)}
        write_json(self.out / "results.json", results)
        atomic_write(self.out / "results.md", lambda p: p.write_text(results["markdown"]))
        print(results["markdown"])
        return results

    def table(self) -> dict:
        """The final table from whatever evaluation reports exist."""
        rows, lines = [], [
            "| policy | suite | success | 95% CI | safety events / ep | ECE | report |",
            "|---|---|---|---|---|---|---|",
        ]
        for policy in ("expert", "random", "sft", "dpo"):
            for suite in SUITES:
                report = self.dirs["eval"] / f"{policy}-{suite}"
                if not (report / "summary.json").is_file():
                    continue
                s = json.loads((report / "summary.json").read_text())
                rows.append({**s, "policy": policy, "suite": suite, "suite_id": s["suite"], "report": str(report)})
                ece = "-" if s["ece"] is None else f"{s['ece']:.3f}"
                lines.append(f"| {policy} | {suite} | {100 * s['success_rate']:.1f}% | "
                             f"[{100 * s['success_ci'][0]:.1f}, {100 * s['success_ci'][1]:.1f}] | "
                             f"{s['safety_events_per_episode']:.2f} | {ece} | {report / 'report.md'} |")
        notes = []
        for suite in SUITES:
            report = self.dirs["eval"] / f"dpo-{suite}"
            if (report / "summary.json").is_file():
                comparison = json.loads((report / "summary.json").read_text())["comparison"] or {}
                notes += [f"- {suite}: {v}" for v in comparison.values()]
        videos = sorted(str(p) for p in self.dirs["eval"].glob("*/videos/*.gif"))
        title = f"# Pipeline results ({self.cfg.task}, {self.cfg.distractors} distractors, {self.out})"
        markdown = "\n".join([title, "", *lines, "",
                              *(["DPO vs SFT on identical episodes:", *notes, ""] if notes else []),
                              f"Videos: {len(videos)} GIFs under {self.dirs['eval']}/*/videos/", ""])
        return {"rows": rows, "videos": videos, "markdown": markdown}


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def register_configs() -> None:
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="pipeline")
def main(cfg) -> None:
    try:
        Pipeline(OmegaConf.to_object(cfg)).run()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e.args[0] if e.args else e}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    register_configs()
    main()
