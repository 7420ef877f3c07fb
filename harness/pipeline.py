"""The main job in one command: demos -> SFT -> evaluation -> preferences -> DPO -> evaluation, then one table.

SFT starts from a vision-language base (``base``): the shipped stage-0 checkpoint (``vla.bases``, digest-checked;
the default), one built here from scratch (``base=pretrain`` adds the ``scenes`` and ``pretrain`` stages in front),
or none (random weights).

``Pipeline(cfg).run()``, which ``scripts/pipeline.py`` runs:

    python scripts/pipeline.py                                   # embedded defaults, ~30 min on 2 CPU cores
    python scripts/pipeline.py 'stages="eval,dpo"' output_dir=runs/pipeline
    python scripts/pipeline.py experiment=full                  # more demos, steps, episodes (conf/experiment/)

``PipelineConfig`` composes the stages' own configs (``demos: DemoConfig``, ``sft: SFTConfig``, ``eval: EvalConfig``,
``prefs: CollectConfig``, ``dpo: DPOConfig``); conf/pipeline.yaml wires their paths and the shared keys (task,
distractors, workers, backend) by interpolation and sets only the values where the pipeline differs from a stage's
own defaults. ``eval`` is a template: each evaluation run sets its policy, suite, baseline and output_dir.

Every stage writes into its own directory under output_dir (demos/, sft/, eval/<policy>-<suite>/, prefs/, dpo/;
calibrate writes calibration.json and its episodes into sft/final, where evaluation and the judge read them),
each with its summary.json, and is resumable by itself; ``pipeline.json`` records the finished stages with the
settings they ran with. A rerun skips finished stages and continues an interrupted one where it stopped; a finished
stage whose settings changed is refused (choose another output_dir, or delete that stage's directory and the later
ones). ``results.md`` and ``results.json`` hold the final table: expert, random, SFT and DPO on the success and
safety suites.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harness.calibrate import CalibrateConfig, calibrate
from harness.evaluate import EvalConfig, evaluate
from harness.policies import BUILTIN
from harness.preferences import CollectConfig, collect
from store.errors import UsageError
from store.files import write_json, write_text
from tasks.demos import DemoConfig, generate
from tasks.parallel import check_backend
from tasks.scenes import SceneConfig, generate_scenes
from vla.bases import shipped_base
from vla.dpo import DPOConfig, train_dpo
from vla.pretrain import PretrainConfig, pretrain
from vla.sft import SFTConfig, train

STAGES = ("scenes", "pretrain", "demos", "sft", "calibrate", "eval", "prefs", "dpo", "eval_dpo")
BASE_STAGES = ("scenes", "pretrain")  # run only with base=pretrain
BASES = ("shipped", "pretrain", "none")
Stage = tuple[dict, Callable[[], object]]  # (the settings that determine a stage's output, what runs it)
SUITES = ("success", "safety")
STATE_FILE = "pipeline.json"
EVAL_RUN_KEYS = ("policy", "suite", "baseline", "output_dir")  # what each evaluation run sets in the eval template
NOT_SETTINGS = ("workers", "backend", "output_dir", "resume")  # keys that do not change a stage's output


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    stages: str = "all"  # all, or a comma-separated subset of STAGES (run in pipeline order)
    task: str = "reach,pick"  # tasks of the demos, the suites and the preference starts
    distractors: int = 2  # objects besides the target in every scene of the demos, the suites and the starts
    workers: int = 2  # processes for demos, evaluation and preference collection
    backend: str = "local"  # local or ray (tasks.parallel)
    base: str = "shipped"  # what SFT starts from: shipped, pretrain (built by the scenes and pretrain stages), none
    scenes: SceneConfig = field(default_factory=SceneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prefs: CollectConfig = field(default_factory=CollectConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.selected() if s not in STAGES]
        if unknown:
            raise UsageError(f"stages={self.stages!r}: unknown {unknown}; choose from all, {', '.join(STAGES)}")
        if self.workers < 1:
            raise UsageError(f"workers={self.workers} must be >= 1")
        if self.distractors < 0:
            raise UsageError(f"distractors={self.distractors} must be >= 0")
        if self.base not in BASES:
            raise UsageError(f"base={self.base!r} is not one of {', '.join(BASES)}")
        if self.base != "pretrain" and set(BASE_STAGES) & set(self.selected()):
            raise UsageError(f"stages {', '.join(BASE_STAGES)} build the base; they run with base=pretrain")
        check_backend(self.backend)

    def selected(self) -> list[str]:
        if self.stages == "all":
            return [s for s in STAGES if self.base == "pretrain" or s not in BASE_STAGES]
        names = [s.strip() for s in self.stages.split(",") if s.strip()]
        return [s for s in STAGES if s in names] + [s for s in names if s not in STAGES]


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        c = self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.dirs = {"scenes": Path(c.scenes.output_dir), "pretrain": Path(c.pretrain.output_dir),
                     "demos": Path(c.demos.output_dir), "sft": Path(c.sft.output_dir), "eval": self.out / "eval",
                     "prefs": Path(c.prefs.output_dir), "dpo": Path(c.dpo.output_dir)}
        self.sft_ckpt, self.dpo_ckpt = self.dirs["sft"] / "final", self.dirs["dpo"] / "final"
        self.dirs["calibrate"] = self.sft_ckpt  # calibration.json and its episodes, where evaluation reads them
        if c.base != "none" and c.sft.model.pretrained is None:
            base = self.dirs["pretrain"] / "final" if c.base == "pretrain" else shipped_base()
            c.sft = replace(c.sft, model=replace(c.sft.model, pretrained=str(base)))

    # ---- the stages: each returns (settings that determine its output, function that runs it) ----

    def scenes(self) -> Stage:
        return self.cfg.scenes.set_config(), lambda: generate_scenes(self.cfg.scenes)

    def pretrain(self) -> Stage:
        cfg = self.cfg.pretrain
        return {"model": asdict(cfg.model), "train": asdict(cfg.train)}, lambda: pretrain(cfg)

    def demos(self) -> Stage:
        return self.cfg.demos.dataset_config(), lambda: generate(self.cfg.demos)

    def sft(self) -> Stage:
        sft = self.cfg.sft
        return {"model": asdict(sft.model), "train": asdict(sft.train)}, lambda: train(sft)

    def calibrate(self) -> Stage:
        cfg = self.cfg.calibrate
        return _settings(cfg, ("policy",)), lambda: calibrate(cfg, required=False)

    def _eval(self, policy: str, suite: str, baseline: str | None = None) -> EvalConfig:
        name = policy if policy in BUILTIN else Path(policy).parent.name
        return replace(self.cfg.eval, policy=policy, suite=suite, baseline=baseline,
                       output_dir=str(self.dirs["eval"] / f"{name}-{suite}"))

    def _eval_settings(self) -> dict:
        return _settings(self.cfg.eval, EVAL_RUN_KEYS)

    def eval(self) -> Stage:
        runs = [self._eval(p, s) for p in ("expert", "random", str(self.sft_ckpt)) for s in SUITES]
        if self.cfg.distractors:  # does SFT read the instruction? The look-alike named instead (tasks.suites)
            runs.append(self._eval(str(self.sft_ckpt), "instruction"))
        return self._eval_settings(), lambda: [evaluate(r) for r in runs]

    def prefs(self) -> Stage:
        prefs = self.cfg.prefs
        return prefs.dataset_config() | {"policy": None}, lambda: collect(prefs)

    def dpo(self) -> Stage:
        dpo = self.cfg.dpo
        return _settings(dpo, ("policy", "preferences")), lambda: train_dpo(dpo)

    def eval_dpo(self) -> Stage:
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
                raise UsageError(
                    f"stage {name} already ran in {self.out} with other settings; choose another output_dir, or "
                    f"delete {self.dirs[name.split('_')[0]]} and the later stages' directories to rerun it")
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
        write_text(self.out / "results.md", results["markdown"])
        print(results["markdown"])
        return results

    def table(self) -> dict:
        """The final table from whatever evaluation reports exist."""
        rows, lines = [], [
            "| policy | suite | success | 95% CI | safety events / ep | ECE | calibrated ECE | coverage at 90% success "
            "| report |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for policy in ("expert", "random", "sft", "dpo"):
            for suite in SUITES:
                report = self.dirs["eval"] / f"{policy}-{suite}"
                if not (report / "summary.json").is_file():
                    continue
                s = json.loads((report / "summary.json").read_text())
                rows.append({**s, "policy": policy, "suite": suite, "suite_id": s["suite"], "report": str(report)})
                ece = "-" if s["ece"] is None else f"{s['ece']:.3f}"
                cal = "-" if s.get("calibrated_ece") is None else f"{s['calibrated_ece']:.3f}"
                coverage = (s.get("coverage_at_success_0.9") or {}).get("calibrated")
                coverage = "-" if coverage is None else f"{100 * coverage:.0f}%"
                lines.append(f"| {policy} | {suite} | {100 * s['success_rate']:.1f}% | "
                             f"[{100 * s['success_ci'][0]:.1f}, {100 * s['success_ci'][1]:.1f}] | "
                             f"{s['safety_events_per_episode']:.2f} | {ece} | {cal} | {coverage} | "
                             f"{report / 'report.md'} |")
        report = self.dirs["eval"] / "sft-instruction" / "summary.json"
        if report.is_file():
            s = json.loads(report.read_text())
            named, other = s["per_axis"], s["per_axis_other_success"]
            lines += ["", "| SFT, instruction suite | success at the named object | at the object not named |",
                      "|---|---|---|",
                      f"| names the target | {100 * named['named']:.1f}% | {100 * other['named']:.1f}% |",
                      f"| names its look-alike | {100 * named['swapped']:.1f}% | {100 * other['swapped']:.1f}% "
                      "(the original target) |"]
            rows.append({**s, "policy": "sft", "suite": "instruction", "suite_id": s["suite"], "report": str(report)})
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


def _settings(cfg: object, paths: tuple[str, ...]) -> dict:
    """The keys of a stage config that determine its output: all but ``paths`` and ``NOT_SETTINGS``."""
    return {k: v for k, v in asdict(cfg).items() if k not in paths + NOT_SETTINGS}
