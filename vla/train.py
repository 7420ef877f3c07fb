"""Supervised fine-tuning (SFT) of a VLA on a LeRobot dataset: cross-entropy on the action tokens and EOS only.

``train(cfg)`` is the whole run, on one process or under ``torchrun`` (DDP). What it writes into ``cfg.output_dir``
(rank 0 only):
    config.json                    the run's SFTConfig; a resumed run must name the same dataset and model
    action_diagnostics.json        bin usage, clipped fraction, round-trip error of the training actions
    metrics.jsonl                  one line per logged train window and per validation pass
    tb/                            TensorBoard events
    checkpoints/step-N/            HF checkpoint + action_tokenizer.json + trainer_state.{json,safetensors}
    final/                         HF checkpoint + action_tokenizer.json, for vla.checkpoint.load_checkpoint
    summary.json                   headline figures

Exact resume: every random choice comes from a generator seeded by (seed, stream, epoch, batch, rank), so the data
order and augmentation of a batch depend only on its position, which the trainer state records with the optimizer,
the scheduler and the global RNGs (safetensors for tensors, JSON for the rest; no pickles).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vla.action_tokenizer import GRIPPER_DIM, ActionTokenizer
from vla.checkpoint import save_checkpoint
from store.lerobot import DatasetError, Episode, LeRobotDataset
from store.writer import DatasetWriter
from vla.inputs import PROMPT_TEMPLATE, build_inputs, model_inputs
from vla.model import VLA, VLAModelConfig, build_vla, load_model
from vla.run_state import (
    STATE_FILE,
    STATE_TENSORS,
    check_output_dir,
    no_hf_progress_bars,
    prune_checkpoints,
    restore_trainer_state,
    trainer_state,
    weights_digest,
)
from store.files import write_atomically, write_json
from vla.text_tokenizer import action_token, action_token_offset, build_tokenizer

_SHUFFLE, _AUGMENT, _SPLIT = 0, 1, 2  # independent random streams
SHIFT, BRIGHTNESS, CONTRAST = 0.06, 0.15, 0.15  # augmentation: max shift (fraction of the side), jitter ranges


class SFTError(ValueError):
    """A problem with the run's inputs (config, output_dir, pretrained model); the message names the fix."""


@dataclass
class ModelConfig(VLAModelConfig):
    """VLAModelConfig for a random init, or ``pretrained``: a local HF checkpoint dir whose own sizes then win."""

    pretrained: str | None = None
    # Read the robot's proprio state (tip position, orientation, gripper width) as 7 tokens after the image
    # tokens. A checkpoint that already reads it (resumed or pretrained) keeps its state statistics.
    proprio: bool = True


@dataclass
class TrainConfig:
    steps: int = 3000  # optimizer steps
    batch_size: int = 16  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.01  # on matrices and embeddings, not on biases and norms
    warmup_steps: int = 100  # linear warmup from 0, then cosine down to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; null disables
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2  # step checkpoints kept
    eval_every: int = 250  # validation on held-out episodes; 0 disables
    val_fraction: float = 0.1  # fraction of episodes held out (at least one when > 0 and there are two)
    val_max_samples: int = 512  # frames per validation pass, evenly spaced over the held-out episodes
    augment: bool = False  # random shift + brightness/contrast jitter (shifts blur where things are: off by default)
    label_sigma: float = 4.0  # > 0: Gaussian soft targets over neighbouring action bins (std in bins); 0: one-hot
    num_workers: int = 0  # DataLoader worker processes (PNG decoding, preprocessing, tokenization)
    vocab_size: int = 1024  # BPE vocabulary of a new text tokenizer (ignored with model.pretrained)
    action_bins: int = 256
    gripper_dim: int | None = GRIPPER_DIM  # action dimension kept in absolute [0, 1] bins; null for none
    device: str = "auto"  # auto (CUDA with bf16 autocast when present), cpu or cuda

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_last", "val_max_samples"):
            if getattr(self, name) < 1:
                raise SFTError(f"train.{name}={getattr(self, name)} must be >= 1; raise it")
        for name in ("warmup_steps", "eval_every", "num_workers", "weight_decay", "seed"):
            if getattr(self, name) < 0:
                raise SFTError(f"train.{name}={getattr(self, name)} must be >= 0; raise it")
        if self.lr <= 0:
            raise SFTError(f"train.lr={self.lr} must be > 0; pass a positive learning rate such as 3e-4")
        if self.warmup_steps >= self.steps:
            raise SFTError(f"train.warmup_steps={self.warmup_steps} must be < train.steps={self.steps}; lower it")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SFTError(f"train.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]; 0.1 is usual")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise SFTError(f"train.grad_clip={self.grad_clip} must be > 0; pass null to disable clipping")
        if not 0 <= self.val_fraction < 1:
            raise SFTError(f"train.val_fraction={self.val_fraction} must lie in [0, 1); 0 disables validation")
        if self.label_sigma < 0:
            raise SFTError(f"train.label_sigma={self.label_sigma} must be >= 0 (bins); 0 trains on one-hot targets")
        if not 2 <= self.action_bins <= 1000:
            raise SFTError(f"train.action_bins={self.action_bins} must lie in [2, 1000]; 256 is usual")
        if self.vocab_size < 260:
            raise SFTError(f"train.vocab_size={self.vocab_size} must be >= 260 (256 bytes + 4 special tokens)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SFTError(f"train.device={self.device!r} is not one of auto, cpu, cuda")


@dataclass
class SFTConfig:
    dataset: str  # LeRobot dataset root; its directory name keys the action statistics in checkpoints
    output_dir: str
    resume: bool = False  # continue from the latest checkpoint in output_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.dataset or not self.output_dir:
            raise SFTError("dataset and output_dir must both be set; pass dataset=PATH output_dir=PATH")


def register_configs() -> None:
    """Register the SFTConfig schema as ``sft_schema`` in Hydra's ConfigStore (conf/train_sft.yaml names it)."""
    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)


# ---- data ----


def _seed(*keys: int) -> int:
    """A 32-bit seed mixed from integer keys (numpy SeedSequence), for independent reproducible streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def open_dataset(path: str, features: tuple[str, ...] = ("action",)) -> LeRobotDataset:
    """The dataset at ``path``, checked for what training needs: q01/q99 of ``features`` in meta/stats.json."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset={path} does not exist; generate it with scripts/generate_demos.py or fix the path")
    ds = LeRobotDataset(root)
    for feature in features:
        missing = [k for k in ("q01", "q99") if k not in ds.stats.get(feature, {})]
        if missing:
            raise DatasetError(f"{root / 'meta/stats.json'} has no {feature} {'/'.join(missing)}; "
                               "regenerate the dataset (store.writer.DatasetWriter writes them)")
    return ds


def split_episodes(n_episodes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) episode indices: a seeded random ``val_fraction`` held out, at least one, never all."""
    n_val = min(max(1, round(val_fraction * n_episodes)), n_episodes - 1) if val_fraction > 0 else 0
    order = np.random.default_rng(_seed(seed, _SPLIT)).permutation(n_episodes)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class FrameDataset(Dataset):
    """Frames of a LeRobotDataset with their action token ids; indexed by (epoch, batch, frame) keys."""

    def __init__(self, ds: LeRobotDataset, action_tokenizer: ActionTokenizer):
        self.ds = ds
        self.actions = ds.columns["action"].astype(np.float32)  # (N, D)
        self.action_ids = action_tokenizer.encode(self.actions)  # (N, D)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        frame = key[2]
        item = self.ds[frame]
        return {"key": key, "image": item["image"], "instruction": item["instruction"], "state": item["state"],
                "action_ids": self.action_ids[frame], "action": self.actions[frame]}


class EpochBatchSampler(Sampler):
    """Endless batches of (epoch, batch, frame) keys, starting at ``(start_epoch, start_batch)``.

    Epoch e shuffles ``frames`` with a generator seeded by (seed, e); rank r takes every world-th frame of that
    permutation (the tail that does not fill a batch on every rank is dropped), so ranks never share a frame.
    """

    def __init__(self, frames: list[int], batch_size: int, seed: int, rank: int, world: int,
                 start_epoch: int = 0, start_batch: int = 0):
        self.frames, self.batch_size, self.seed, self.rank, self.world = frames, batch_size, seed, rank, world
        self.batches_per_epoch = len(frames) // world // batch_size
        if self.batches_per_epoch == 0:
            raise SFTError(f"{len(frames)} training frames cannot fill one batch of {batch_size} on each of {world} "
                           "processes; lower train.batch_size or train.val_fraction, or record more episodes")
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def __iter__(self):
        epoch, start = self.start_epoch, self.start_batch
        while True:
            generator = torch.Generator().manual_seed(_seed(self.seed, _SHUFFLE, epoch))
            mine = torch.randperm(len(self.frames), generator=generator)[self.rank :: self.world]
            for b in range(start, self.batches_per_epoch):
                chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, b, self.frames[i]) for i in chunk.tolist()]
            epoch, start = epoch + 1, 0


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (replicate-pad, random crop back) and brightness/contrast jitter of uint8 (B, H, W, 3) images."""
    B, H, W, _ = images.shape
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    pad = max(1, round(SHIFT * max(H, W)))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, 3, H + 2 pad, W + 2 pad)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=generator).tolist()
    x = torch.stack([padded[b, :, dy[b] : dy[b] + H, dx[b] : dx[b] + W] for b in range(B)])
    contrast = 1 + CONTRAST * (2 * torch.rand(B, 1, 1, 1, generator=generator) - 1)
    brightness = 255 * BRIGHTNESS * (2 * torch.rand(B, 1, 1, 1, generator=generator) - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class Collator:
    """Frames -> a ``build_inputs`` batch plus ``actions`` (B, D) float and ``position`` (epoch, batch)."""

    def __init__(self, vla: VLA, seed: int, rank: int, augment: bool):
        self.vla, self.seed, self.rank, self.augment = vla, seed, rank, augment

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        epoch, b, _ = items[0]["key"]
        images = torch.from_numpy(np.stack([it["image"] for it in items]))  # (B, H, W, 3)
        if self.augment:
            generator = torch.Generator().manual_seed(_seed(self.seed, _AUGMENT, epoch, b, self.rank))
            images = augment_images(images, generator)
        batch = build_inputs(self.vla, images, [it["instruction"] for it in items],
                             np.stack([it["action_ids"] for it in items]), np.stack([it["state"] for it in items]))
        batch["actions"] = torch.from_numpy(np.stack([it["action"] for it in items]))
        batch["position"] = torch.tensor([epoch, b])
        return batch


# ---- model, loss, metrics ----


def load_pretrained(path: str, n_bins: int) -> VLA:
    """``load_model(path)`` with one-line errors for directories that cannot be fine-tuned here."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise SFTError(f"model.pretrained={path} holds no config.json, so it is not a Hugging Face checkpoint; "
                       "pass the directory written by save_pretrained")
    if not any((root / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise SFTError(f"model.pretrained={path} holds no model weights (model.safetensors); "
                       "save the model with save_pretrained (safetensors) into that directory")
    try:
        vla = load_model(root)
        offset = action_token_offset(vla.tokenizer, n_bins)
    except (FileNotFoundError, ValueError) as e:
        if "action token" in str(e):
            raise SFTError(f"model.pretrained={path}: its tokenizer lacks the {n_bins} action tokens "
                           f"{action_token(0)}..{action_token(n_bins - 1)} (contiguous ids); add them and resize the "
                           "embeddings, or start from a checkpoint written by scripts/train_sft.py") from None
        raise SFTError(f"model.pretrained={path}: {e}") from None
    if offset + n_bins > vla.model.config.text_config.vocab_size:
        raise SFTError(f"model.pretrained={path}: the action tokens lie beyond the model's vocabulary "
                       f"({vla.model.config.text_config.vocab_size}); resize its token embeddings")
    return vla


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
    """Mean cross-entropy over the D action positions and the EOS of ``action_logits``.

    With ``sigma > 0`` the target of an action position is a Gaussian over the bins, centred on the true bin with
    std ``sigma`` bins and renormalised over the n_bins action ids (no mass on any other token); the EOS stays
    one-hot. Bins are ordered, so a prediction one bin off should cost less than one 100 bins off; one-hot
    targets cannot say so, soft ones spread the evidence of each frame over its neighbours.
    """
    logits = logits.float()
    if sigma <= 0:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    D, lo, n = tok.action_dim, tok.token_offset, tok.n_bins
    logp = logits.log_softmax(-1)  # (B, D + 1, V)
    bins = torch.arange(n, device=logits.device, dtype=torch.float32)
    q = torch.exp(-0.5 * ((bins - (targets[:, :D, None] - lo).float()) / sigma) ** 2)  # (B, D, n)
    q = q / q.sum(-1, keepdim=True)
    action_nll = -(q * logp[:, :D, lo : lo + n]).sum(-1)  # (B, D)
    eos_nll = -logp[:, D:].gather(-1, targets[:, D:, None]).squeeze(-1)  # (B, 1)
    return torch.cat([action_nll, eos_nll], dim=1).mean()


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, meter: Meter, device: torch.device, autocast, sigma: float = 0.0) -> dict:
    """Metrics of ``model`` (unwrapped) over ``batches``, reduced over ranks; the loss is the training loss."""
    model.eval()
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("actions", "position")}
        with autocast():
            logits, targets = action_logits(model, inputs)
        loss = action_loss(logits, targets, meter.tok, sigma)
        meter.add(loss, logits, targets, batch["actions"].to(device))
    model.train()
    return meter.reduce()


# ---- the run ----


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device


def _init_distributed(device: str) -> _Dist:
    """Process group from torchrun's environment (gloo on CPU, nccl on CUDA); a single process needs none."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SFTError("train.device=cuda but no CUDA device is visible; pass train.device=auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    return _Dist(dist.get_rank() if world > 1 else 0, world, target)


def _check_known_keys(cfg: SFTConfig) -> None:
    """Refuse keys that Hydra's ``+key=value`` slipped past the schema (OmegaConf sets them as attributes)."""
    for prefix, node in (("", cfg), ("model.", cfg.model), ("train.", cfg.train)):
        extra = sorted(set(vars(node)) - {f.name for f in fields(node)})
        if extra:
            raise SFTError(f"unknown config key {prefix}{extra[0]}; check its spelling against conf/ "
                           "(vla.train.SFTConfig lists every key)")


def _config_record(cfg: SFTConfig) -> dict:
    return {**asdict(cfg), "dataset_name": Path(cfg.dataset).resolve().name}


def state_tokenizer(ds: LeRobotDataset, token_offset: int, n_bins: int = 256) -> ActionTokenizer:
    """The proprio-state binning of ``model.proprio``: the action contract over the dataset's observation.state
    q01/q99, every dimension normalised (none absolute), ids in the action-token range."""
    return ActionTokenizer.from_stats(ds.stats["observation.state"], token_offset, n_bins, absolute_dims=())


def _build_model(cfg: SFTConfig, ds: LeRobotDataset, resume_from: Path | None) -> tuple[VLA, ActionTokenizer]:
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
    try:
        action_tok = ActionTokenizer.from_stats(
            ds.stats["action"], offset, tc.action_bins,
            () if tc.gripper_dim is None else (tc.gripper_dim,))
    except ValueError as e:
        raise SFTError(f"cannot tokenize the actions of {cfg.dataset}: {e}; fix train.gripper_dim or the dataset") \
            from None
    return vla, action_tok


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> tuple[list, torch.optim.AdamW, LambdaLR]:
    """(trainable params, AdamW with decay on matrices and embeddings only, warmup + cosine to lr * min_lr_ratio)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=tc.lr, fused=True)  # one fused kernel: ~45 ms a step less than the per-tensor loop on this CPU
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, tc.warmup_steps, tc.steps,
                                                            min_lr_rate=tc.min_lr_ratio)
    return params, optimizer, scheduler


def _diagnostics_table(tok: ActionTokenizer, diag: dict, names: list[str]) -> str:
    lines = [f"action tokenizer: ids [{tok.token_offset}, {tok.token_offset + tok.n_bins}), {diag['n']} train frames",
             f"  {'dim':<10}{'bins used':>10}{'clipped':>9}{'rt err mean':>13}{'rt err max':>12}"]
    for d, name in enumerate(names):
        lines.append(f"  {name:<10}{diag['bins_used'][d]:>6}/{tok.n_bins:<3}{diag['clipped_fraction'][d]:>9.3f}"
                     f"{diag['roundtrip_abs_error_mean'][d]:>13.2e}{diag['roundtrip_abs_error_max'][d]:>12.2e}")
    return "\n".join(lines)


class MetricsLogger:
    """Rank 0's metrics.jsonl, TensorBoard and console lines; other ranks log nothing."""

    def __init__(self, out: Path, rank: int, start_step: int):
        self.out, self.enabled = out, rank == 0
        if self.enabled:
            path = out / "metrics.jsonl"
            if path.is_file():  # drop what a killed run logged after its last checkpoint
                rows = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= start_step]
                path.write_text("".join(ln + "\n" for ln in rows))
            self.tb = SummaryWriter(out / "tb", purge_step=start_step + 1)

    def __call__(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        for key, value in metrics.items():
            for name, v in value.items() if isinstance(value, dict) else [("", value)]:
                self.tb.add_scalar(f"{split}/{key}/{name}".rstrip("/"), v, step)
        tqdm.write(f"[{split}] step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                          if isinstance(v, float)))

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _gather_digests(model: torch.nn.Module, env: _Dist) -> list[str]:
    """``weights_digest`` of every rank's model, in rank order."""
    if env.world == 1:
        return [weights_digest(model)]
    digest = torch.tensor(list(bytes.fromhex(weights_digest(model))), dtype=torch.uint8, device=env.device)
    gathered = [torch.empty_like(digest) for _ in range(env.world)]
    dist.all_gather(gathered, digest)
    return [bytes(t.cpu().tolist()).hex() for t in gathered]


def train(cfg: SFTConfig) -> dict:
    """Run SFT as configured (see the module docstring); return the summary also written to summary.json."""
    _check_known_keys(cfg)
    env = _init_distributed(cfg.train.device)
    try:
        return _train(cfg, env)
    finally:
        if env.world > 1:
            dist.destroy_process_group()


def _train(cfg: SFTConfig, env: _Dist) -> dict:
    t0, tc, out = time.perf_counter(), cfg.train, Path(cfg.output_dir)
    ds = open_dataset(cfg.dataset, ("action", "observation.state") if cfg.model.proprio else ("action",))
    resume_from = check_output_dir(out, cfg.resume, _config_record(cfg), ("dataset_name", "model"), SFTError)
    finished = resume_from is not None and json.loads((resume_from / STATE_FILE).read_text())["step"] == tc.steps
    if finished and (out / "summary.json").is_file():
        tqdm.write(f"{out} already finished {tc.steps} steps; raise train.steps to train further")
        return json.loads((out / "summary.json").read_text())
    dataset_name = Path(cfg.dataset).resolve().name
    names = ds.info["features"]["action"].get("names") or [f"a{d}" for d in range(len(ds.stats["action"]["q01"]))]
    train_eps, val_eps = split_episodes(len(ds.episodes), tc.val_fraction, tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)  # the initial weights; a resumed run restores the RNGs of its checkpoint below
    vla, action_tok = _build_model(cfg, ds, resume_from)
    frames = FrameDataset(ds, action_tok)
    train_frames = [i for ep in train_eps for i in ds.episode_frames(ep)]
    val_frames = [i for ep in val_eps for i in ds.episode_frames(ep)]
    val_frames = sorted({val_frames[int(i)] for i in np.linspace(0, len(val_frames) - 1, tc.val_max_samples)}
                        if val_frames else ())

    model = vla.model.to(env.device).train()
    params, optimizer, scheduler = make_optimizer(model, tc)
    position = {"step": 0, "epoch": 0, "batch": 0, "world_size": env.world, "samples_seen": 0}
    if resume_from is not None:
        position = restore_trainer_state(resume_from, optimizer, scheduler)
        if position["step"] > tc.steps:
            raise SFTError(f"{resume_from} is past train.steps={tc.steps}; raise train.steps to continue")
    sampler = EpochBatchSampler(train_frames, tc.batch_size, tc.seed, env.rank, env.world,
                                position["epoch"], position["batch"])
    if position["world_size"] != env.world:  # the position still counts, but the data order differs
        tqdm.write(f"warning: resuming a {position['world_size']}-process run on {env.world}; not an exact replay")
        sampler.start_batch = min(position["batch"], sampler.batches_per_epoch - 1)

    if env.world > 1:
        dist.barrier()  # every rank has checked output_dir before rank 0 writes into it
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob(".tmp-*"):  # a checkpoint write that a crash interrupted
            shutil.rmtree(stale)
        (out / "config.json").write_text(json.dumps(_config_record(cfg), indent=2))
        diag = action_tok.diagnostics(frames.actions[train_frames])
        (out / "action_diagnostics.json").write_text(json.dumps(diag))
        tqdm.write(_diagnostics_table(action_tok, diag, names))
    log = MetricsLogger(out, env.rank, position["step"])

    ddp = DistributedDataParallel(model, broadcast_buffers=False) if env.world > 1 else model
    on_cuda = env.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else nullcontext
    loader = DataLoader(frames, batch_sampler=sampler, collate_fn=Collator(vla, tc.seed, env.rank, tc.augment),
                        num_workers=tc.num_workers, pin_memory=on_cuda)
    val_collate, mine = Collator(vla, tc.seed, env.rank, augment=False), val_frames[env.rank :: env.world]
    val_batches = [val_collate([frames[(0, b, i)] for i in mine[s : s + tc.batch_size]])
                   for b, s in enumerate(range(0, len(mine), tc.batch_size))]
    meter = Meter(action_tok, names, env.device)
    n_params = sum(p.numel() for p in model.parameters())
    effective_batch = tc.batch_size * tc.grad_accum * env.world
    start_step = position["step"]
    if env.rank == 0:
        tqdm.write(f"{n_params / 1e6:.2f}M parameters on {env.device} x{env.world}; {len(train_eps)} train / "
                   f"{len(val_eps)} val episodes; effective batch {effective_batch}; "
                   + (f"resuming from {resume_from}" if resume_from else "fresh start"))

    def save(step: int) -> None:
        if env.rank == 0:
            state, tensors = trainer_state(optimizer, scheduler, position)

            def write(tmp: Path) -> None:
                save_checkpoint(vla, {dataset_name: action_tok}, tmp)
                save_file(tensors, tmp / STATE_TENSORS)
                (tmp / STATE_FILE).write_text(json.dumps(state))

            with no_hf_progress_bars():
                write_atomically(out / "checkpoints" / f"step-{step}", write)
            prune_checkpoints(out / "checkpoints", tc.keep_last)
        if env.world > 1:
            dist.barrier()

    bar = tqdm(total=tc.steps, initial=start_step, disable=env.rank != 0, desc="sft", dynamic_ncols=True)
    batches, train_metrics, val_metrics = iter(loader), None, None
    timed_seconds, timed_samples, window_t, window_samples = 0.0, 0, time.perf_counter(), 0
    for step in range(start_step + 1, tc.steps + 1):
        t_step = time.perf_counter()
        for micro in range(tc.grad_accum):
            batch = next(batches)
            actions, (epoch, b) = batch.pop("actions"), batch.pop("position").tolist()
            batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            sync = micro == tc.grad_accum - 1 or env.world == 1  # DDP all-reduces on the last micro-batch only
            with nullcontext() if sync else ddp.no_sync():
                with autocast():
                    logits, targets = action_logits(ddp, batch)
                loss = action_loss(logits, targets, action_tok, tc.label_sigma)
                (loss / tc.grad_accum).backward()
            meter.add(loss, logits, targets, actions.to(env.device))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip else None
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        epoch, b = (epoch + 1, 0) if b + 1 == sampler.batches_per_epoch else (epoch, b + 1)
        position = {"step": step, "epoch": epoch, "batch": b, "world_size": env.world,
                    "samples_seen": position["samples_seen"] + effective_batch}
        if step > start_step + 1 or step == tc.steps:  # the first step pays for warm-up; time the rest
            timed_seconds += time.perf_counter() - t_step
            timed_samples += effective_batch
        window_samples += effective_batch
        bar.update()

        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            train_metrics = {**meter.reduce(), "lr": lr, "samples_per_s": window_samples / (now - window_t)}
            if grad_norm is not None:
                train_metrics["grad_norm"] = grad_norm.item()
            log(step, "train", train_metrics)
            window_t, window_samples = now, 0
        if val_batches and tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
            val_metrics = evaluate(model, val_batches, Meter(action_tok, names, env.device), env.device, autocast,
                                   tc.label_sigma)
            log(step, "val", val_metrics)
            window_t = time.perf_counter()
        if step % tc.save_every == 0 or step == tc.steps:
            save(step)
            window_t = time.perf_counter()
    bar.close()
    del batches  # stops DataLoader workers

    summary = {
        "steps": tc.steps, "resumed_from_step": start_step if resume_from else None,
        **{k: (train_metrics or {}).get(k) for k in ("loss", "action_accuracy", "action_l1", "action_l1_per_dim")},
        "val": val_metrics, "samples_per_s": timed_samples / timed_seconds if timed_seconds else None,
        "seconds": time.perf_counter() - t0, "checkpoint": str(out / "final"), "effective_batch": effective_batch,
        "world_size": env.world, "device": str(env.device), "parameters": n_params, "dataset": dataset_name,
        "train_episodes": len(train_eps), "val_episodes": len(val_eps),
        "weights_digests": _gather_digests(model, env),
    }
    if env.rank == 0:
        with no_hf_progress_bars():
            write_atomically(out / "final", lambda tmp: save_checkpoint(vla, {dataset_name: action_tok}, tmp))
        write_json(out / "summary.json", summary)
        tqdm.write(f"wrote {out / 'final'} and {out / 'summary.json'}")
    log.close()
    return summary


def _naive_steps_per_s(vla: VLA, images: np.ndarray, instructions: list[str], action_ids: np.ndarray,
                       states: np.ndarray, steps: int) -> float:
    """Steps/s of a plain transformers loop on one prepared batch: ``model(**inputs)`` with the full labels (logits
    over the whole vocabulary at every position, the model's own loss), backward, a default AdamW step."""
    model = vla.model.train()
    batch = model_inputs(build_inputs(vla, images, instructions, action_ids, states))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    for i in range(steps + 1):  # the first step is an untimed warm-up
        if i == 1:
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def naive_step_throughput(steps: int = 8, batch_size: int = 16, model: VLAModelConfig | None = None,
                          image_size: int = 96) -> dict:
    """The whole SFT loop vs a naive transformers loop, side by side in this process, on the same model and batch size.

    The loop is ``train`` on a synthetic dataset (random ``image_size`` px frames, PNG decoding, augmentation, metrics
    and logging included; ``steps`` timed steps after one warm-up step, no checkpoint until the end). The naive loop
    (see ``_naive_steps_per_s``) runs on one batch of those frames before and after it, on a model of the same
    config; the faster of the two counts, so that a load change on a shared machine cannot favour the loop.
    """
    model = model or VLAModelConfig()
    rng = np.random.default_rng(0)
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    frames = batch_size * (steps + 1) // 4 + 1  # per episode, 4 episodes: one epoch covers the run
    with tempfile.TemporaryDirectory() as tmp:
        writer = DatasetWriter(Path(tmp) / "bench", fps=10, state_names=names, action_names=names, config={})
        for e in range(4):
            writer.write_episode(e, Episode(
                task="bench", instruction=f"pick up the {['red', 'blue', 'green', 'yellow'][e]} cube", seed=e,
                success=True, images=rng.integers(0, 256, (frames, image_size, image_size, 3), dtype=np.uint8),
                states=rng.normal(size=(frames, 7)).astype(np.float32),
                actions=np.concatenate([rng.normal(scale=0.01, size=(frames, 6)),
                                        rng.integers(0, 2, (frames, 1))], axis=1).astype(np.float32)))
        writer.finalize()
        cfg = SFTConfig(dataset=str(Path(tmp) / "bench"), output_dir=str(Path(tmp) / "run"),
                        model=ModelConfig(**asdict(model)),
                        train=TrainConfig(steps=steps + 1, batch_size=batch_size, warmup_steps=1, eval_every=0,
                                          val_fraction=0.0, log_every=steps + 1, save_every=steps + 1))
        ds = LeRobotDataset(cfg.dataset)
        items = [ds[i] for i in range(batch_size)]
        images, instructions = np.stack([it["image"] for it in items]), [it["instruction"] for it in items]
        states = np.stack([it["state"] for it in items])
        prompts = sorted({PROMPT_TEMPLATE.format(instruction=text) for text in ds.instructions})
        vla = build_vla(model, build_tokenizer(prompts))
        offset = action_token_offset(vla.tokenizer)
        if cfg.model.proprio:  # the same prompt as the loop's model
            vla = vla._replace(state_tokenizer=state_tokenizer(ds, offset))
        action_ids = rng.integers(offset, offset + 256, (batch_size, 7))
        naive_before = _naive_steps_per_s(vla, images, instructions, action_ids, states, steps)
        summary = train(cfg)
        naive_after = _naive_steps_per_s(vla, images, instructions, action_ids, states, steps)
    naive, loop = max(naive_before, naive_after), summary["samples_per_s"] / batch_size
    return {"batch_size": batch_size, "parameters": summary["parameters"], "threads": torch.get_num_threads(),
            "loop_steps_per_s": loop, "loop_samples_per_s": summary["samples_per_s"],
            "naive_steps_per_s": naive, "naive_samples_per_s": naive * batch_size,
            "naive_steps_per_s_before_after": [naive_before, naive_after], "speedup": loop / naive}
