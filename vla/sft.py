"""Supervised fine-tuning (SFT) of a VLA on a LeRobot dataset: cross-entropy on the action tokens and EOS only.

``train(cfg)`` is the whole run, on one process or under ``torchrun`` (DDP), through ``vla.loop.run``. Besides what
the loop writes into ``cfg.output_dir`` (config.json, metrics.jsonl, tb/, checkpoints/step-N/, final/,
summary.json), rank 0 writes ``action_diagnostics.json``: bin usage, clipped fraction and round-trip error of the
training actions. A checkpoint holds the HF model, ``action_tokenizer.json`` (keyed by the dataset's directory
name) and, with ``model.proprio``, ``state_tokenizer.json``; ``vla.checkpoint.load_checkpoint`` reads final/.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from store.errors import MISSING, UsageError, require
from store.lerobot import LeRobotDataset
from vla.action_tokenizer import GRIPPER_DIM, ActionTokenizer
from vla.checkpoint import save_checkpoint
from vla.data import Collator, FrameDataset, has_scene_labels, instruction_templates, open_dataset
from vla.grounding import OFFSET_TOKENS, PLAN_TOKENS, QUERIES, Queries, location_tokenizer, plan_tokens, \
    scored_logits, sequence_loss
from vla.inputs import PROMPT_TEMPLATE, model_inputs
from vla.lora import LoraConfig, add_lora, is_adapter
from vla.loop import Dist, LoopConfig, LoopResult, distributed, run, split_episodes
from vla.model import VLA, VLAModelConfig, build_vla, load_model
from vla.parallel import action_chunk, check_action_head, parallel_loss, set_action_head
from vla.run_state import no_hf_progress_bars
from vla.text_tokenizer import action_token, action_token_offset, build_tokenizer

# ---- config ----


@dataclass
class ModelConfig(VLAModelConfig):
    """VLAModelConfig for a random init, or ``pretrained``: a local HF checkpoint dir whose own sizes then win."""

    pretrained: str | None = None
    # Read the robot's proprio state (tip position, orientation, gripper width) as 7 tokens after the image
    # tokens. A checkpoint that already reads it (resumed or pretrained) keeps its state statistics.
    proprio: bool = True
    # vla.parallel: "parallel" predicts all the action tokens of a chunk of action_chunk actions in one forward pass
    # (OpenVLA-OFT); "autoregressive" decodes 7 tokens one by one. Saved in config.json, read by the policy and DPO.
    action_head: str = "autoregressive"
    action_chunk: int = 1
    # vla.lora: lora.r > 0 trains low-rank adapters on the frozen ``pretrained`` model and saves only them.
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_action_head(self.action_head, self.action_chunk)
        if self.lora.r and not self.pretrained:
            raise UsageError(f"model.lora.r={self.lora.r} adapts a pretrained model; set model.pretrained to a local "
                             "checkpoint directory, or fine-tune every weight with model.lora.r=0")


@dataclass
class TrainConfig(LoopConfig):
    """The loop's keys (vla.loop.LoopConfig, SFT's defaults) and SFT's own."""

    val_max_samples: int = 512  # frames per validation pass, evenly spaced over the held-out episodes
    augment: bool = False  # random shift + brightness/contrast jitter (shifts blur where things are: off by default)
    label_sigma: float = 4.0  # > 0: Gaussian soft targets over neighbouring action bins (std in bins); 0: one-hot
    num_workers: int = 0  # DataLoader worker processes (PNG decoding, preprocessing, tokenization)
    vocab_size: int = 1024  # BPE vocabulary of a new text tokenizer (ignored with model.pretrained)
    action_bins: int = 256
    gripper_dim: int | None = GRIPPER_DIM  # action dimension kept in absolute [0, 1] bins; null for none
    # Grounded SFT (vla.grounding; needs a dataset with scene labels): the model first emits the named object's
    # place (2 location tokens), then the actions; and ``cotrain`` gives the share of each batch's rows that are
    # grounding queries about their frame ({"list": 0.125, "plan": 0.125}), which keeps a pretrained base's skill.
    grounded: bool = False
    # with grounded: the plan goes on with the offset from the tip to that place (2 more tokens), the displacement
    # the actions must realise (ECoT's "where the gripper must go" in the simulator's own numbers)
    plan_offset: bool = False
    cotrain: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("val_max_samples", 1), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise UsageError(f"train.{name}={getattr(self, name)} must be >= {low}; raise it")
        if self.label_sigma < 0:
            raise UsageError(f"train.label_sigma={self.label_sigma} must be >= 0 (bins); 0 trains on one-hot targets")
        if not 2 <= self.action_bins <= 1000:
            raise UsageError(f"train.action_bins={self.action_bins} must lie in [2, 1000]; 256 is usual")
        if self.vocab_size < 260:
            raise UsageError(f"train.vocab_size={self.vocab_size} must be >= 260 (256 bytes + 4 special tokens)")
        if self.plan_offset and not self.grounded:
            raise UsageError("train.plan_offset=true extends the plan of grounded SFT; set train.grounded=true too")
        unknown = sorted(set(self.cotrain) - set(QUERIES))
        if unknown or any(w < 0 for w in self.cotrain.values()) or sum(self.cotrain.values()) >= 1:
            raise UsageError(f"train.cotrain={dict(self.cotrain)} must give shares >= 0 of the kinds {list(QUERIES)} "
                             "that sum to less than 1 (the rest of each batch are actions)")


@dataclass
class SFTConfig:
    dataset: str = MISSING  # LeRobot dataset root; its directory name keys the action statistics in checkpoints
    output_dir: str = MISSING
    resume: bool = False  # continue from the latest checkpoint in output_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---- model, loss, metrics ----


def load_pretrained(path: str, n_bins: int) -> VLA:
    """``load_model(path)`` with one-line errors for directories that cannot be fine-tuned here."""
    root = Path(path)
    if is_adapter(root):
        raise UsageError(f"model.pretrained={path} is a LoRA adapter; merge it into a full checkpoint with "
                         f"`python scripts/merge_lora.py {path} MERGED` and fine-tune MERGED")
    if not (root / "config.json").is_file():
        raise UsageError(f"model.pretrained={path} holds no config.json, so it is not a Hugging Face checkpoint; "
                         "pass the directory written by save_pretrained")
    if not any((root / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise UsageError(f"model.pretrained={path} holds no model weights (model.safetensors); "
                         "save the model with save_pretrained (safetensors) into that directory")
    try:
        vla = load_model(root)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"model.pretrained={path}: {e}") from None
    try:
        offset = action_token_offset(vla.tokenizer, n_bins)
    except ValueError:
        raise UsageError(f"model.pretrained={path}: its tokenizer lacks the {n_bins} action tokens "
                         f"{action_token(0)}..{action_token(n_bins - 1)} (contiguous ids); add them and resize the "
                         "embeddings, or start from a checkpoint written by scripts/train_sft.py") from None
    if offset + n_bins > vla.model.config.text_config.vocab_size:
        raise UsageError(f"model.pretrained={path}: the action tokens lie beyond the model's vocabulary "
                         f"({vla.model.config.text_config.vocab_size}); resize its token embeddings")
    return vla


def state_tokenizer(ds: LeRobotDataset, token_offset: int, n_bins: int = 256) -> ActionTokenizer:
    """The proprio-state binning of ``model.proprio``: the action contract over the dataset's observation.state
    q01/q99, every dimension normalised (none absolute), ids in the action-token range."""
    return ActionTokenizer.from_stats(ds.stats["observation.state"], token_offset, n_bins, absolute_dims=())


def build_model(cfg: SFTConfig, ds: LeRobotDataset, resume_from: Path | None) -> tuple[VLA, ActionTokenizer]:
    """The VLA (resumed, pretrained or new) and the action tokenizer of the dataset's stats in its vocabulary."""
    tc = cfg.train
    if resume_from is not None:
        with no_hf_progress_bars():
            vla = load_model(resume_from)
    elif cfg.model.pretrained:
        with no_hf_progress_bars():
            vla = load_pretrained(cfg.model.pretrained, tc.action_bins)
    else:  # byte-level BPE on the filled prompts: the template's words become single tokens, any text encodes
        prompts = sorted({PROMPT_TEMPLATE.format(instruction=text) for text in ds.instructions})
        vla = build_vla(cfg.model, build_tokenizer(prompts, tc.vocab_size, tc.action_bins))
    offset = action_token_offset(vla.tokenizer, tc.action_bins)
    if cfg.model.proprio and vla.state_tokenizer is None:
        vla = vla._replace(state_tokenizer=state_tokenizer(ds, offset, tc.action_bins))
    if tc.grounded or tc.cotrain:
        if not has_scene_labels(ds):
            raise UsageError(f"train.grounded / train.cotrain read the objects' labels and places, which {cfg.dataset} "
                             "lacks; regenerate it with scripts/generate_demos.py, or turn both off")
        if vla.location_tokenizer is None:
            vla = vla._replace(location_tokenizer=location_tokenizer(offset, tc.action_bins))
    if tc.grounded:
        # saved in config.json: the policy decodes the plan first
        vla.model.config.plan_tokens = PLAN_TOKENS + OFFSET_TOKENS * tc.plan_offset
    elif plan_tokens(vla.model):
        raise UsageError(f"{cfg.model.pretrained or resume_from} emits plan tokens before its actions; "
                         "fine-tune it with train.grounded=true")
    set_action_head(vla.model, cfg.model.action_head, cfg.model.action_chunk)
    if cfg.model.lora.r and resume_from is None:  # a resumed LoRA run reloads its adapters
        vla = vla._replace(model=add_lora(vla.model, cfg.model.lora, cfg.model.pretrained))
    try:
        action_tok = ActionTokenizer.from_stats(
            ds.stats["action"], offset, tc.action_bins,
            () if tc.gripper_dim is None else (tc.gripper_dim,))
    except ValueError as e:
        raise UsageError(f"cannot tokenize the actions of {cfg.dataset}: {e}; fix train.gripper_dim or the dataset") \
            from None
    return vla, action_tok


def action_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that score the D action tokens and the EOS, (B, D + 1, V), and those targets, (B, D + 1).

    Only these positions go through the LM head (``logits_to_keep``); the loss on them equals the model's own loss
    with the ``build_inputs`` labels, which are -100 everywhere else.
    """
    positions = batch["action_positions"]  # (B, D)
    targets_at = torch.cat([positions, positions[:, -1:] + 1], dim=1)  # (B, D + 1): actions, then EOS
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=targets_at - 1).logits  # logits at t score the token at t + 1
    return logits, batch["input_ids"].gather(1, targets_at)


def action_loss(logits: torch.Tensor, targets: torch.Tensor, tok: ActionTokenizer, sigma: float) -> torch.Tensor:
    """Mean cross-entropy over the D action positions and the EOS of ``action_logits``: ``vla.grounding.sequence_loss``
    with every position scored.

    With ``sigma > 0`` the target of an action position is a Gaussian over the bins, centred on the true bin with
    std ``sigma`` bins and renormalised over the n_bins action ids (no mass on any other token); the EOS stays
    one-hot. Bins are ordered, so a prediction one bin off should cost less than one 100 bins off; one-hot
    targets cannot say so, soft ones spread the evidence of each frame over its neighbours.
    """
    bins = slice(tok.token_offset, tok.token_offset + tok.n_bins)
    return sequence_loss(logits, targets, torch.ones_like(targets, dtype=torch.bool), bins, sigma)


class Meter:
    """Sums of loss, token accuracy and decoded L1 over batches (and ranks, with ``reduce``).

    Slots of ``sums``: loss * samples, samples, correct action tokens, action tokens, then |decoded - true| per
    action dimension (D).
    """

    def __init__(self, action_tokenizer: ActionTokenizer, names: list[str], device: torch.device):
        self.tok, self.names = action_tokenizer, names
        self.sums = torch.zeros(4 + action_tokenizer.action_dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, actions: torch.Tensor) -> None:
        D, lo = self.tok.action_dim, self.tok.token_offset
        pred = logits[:, :D, lo : lo + self.tok.n_bins].argmax(-1) + lo  # (B, D): argmax over action tokens only
        decoded = torch.from_numpy(self.tok.decode(pred.cpu().numpy())).to(actions)  # (B, D)
        B = len(pred)
        self.sums[0] += loss.detach().double() * B
        self.sums[1] += B
        self.sums[2] += (pred == targets[:, :D]).sum()
        self.sums[3] += B * D
        self.sums[4:] += (decoded - actions).abs().sum(0)

    def reduce(self) -> dict:
        """Means over everything added since the last call, on every rank; resets the sums."""
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.sums.zero_()
        n = max(sums[1].item(), 1)
        per_dim = (sums[4:] / n).tolist()
        return {"loss": sums[0].item() / n, "action_accuracy": sums[2].item() / max(sums[3].item(), 1),
                "action_l1": float(np.mean(per_dim)), "action_l1_per_dim": dict(zip(self.names, per_dim)),
                "samples": int(sums[1].item())}


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: int, tok: ActionTokenizer,
               sigma: float, autocast, plan: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SFT loss of a ``Collator`` batch (on the model's device, without ``actions``), and the logits and targets
    of the D action tokens and EOS of its last ``rows`` rows, the action rows (for the ``Meter``).

    A grounded batch (``build_queries``, with co-training rows first) is scored on every labelled token: plan,
    actions and EOS of the action rows, the answers of the query rows (``vla.grounding.sequence_loss``: Gaussian
    targets over the bins for location and action tokens alike); a plain one on its actions and EOS only; a parallel
    one (``vla.parallel.parallel_loss``) on its slots and co-training answers."""
    if "targets" in batch:
        return parallel_loss(model, batch, tok, sigma, autocast, plan)
    if "answer_starts" not in batch:
        with autocast():
            logits, targets = action_logits(model, batch)
        return action_loss(logits, targets, tok, sigma), logits, targets
    with autocast():
        logits, targets, valid = scored_logits(model, batch)
    loss = sequence_loss(logits, targets, valid, slice(tok.token_offset, tok.token_offset + tok.n_bins), sigma)
    scored = slice(plan, plan + tok.action_dim + 1)
    return loss, logits[-rows:, scored], targets[-rows:, scored]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, meter: Meter, device: torch.device, autocast, sigma: float = 0.0,
             plan: int = 0) -> dict:
    """Metrics of ``model`` (unwrapped) over ``batches``, reduced over ranks; the loss is the training loss."""
    model.eval()
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "actions"}
        loss, logits, targets = batch_loss(model, inputs, len(batch["actions"]), meter.tok, sigma, autocast, plan)
        meter.add(loss, logits, targets, batch["actions"].to(device))
    model.train()
    return meter.reduce()


def _diagnostics_table(tok: ActionTokenizer, diag: dict, names: list[str]) -> str:
    lines = [f"action tokenizer: ids [{tok.token_offset}, {tok.token_offset + tok.n_bins}), {diag['n']} train frames",
             f"  {'dim':<10}{'bins used':>10}{'clipped':>9}{'rt err mean':>13}{'rt err max':>12}"]
    for d, name in enumerate(names):
        lines.append(f"  {name:<10}{diag['bins_used'][d]:>6}/{tok.n_bins:<3}{diag['clipped_fraction'][d]:>9.3f}"
                     f"{diag['roundtrip_abs_error_mean'][d]:>13.2e}{diag['roundtrip_abs_error_max'][d]:>12.2e}")
    return "\n".join(lines)


# ---- the trainer ----


class SFT:
    """SFT as a ``vla.loop.Trainer``: the dataset's frames, the action-token loss, token accuracy and decoded L1."""

    name, rate, resume_keys, resume_files = "sft", "samples_per_s", ("dataset_name", "model"), ()

    def __init__(self, cfg: SFTConfig, env: Dist):
        self.cfg, self.env = cfg, env
        self.ds = open_dataset(cfg.dataset, ("action", "observation.state") if cfg.model.proprio else ("action",))
        self.dataset_name = Path(cfg.dataset).resolve().name
        ds = self.ds
        dims = len(ds.stats["action"]["q01"])
        self.names = ds.info["features"]["action"].get("names") or [f"a{d}" for d in range(dims)]
        self.train_eps, self.val_eps = split_episodes(len(ds.episodes), cfg.train.val_fraction, cfg.train.seed)

    def record(self) -> dict:
        return {**asdict(self.cfg), "dataset_name": self.dataset_name}

    def build(self, resume_from: Path | None) -> torch.nn.Module:
        tc, env, ds = self.cfg.train, self.env, self.ds
        self.vla, self.action_tok = build_model(self.cfg, ds, resume_from)
        self.frames = FrameDataset(ds, self.action_tok, action_chunk(self.vla.model))
        self.train_frames = [i for ep in self.train_eps for i in ds.episode_frames(ep)]
        val_frames = [i for ep in self.val_eps for i in ds.episode_frames(ep)]
        val_frames = sorted({val_frames[int(i)] for i in np.linspace(0, len(val_frames) - 1, tc.val_max_samples)}
                            if val_frames else ())
        grounded = tc.grounded or bool(tc.cotrain)
        self.queries = Queries(self.vla, instruction_templates(ds)) if grounded else None
        self.plan = plan_tokens(self.vla.model)
        collate = Collator(self.vla, tc.seed, env.rank, False, self.queries if tc.grounded else None)
        mine = val_frames[env.rank :: env.world]
        self.val_batches = [collate([self.frames[(0, b, i)] for i in mine[s : s + tc.batch_size]])
                            for b, s in enumerate(range(0, len(mine), tc.batch_size))]
        self.meter = Meter(self.action_tok, self.names, env.device)
        model = self.vla.model.to(env.device).train()
        self.parameters = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def items(self) -> list[int]:
        return self.train_frames

    def start(self, out: Path, resume_from: Path | None) -> None:
        if self.env.rank == 0:
            diag = self.action_tok.diagnostics(self.frames.actions[self.train_frames])
            (out / "action_diagnostics.json").write_text(json.dumps(diag))
            tqdm.write(_diagnostics_table(self.action_tok, diag, self.names))

    def describe(self) -> str:
        lora = f" ({self.trainable / 1e6:.3f}M trainable: LoRA)" if self.cfg.model.lora.r else ""
        return (f"{self.parameters / 1e6:.2f}M parameters{lora} on {self.env.device} x{self.env.world}; "
                f"{len(self.train_eps)} train / {len(self.val_eps)} val episodes; effective batch "
                f"{self.effective_batch}")

    @property
    def effective_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.env.world

    def batches(self, keys: Iterable[list[tuple[int, int, int]]]) -> Iterator[dict[str, torch.Tensor]]:
        tc = self.cfg.train
        return iter(DataLoader(self.frames, batch_sampler=keys, num_workers=tc.num_workers,
                               collate_fn=Collator(self.vla, tc.seed, self.env.rank, tc.augment, self.queries,
                                                   tc.cotrain),
                               pin_memory=self.env.device.type == "cuda"))

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device, actions = self.env.device, batch.pop("actions")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss, logits, targets = batch_loss(model, batch, len(actions), self.action_tok, self.cfg.train.label_sigma,
                                           self.env.autocast, self.plan)
        self.meter.add(loss, logits, targets, actions.to(device))
        return loss

    def train_metrics(self) -> dict:
        return self.meter.reduce()

    def validate(self, model: torch.nn.Module) -> dict | None:
        if not self.val_batches:
            return None
        meter = Meter(self.action_tok, self.names, self.env.device)
        return evaluate(model, self.val_batches, meter, self.env.device, self.env.autocast, self.cfg.train.label_sigma,
                        self.plan)

    def save(self, path: Path) -> None:
        save_checkpoint(self.vla, {self.dataset_name: self.action_tok}, path)

    def summary(self, result: LoopResult) -> dict:
        return {
            **{k: (result.train or {}).get(k) for k in ("loss", "action_accuracy", "action_l1", "action_l1_per_dim")},
            "val": result.val, "samples_per_s": result.rate, "effective_batch": self.effective_batch,
            "world_size": self.env.world, "parameters": self.parameters,
            "trainable_parameters": self.trainable, "dataset": self.dataset_name,
            "train_episodes": len(self.train_eps), "val_episodes": len(self.val_eps),
            "weights_digests": result.digests,
        }


def train(cfg: SFTConfig) -> dict:
    """Run SFT as configured (see the module docstring); return the summary also written to summary.json."""
    require(cfg, "dataset", "output_dir")
    with distributed(cfg.train.device) as env:
        return run(SFT(cfg, env), cfg.train, Path(cfg.output_dir), cfg.resume, env)
