"""The main job in one command: demos -> SFT -> evaluation -> preferences -> DPO -> evaluation, then one table.

``rounds`` (1 by default) repeats the preference stages: round r collects pairs with the policy of round r - 1 (SFT
for the first), trains DPO from it (the frozen reference of that round), calibrates and evaluates the result against
SFT on identical episodes; rounds after the first write prefs-r2/, dpo-r2/, eval/dpo-r2-<suite>/ and so on.

SFT starts from a vision-language base (``base``): the shipped stage-0 checkpoint (``vla.bases``, digest-checked;
the default), one built here from scratch (``base=pretrain`` adds the ``scenes`` and ``pretrain`` stages in front),
or none (random weights).

``Pipeline(cfg).run()``, which ``scripts/pipeline.py`` runs:

    python scripts/pipeline.py                                   # embedded defaults, ~40 min on 2 CPU cores
    python scripts/pipeline.py 'stages="eval,dpo"' output_dir=runs/pipeline
    python scripts/pipeline.py experiment=full                  # more demos, steps, episodes (conf/experiment/)

``PipelineConfig`` composes the stages' own configs (``demos: DemoConfig``, ``sft: SFTConfig``, ``eval: EvalConfig``,
``prefs: CollectConfig``, ``dpo: DPOConfig``); conf/pipeline.yaml wires their paths and the shared keys (task,
distractors, workers, backend) by interpolation and sets only the values where the pipeline differs from a stage's
own defaults. ``eval`` is a template: each evaluation run sets its policy, suite, baseline and output_dir.

Every stage writes into its own directory under output_dir (demos/, sft/, eval/<policy>-<suite>/, prefs/, dpo/;
calibrate writes calibration.json and its episodes into sft/final, calibrate_dpo into dpo/final, where evaluation
and the judge read them),
each with its summary.json, and is resumable by itself; ``pipeline.json`` records the finished stages with the
settings they ran with. A rerun skips finished stages and continues an interrupted one where it stopped; a finished
stage whose settings changed is refused (choose another output_dir, or delete that stage's directory and the later
ones). ``results.md`` and ``results.json`` hold the final table (``harness.results``): expert, random, SFT and each
round's DPO policy on the success and safety suites, and the rounds' verdicts against SFT.
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
from harness.results import SUITES, table
from store.errors import UsageError, require_dir
from store.files import write_json, write_text
from store.intact import read_json
from tasks.demos import DemoConfig, generate
from tasks.parallel import check_backend
from tasks.scenes import SceneConfig, generate_scenes
from vla.bases import shipped_base
from vla.dpo import DPOConfig, train_dpo
from vla.pretrain import PretrainConfig, pretrain
from vla.sft import SFTConfig, train

STAGES = ("scenes", "pretrain", "demos", "sft", "calibrate", "eval", "prefs", "dpo", "calibrate_dpo", "eval_dpo")
BASE_STAGES = ("scenes", "pretrain")  # run only with base=pretrain
ROUND_STAGES = ("prefs", "dpo", "calibrate_dpo", "eval_dpo")  # once per preference round: prefs, prefs_r2, ...
BASES = ("shipped", "pretrain", "none")
Stage = tuple[dict, Callable[[], object]]  # (the settings that determine a stage's output, what runs it)
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
    rounds: int = 1  # preference rounds: collect with the latest policy, DPO from it, calibrate, evaluate
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
        if self.workers < 1 or self.rounds < 1:
            raise UsageError(f"workers={self.workers} and rounds={self.rounds} must be >= 1")
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

    def stage_names(self) -> list[str]:
        """The selected stages in order, the round stages once per round (``prefs``, ..., ``prefs_r2``, ...)."""
        kinds = self.selected()
        return [k for k in kinds if k not in ROUND_STAGES] + [
            round_stage(k, r) for r in range(1, self.rounds + 1) for k in ROUND_STAGES if k in kinds]


def round_stage(kind: str, r: int) -> str:
    return kind if r == 1 else f"{kind}_r{r}"


def split_stage(name: str) -> tuple[str, int]:
    """``"dpo_r2"`` -> ("dpo", 2); ``"dpo"`` -> ("dpo", 1)."""
    kind, _, r = name.rpartition("_r")
    return (kind, int(r)) if kind in ROUND_STAGES and r.isdigit() else (name, 1)


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        c = self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.dirs = {"scenes": Path(c.scenes.output_dir), "pretrain": Path(c.pretrain.output_dir),
                     "demos": Path(c.demos.output_dir), "sft": Path(c.sft.output_dir), "eval": self.out / "eval",
                     "prefs": Path(c.prefs.output_dir), "dpo": Path(c.dpo.output_dir)}
        self.sft_ckpt = self.dirs["sft"] / "final"
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

    def _round(self, r: int) -> dict:
        """Round r's directories, the policy it starts from and the name of its DPO policy in eval/."""
        suffix = "" if r == 1 else f"-r{r}"
        start = self.sft_ckpt if r == 1 else self._round(r - 1)["dpo"] / "final"
        dpo = Path(self.cfg.dpo.output_dir + suffix)
        return {"policy": start, "prefs": Path(self.cfg.prefs.output_dir + suffix), "dpo": dpo, "name": dpo.name}

    def prefs(self, r: int = 1) -> Stage:
        d = self._round(r)
        prefs = replace(self.cfg.prefs, policy=str(d["policy"]), output_dir=str(d["prefs"]))
        return prefs.dataset_config() | {"policy": None}, lambda: collect(prefs)

    def dpo(self, r: int = 1) -> Stage:
        d = self._round(r)
        dpo = replace(self.cfg.dpo, policy=str(d["policy"]), preferences=str(d["prefs"]), output_dir=str(d["dpo"]))
        return _settings(dpo, ("policy", "preferences")), lambda: train_dpo(dpo)

    def calibrate_dpo(self, r: int = 1) -> Stage:
        cfg = replace(self.cfg.calibrate, policy=str(self._round(r)["dpo"] / "final"))
        return _settings(cfg, ("policy",)), lambda: calibrate(cfg, required=False)

    def eval_dpo(self, r: int = 1) -> Stage:
        policy = str(self._round(r)["dpo"] / "final")  # evaluated in eval/<its run's name>-<suite>
        runs = [self._eval(policy, s, baseline=str(self.dirs["eval"] / f"sft-{s}")) for s in SUITES]
        return self._eval_settings(), lambda: [evaluate(run) for run in runs]

    def _stage_dir(self, name: str) -> Path:
        kind, r = split_stage(name)
        if kind in ("prefs", "dpo"):
            return self._round(r)[kind]
        return self._round(r)["dpo"] / "final" if kind == "calibrate_dpo" else self.dirs[kind.split("_")[0]]

    # ---- running them ----

    def _state(self) -> dict:
        """The finished stages of pipeline.json, less those whose directory is gone (deleted: run them again)."""
        path = require_dir(self.out) / STATE_FILE
        state = read_json(path, "delete it to run every stage again (each resumes from its directory)") \
            if path.is_file() else {"stages": {}}
        if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
            raise UsageError(f"{path} holds no stages; delete it to run every stage again", path=path)
        stages = state["stages"]
        state["stages"] = {k: v for k, v in stages.items()
                           if split_stage(k)[0] not in STAGES or self._stage_dir(k).exists()}
        return state

    def _damaged(self, e: UsageError) -> UsageError:
        """``e`` with the pipeline's fix when it names a damaged file of a stage's output: rebuild that stage."""
        rounds = range(2, self.cfg.rounds + 1)
        dirs = [*self.dirs.values(), *(self._round(r)[k] for r in rounds for k in ("prefs", "dpo"))]
        owners = [d for d in dirs if e.path and Path(e.path).resolve().is_relative_to(d.resolve())]
        if not owners:
            return e
        stage = min(owners, key=lambda d: len(d.resolve().parts))
        return UsageError(f"{e}; in this pipeline, delete {stage} (and the later stages' directories) and rerun to "
                          "build it again", path=e.path)

    def _save_state(self, state: dict) -> None:
        write_json(self.out / STATE_FILE, state)

    def run(self) -> dict:
        state = self._state()
        plan = {}
        for name in self.cfg.stage_names():
            kind, r = split_stage(name)
            plan[name] = getattr(self, kind)(r) if kind in ROUND_STAGES else getattr(self, kind)()
        for name, (settings, _) in plan.items():  # refuse before any work
            digest = _digest(settings)
            done = state["stages"].get(name)
            if done and done["settings"] != digest:
                raise UsageError(
                    f"stage {name} already ran in {self.out} with other settings; choose another output_dir, or "
                    f"delete {self._stage_dir(name)} and the later stages' directories to rerun it")
        for i, (name, (settings, run)) in enumerate(plan.items(), 1):
            if name in state["stages"]:
                print(f"[{i}/{len(plan)}] {name}: done in {state['stages'][name]['seconds']:.0f} s (cached)")
                continue
            print(f"[{i}/{len(plan)}] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                run()
            except UsageError as e:
                raise self._damaged(e) from None
            state["stages"][name] = {"settings": _digest(settings), "seconds": round(time.perf_counter() - t0, 1)}
            self._save_state(state)
        try:
            results = self.table()
        except UsageError as e:
            raise self._damaged(e) from None
        seconds = {k: v["seconds"] for k, v in state["stages"].items()}
        results["stage_seconds"] = seconds | {"total": round(sum(seconds.values()), 1)}
        write_json(self.out / "results.json", results)
        write_text(self.out / "results.md", results["markdown"])
        print(results["markdown"])
        return results

    def table(self) -> dict:
        """The final table from whatever evaluation reports exist (``harness.results``)."""
        rounds = [(d["name"], d["prefs"]) for d in map(self._round, range(1, self.cfg.rounds + 1))]
        title = f"# Pipeline results ({self.cfg.task}, {self.cfg.distractors} distractors, {self.out})"
        return table(self.dirs["eval"], rounds, title)


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _settings(cfg: object, paths: tuple[str, ...]) -> dict:
    """The keys of a stage config that determine its output: all but ``paths`` and ``NOT_SETTINGS``."""
    return {k: v for k, v in asdict(cfg).items() if k not in paths + NOT_SETTINGS}
