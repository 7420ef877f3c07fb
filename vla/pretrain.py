"""Vision-language pretraining (stage 0) on simulator-labelled scenes: the grounding queries of ``vla.grounding``
answered by the LM head, through the shared loop (``vla.loop.run``).

``pretrain(cfg)`` trains a VLA of ``cfg.model`` from random weights on a ``store.scenes`` set (written by
``scripts/generate_scenes.py``): each training scene becomes one query, its kind drawn by the mixture
``train.queries``. Validation is the grounding accuracy on the set's held-out ``val`` scenes (test seeds, three
objects with a look-alike): per query kind, how often the predicted place is nearest the named object and within
3 cm of it. ``final/`` is an ordinary checkpoint directory (model, tokenizer, processor, ``location_tokenizer.json``)
that ``scripts/train_sft.py model.pretrained=`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from store.errors import MISSING, UsageError, require
from store.scenes import SceneSet
from vla.grounding import LIST_PROMPT, QUERIES, WHERE_PROMPT, Queries, grounding_accuracy, location_tokenizer, \
    scored_logits, sequence_loss
from vla.inputs import PROMPT_TEMPLATE, build_queries
from vla.loop import QUERY, Dist, LoopConfig, LoopResult, distributed, run, seed_of
from vla.model import VLA, VLAModelConfig, build_vla, load_model
from vla.run_state import no_hf_progress_bars
from vla.text_tokenizer import action_token_offset, build_tokenizer


@dataclass
class PretrainTrainConfig(LoopConfig):
    """The loop's keys with pretraining's defaults, and the query mixture."""

    steps: int = 3000
    batch_size: int = 32
    save_every: int = 500
    eval_every: int = 500
    val_fraction: float = 0.0  # unused: the scene set's val split is held out
    queries: dict[str, float] = field(default_factory=lambda: {"list": 0.5, "where": 0.0, "plan": 0.5})
    val_scenes: int = 200  # held-out scenes per validation pass (3 queries of each kind per scene)
    label_sigma: float = 4.0  # std (bins) of the Gaussian targets of location tokens
    vocab_size: int = 1024  # BPE vocabulary of the new text tokenizer

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.queries) - set(QUERIES))
        if unknown or any(w < 0 for w in self.queries.values()) or not sum(self.queries.values()) > 0:
            raise UsageError(f"train.queries={dict(self.queries)} must weigh the kinds {list(QUERIES)} with "
                             "non-negative weights, at least one positive")
        if self.val_scenes < 0 or self.label_sigma < 0 or self.vocab_size < 260:
            raise UsageError("train.val_scenes and train.label_sigma must be >= 0 and train.vocab_size >= 260")


@dataclass
class PretrainConfig:
    scenes: str = MISSING  # a scene set of scripts/generate_scenes.py
    output_dir: str = MISSING
    resume: bool = False
    model: VLAModelConfig = field(default_factory=VLAModelConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)


def corpus(scenes: SceneSet) -> list[str]:
    """What the model will read: every query prompt and listing, and every task instruction over the set's names."""
    names = sorted({n for row in scenes.names for n in row})
    texts = [LIST_PROMPT + " " + "; ".join(names[i : i + 4]) for i in range(0, len(names), 4)]
    texts += [WHERE_PROMPT.format(name=n) for n in names]
    texts += [PROMPT_TEMPLATE.format(instruction=t.format(target=n, base=names[(i + 1) % len(names)]))
              for t in scenes.templates for i, n in enumerate(names)]
    return texts


class Pretrain:
    """Pretraining as a ``vla.loop.Trainer``."""

    name, rate, resume_keys, resume_files = "pretrain", "samples_per_s", ("scenes", "model"), ()

    def __init__(self, cfg: PretrainConfig, env: Dist):
        self.cfg, self.env = cfg, env
        self.scenes = SceneSet(cfg.scenes)
        self.val = self.scenes.split("val")[: cfg.train.val_scenes]
        kinds = [k for k in QUERIES if cfg.train.queries.get(k, 0) > 0]
        weights = np.asarray([cfg.train.queries[k] for k in kinds])
        self.kinds, self.weights = kinds, weights / weights.sum()
        self.window: list[float] = []

    def record(self) -> dict:
        return {**asdict(self.cfg), "scenes": str(Path(self.cfg.scenes).resolve())}

    def build(self, resume_from: Path | None) -> torch.nn.Module:
        if resume_from is not None:
            with no_hf_progress_bars():
                self.vla = load_model(resume_from)
        else:
            vla = build_vla(self.cfg.model, build_tokenizer(corpus(self.scenes), self.cfg.train.vocab_size))
            self.vla = vla._replace(location_tokenizer=location_tokenizer(action_token_offset(vla.tokenizer)))
        self.queries = Queries(self.vla, self.scenes.templates)
        loc = self.vla.location_tokenizer
        self.bins = slice(loc.token_offset, loc.token_offset + loc.n_bins)
        model = self.vla.model.to(self.env.device).train()
        self.parameters = sum(p.numel() for p in model.parameters())
        return model

    def items(self) -> list[int]:
        return self.scenes.split("train")

    def start(self, out: Path, resume_from: Path | None) -> None:
        pass

    def describe(self) -> str:
        return (f"{self.parameters / 1e6:.2f}M parameters on {self.env.device}; {len(self.items())} train / "
                f"{len(self.val)} val scenes; queries {dict(zip(self.kinds, self.weights.round(3).tolist()))}")

    def batches(self, keys: Iterable[list[tuple[int, int, int]]]) -> Iterator[dict[str, torch.Tensor]]:
        scenes = self.scenes
        for batch_keys in keys:
            epoch, b, _ = batch_keys[0]
            rng = np.random.default_rng(seed_of(self.cfg.train.seed, QUERY, epoch, b, self.env.rank))
            items = [i for _, _, i in batch_keys]
            prompts, answers = zip(*(self.queries.sample(self.kinds[rng.choice(len(self.kinds), p=self.weights)],
                                                         scenes.names[i], scenes.positions[i], rng) for i in items))
            images = np.stack([scenes.image(i) for i in items])
            yield build_queries(self.vla, images, prompts, answers)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}
        with self.env.autocast():
            logits, targets, valid = scored_logits(model, batch)
        loss = sequence_loss(logits, targets, valid, self.bins, self.cfg.train.label_sigma)
        self.window.append(loss.item())
        return loss

    def train_metrics(self) -> dict:
        metrics, self.window = {"loss": float(np.mean(self.window))}, []
        return metrics

    def validate(self, model: torch.nn.Module) -> dict | None:
        if not self.val:
            return None
        scenes = self.scenes
        result = grounding_accuracy(self.vla, self.queries, np.stack([scenes.image(i) for i in self.val]), None,
                                    [scenes.names[i] for i in self.val], [scenes.positions[i] for i in self.val])
        return {f"{kind}/{k}": v for kind, r in result.items() for k, v in r.items()}

    def save(self, path: Path) -> None:
        self.vla.save_pretrained(path)

    def summary(self, result: LoopResult) -> dict:
        return {"loss": (result.train or {}).get("loss"), "grounding": result.val, "samples_per_s": result.rate,
                "parameters": self.parameters, "train_scenes": len(self.items()), "val_scenes": len(self.val),
                "weights_digests": result.digests}


def pretrain(cfg: PretrainConfig) -> dict:
    """Run stage 0 as configured (see the module docstring); return the summary also written to summary.json."""
    require(cfg, "scenes", "output_dir")
    with distributed(cfg.train.device) as env:
        return run(Pretrain(cfg, env), cfg.train, Path(cfg.output_dir), cfg.resume, env)
