"""Direct preference optimisation (DPO) of a VLA on judged rollout pairs, against its frozen SFT reference.

Pure functions first, in TRL v0.7's shape: ``sequence_logps`` -> ``dpo_loss`` -> ``dpo_metrics``. Then the preference
set on disk (``PreferenceSet``, written by scripts/collect_preferences.py) and ``train_dpo(cfg)``, which reuses
vla/train.py's optimizer, checkpoints, resume and logging.

Log-probabilities are those the policy samples from: the softmax over the action-token ids only (``VLAPolicy``'s
``log_probs``), summed over the D action tokens of a step. A trajectory's log-probability is the sum over its steps
(GRAPE's trajectory-wise preference optimisation, ``level=trajectory``); ``level=step`` instead makes every aligned
step i < min(T_chosen, T_rejected) of a pair its own DPO example. Every micro-batch is one forward over all the
frames of its chosen and rejected rollouts (right-padded, logits only at the scored positions). The reference
log-probs are computed once per frame with the initial (SFT) model and stored, so the reference is never loaded
during training. An optional SFT term ``alpha * nll`` (mean negative log-prob per action token of the chosen steps)
keeps the chosen actions likely (RPO).

What ``train_dpo`` writes into ``cfg.output_dir``:
    config.json                the run's DPOConfig; a resumed run must name the same policy, preferences and loss
    reference_logps.parquet    episode_index, logps (T,): the frozen reference's per-step log-probs
    metrics.jsonl, tb/         train and val metrics (TRL's names: rewards/chosen, rewards/accuracies, ...)
    checkpoints/step-N/        HF checkpoint + action_tokenizer.json + trainer_state.{json,safetensors}
    final/                     VLAPolicy.from_pretrained(final) loads it
    summary.json               headline figures
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from safetensors.torch import save_file
from tqdm import tqdm

from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import ACTION_STATS_FILE, load_action_tokenizers, pick_action_tokenizer, save_checkpoint
from store.lerobot import LeRobotDataset
from store.files import atomic_write
from vla.inputs import IGNORE_INDEX, build_inputs, model_inputs
from vla.model import VLA, load_model
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
from vla.train import EpochBatchSampler, MetricsLogger, make_optimizer, split_episodes

PAIR_FILTERS = ("all", "chosen_success")  # which pairs of a preference set DPO trains and validates on
PAIRS_FILE = "pairs.parquet"  # pair_index, start_index, chosen, rejected (episode indices), scores, axis, reason
ROLLOUTS_FILE = "rollouts.parquet"  # one row per episode: episode_index, token_ids (T, D), scores, ...
REFERENCE_FILE = "reference_logps.parquet"
LEVELS = ("trajectory", "step")


class DPOError(ValueError):
    """A problem with the run's inputs (config, policy, preferences, output_dir); the message names the fix."""


# ---- pure functions ----


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probs of the labelled tokens of each row: logits (B, L, V), labels (B, L) -> (B,).

    ``build_inputs``' convention: ``logits[:, t]`` scores ``labels[:, t + 1]``; labels equal to IGNORE_INDEX (-100)
    and positions where ``mask`` (B, L) is false do not count.
    """
    labels = labels[:, 1:]  # (B, L - 1)
    keep = labels != IGNORE_INDEX
    if mask is not None:
        keep = keep & mask[:, 1:].bool()
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L - 1, V)
    picked = logps.gather(2, torch.where(keep, labels, 0).unsqueeze(2)).squeeze(2)  # (B, L - 1)
    return torch.where(keep, picked, 0.0).sum(dim=1)


# z = (log pi_c - log pi_r) - (log ref_c - log ref_r), the policy's log-ratio margin over the reference's
LOSSES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sigmoid": lambda z, beta: -F.logsigmoid(beta * z),  # DPO (Rafailov et al. 2023)
    "hinge": lambda z, beta: torch.relu(1 - beta * z),  # SLiC (Zhao et al. 2023)
    "ipo": lambda z, beta: (z - 1 / (2 * beta)) ** 2,  # IPO (Azar et al. 2023)
}


def dpo_loss(
    pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-pair losses (P,) and implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected (P,), the
    rewards detached. Inputs are summed log-probs (P,) of the policy and the reference."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {sorted(LOSSES)}")
    z = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
    return LOSSES[loss_type](z, beta), chosen_rewards, rejected_rewards


def dpo_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Means over pairs, named as TRL names them."""
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }


def action_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: slice) -> torch.Tensor:
    """(B,) summed log-probs of each row's action tokens under the softmax over the action ids ``ids``.

    ``batch`` comes from ``build_inputs`` with action ids (right-padded); the LM head runs only from the position
    before the earliest action token on.
    """
    keep = batch["input_ids"].shape[1] - int(batch["action_positions"].min()) + 1
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits[..., ids]  # (B, keep, n_bins)
    labels = batch["labels"][:, -keep:]  # (B, keep)
    is_action = (labels >= ids.start) & (labels < ids.stop)
    return sequence_logps(logits, torch.where(is_action, labels - ids.start, IGNORE_INDEX))


# ---- config ----


@dataclass
class DPOConfig:
    policy: str  # SFT checkpoint directory (final/): the initial policy and the frozen reference
    preferences: str  # output_dir of scripts/collect_preferences.py
    output_dir: str
    resume: bool = False  # continue from the latest checkpoint in output_dir
    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    level: str = "trajectory"  # trajectory: one example per pair; step: one per aligned step of a pair
    alpha: float = 0.0  # weight of the SFT (NLL) term on the chosen steps; 0 disables
    pairs: str = "all"  # all | chosen_success: only the pairs whose chosen rollout succeeded
    steps: int = 200  # optimizer steps
    batch_size: int = 2  # pairs per micro-batch (all their frames go through one forward)
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warmup, then cosine down to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0  # start split and pair order
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    eval_every: int = 50  # validation on the pairs of held-out start states; 0 disables
    val_fraction: float = 0.1  # fraction of start states held out (at least one when > 0 and there are two)
    ref_batch_frames: int = 64  # frames per forward while computing the reference log-probs
    unnorm_key: str | None = None  # which action statistics of a multi-dataset checkpoint
    device: str = "auto"  # auto (CUDA with bf16 autocast when present), cpu or cuda

    def __post_init__(self) -> None:
        if not (self.policy and self.preferences and self.output_dir):
            raise DPOError("policy, preferences and output_dir must all be set; pass policy=PATH preferences=PATH "
                           "output_dir=PATH")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_last", "ref_batch_frames"):
            if getattr(self, name) < 1:
                raise DPOError(f"{name}={getattr(self, name)} must be >= 1; raise it")
        for name in ("alpha", "weight_decay", "warmup_steps", "eval_every", "seed"):
            if getattr(self, name) < 0:
                raise DPOError(f"{name}={getattr(self, name)} must be >= 0")
        if not (self.beta > 0 and self.lr > 0):
            raise DPOError(f"beta={self.beta} and lr={self.lr} must be > 0 (beta 0.1 and lr 2e-5 are usual)")
        if self.loss_type not in LOSSES or self.level not in LEVELS:
            raise DPOError(f"loss_type={self.loss_type!r} must be one of {sorted(LOSSES)} and level={self.level!r} "
                           f"one of {list(LEVELS)}")
        if self.pairs not in PAIR_FILTERS:
            raise DPOError(f"pairs={self.pairs!r} must be one of {list(PAIR_FILTERS)}")
        if self.warmup_steps >= self.steps:
            raise DPOError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}; lower it")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.val_fraction < 1:
            raise DPOError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1] and val_fraction="
                           f"{self.val_fraction} in [0, 1)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise DPOError(f"grad_clip={self.grad_clip} must be > 0; pass null to disable clipping")
        if self.device not in ("auto", "cpu", "cuda"):
            raise DPOError(f"device={self.device!r} is not one of auto, cpu, cuda")


def register_configs() -> None:
    """Register DPOConfig as ``dpo_schema`` in Hydra's ConfigStore (conf/train_dpo.yaml names it)."""
    ConfigStore.instance().store(name="dpo_schema", node=DPOConfig)


# ---- data ----


class PreferenceSet:
    """A preference set on disk: its rollouts as a LeRobot dataset, their action token ids and the judged pairs."""

    def __init__(self, root: str | os.PathLike, pairs: str = "all"):
        """``pairs``: all, or chosen_success (only the pairs whose chosen rollout succeeded)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise DPOError(f"preferences={root} does not exist; collect it with scripts/collect_preferences.py "
                           "or fix the path")
        for name in (PAIRS_FILE, ROLLOUTS_FILE):
            if not (self.root / name).is_file():
                raise DPOError(f"preferences={root} holds no {name}; rerun scripts/collect_preferences.py with the "
                               "same arguments until it writes summary.json")
        self.frames = LeRobotDataset(self.root)
        rows = pq.read_table(self.root / ROLLOUTS_FILE, columns=["episode_index", "token_ids", "success"]).to_pylist()
        self.token_ids = {r["episode_index"]: np.asarray(r["token_ids"], dtype=np.int64) for r in rows}  # (T, D)
        success = {r["episode_index"]: r["success"] for r in rows}
        self.pairs = pq.read_table(self.root / PAIRS_FILE, columns=["start_index", "chosen", "rejected"]).to_pylist()
        if not self.pairs:
            raise DPOError(f"preferences={root} holds no pairs (no start state's rollouts differed by more than "
                           "the margin); collect more starts or rollouts_per_start, or lower margin")
        if pairs == "chosen_success":
            self.pairs = [p for p in self.pairs if success[p["chosen"]]]
            if not self.pairs:
                raise DPOError(f"preferences={root} holds no pair whose chosen rollout succeeded; pass pairs=all, "
                               "or collect more starts")
        for ep in self.episodes():
            if ep not in self.token_ids or len(self.token_ids[ep]) != len(self.frames.episode_frames(ep)):
                raise DPOError(f"preferences={root}: episode {ep} has no token ids for each of its frames in "
                               f"{ROLLOUTS_FILE}; collect the preference set again")

    def episodes(self) -> list[int]:
        """Episode indices that appear in some pair."""
        return sorted({p[side] for p in self.pairs for side in ("chosen", "rejected")})

    def check_action_tokens(self, tok: ActionTokenizer) -> None:
        lo, hi = tok.token_offset, tok.token_offset + tok.n_bins
        for ep in self.episodes():
            ids = self.token_ids[ep]
            if ids.shape[1] != tok.action_dim or ids.min() < lo or ids.max() >= hi:
                raise DPOError(f"preferences={self.root}: episode {ep} holds token ids outside the policy's "
                               f"{tok.action_dim} x [{lo}, {hi}) action tokens; collect preferences with this policy")

    def steps(self, ep: int, n: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """The first ``n`` (all) steps of episode ``ep``: images (n, H, W, 3) uint8, instructions, token ids (n, D),
        proprio states (n, S)."""
        items = [self.frames[i] for i in self.frames.episode_frames(ep)[:n]]
        return (np.stack([it["image"] for it in items]), [self.frames.episodes[ep]["instruction"]] * len(items),
                self.token_ids[ep][: len(items)], np.stack([it["state"] for it in items]))


def pair_batch(prefs: PreferenceSet, pairs: list[dict], level: str, vla: VLA, ref: dict[int, np.ndarray]) -> dict:
    """One forward's worth of pairs: ``inputs`` (build_inputs over every frame, chosen rollouts first),
    ``segments`` (N,): the example each frame's log-prob adds to (chosen examples 0..n-1, rejected n..2n-1, aligned),
    ``ref`` (2n,): the reference log-prob of each example, and ``n``."""
    steps, segments, frame_ref, n = ([], []), ([], []), ([], []), 0
    for pair in pairs:
        c, r = pair["chosen"], pair["rejected"]
        if level == "trajectory":
            lengths, examples = (len(ref[c]), len(ref[r])), ([n] * len(ref[c]), [n] * len(ref[r]))
            n += 1
        else:  # aligned steps i < min(T_c, T_r), one example each
            m = min(len(ref[c]), len(ref[r]))
            lengths, examples = (m, m), (list(range(n, n + m)),) * 2
            n += m
        for side, ep in enumerate((c, r)):
            steps[side].append(prefs.steps(ep, lengths[side]))
            segments[side].extend(examples[side])
            frame_ref[side].append(ref[ep][: lengths[side]])
    parts = steps[0] + steps[1]
    segment = np.asarray(segments[0] + [s + n for s in segments[1]])  # (N,)
    example_ref = np.zeros(2 * n)
    np.add.at(example_ref, segment, np.concatenate(frame_ref[0] + frame_ref[1]))
    inputs = build_inputs(vla, np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]],
                          np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))
    return {"inputs": inputs, "segments": torch.from_numpy(segment), "ref": torch.from_numpy(example_ref),
            "n": n}


def example_logps(model: torch.nn.Module, batch: dict, ids: slice, device: torch.device) -> torch.Tensor:
    """Summed policy log-probs (2n,) float64 of a ``pair_batch``'s examples: chosen first, then rejected."""
    logps = action_logps(model, {k: v.to(device) for k, v in batch["inputs"].items()}, ids)  # (N,)
    return logps.new_zeros(2 * batch["n"], dtype=torch.float64).index_add(0, batch["segments"].to(device),
                                                                         logps.double())


def pair_step(model: torch.nn.Module, batch: dict, ids: slice, cfg: DPOConfig, device: torch.device) -> dict:
    """The objective of one ``pair_batch`` (``objective``, with gradient) and its per-example values (detached)."""
    n = batch["n"]
    pi, ref = example_logps(model, batch, ids, device), batch["ref"].to(device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type)
    tokens = int((batch["segments"] < n).sum()) * batch["inputs"]["action_positions"].shape[1]
    nll = -pi[:n].sum() / tokens  # per action token of the chosen steps
    return {"objective": losses.mean() + cfg.alpha * nll, "losses": losses.detach(), "nll": nll.detach(),
            "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "logps_chosen": pi[:n].detach(), "logps_rejected": pi[n:].detach()}


def window_metrics(outs: list[dict], alpha: float) -> dict:
    """Metrics over the ``pair_step`` outputs of a log window or a validation pass."""
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("losses", "chosen_rewards", "rejected_rewards",
                                                        "logps_chosen", "logps_rejected")}
    metrics = {**dpo_metrics(cat["losses"], cat["chosen_rewards"], cat["rejected_rewards"]),
               "logps/chosen": cat["logps_chosen"].mean().item(),
               "logps/rejected": cat["logps_rejected"].mean().item(), "examples": len(cat["losses"])}
    if alpha:
        metrics["nll_loss"] = float(np.mean([o["nll"].item() for o in outs]))
    return metrics


@torch.no_grad()
def reference_logps(vla: VLA, prefs: PreferenceSet, ids: slice, device: torch.device, batch_frames: int,
                    autocast: Callable = nullcontext) -> dict[int, np.ndarray]:
    """Per-step log-probs (T,) float64 of every paired episode under ``vla`` (the frozen reference)."""
    model = vla.model
    was_training = model.training
    model.eval()
    out = {}
    for ep in tqdm(prefs.episodes(), desc="reference", unit="ep", leave=False):
        images, instructions, token_ids, states = prefs.steps(ep)
        chunks = []
        for s in range(0, len(images), batch_frames):
            window = slice(s, s + batch_frames)
            batch = build_inputs(vla, images[window], instructions[window], token_ids[window], states[window])
            with autocast():
                chunks.append(action_logps(model, {k: v.to(device) for k, v in batch.items()}, ids).double().cpu())
        out[ep] = torch.cat(chunks).numpy()
    if was_training:
        _train_mode(model)
    return out


def _write_reference(path: Path, ref: dict[int, np.ndarray], policy: str, digest: str) -> None:
    table = pa.table({"episode_index": pa.array(list(ref), pa.int64()),
                      "logps": pa.array([v.tolist() for v in ref.values()], pa.list_(pa.float64()))})
    table = table.replace_schema_metadata({"policy": policy, "weights_digest": digest})
    atomic_write(path, lambda p: pq.write_table(table, p))


def _read_reference(path: Path, prefs: PreferenceSet) -> dict[int, np.ndarray]:
    ref = {r["episode_index"]: np.asarray(r["logps"]) for r in pq.read_table(path).to_pylist()}
    if any(ep not in ref or len(ref[ep]) != len(prefs.token_ids[ep]) for ep in prefs.episodes()):
        raise DPOError(f"{path} does not match preferences={prefs.root}; resume with the same preferences or "
                       "choose another output_dir")
    return ref


# ---- the run ----


def _check_known_keys(cfg: DPOConfig) -> None:
    """Refuse keys that Hydra's ``+key=value`` slipped past the schema."""
    extra = sorted(set(vars(cfg)) - {f.name for f in fields(cfg)})
    if extra:
        raise DPOError(f"unknown config key {extra[0]}; check its spelling against vla.dpo.DPOConfig")


RESUME_KEYS = ("policy", "preferences", "pairs", "level", "loss_type", "beta", "alpha", "unnorm_key")


def _config_record(cfg: DPOConfig) -> dict:
    return {**asdict(cfg), "policy": str(Path(cfg.policy).resolve()),
            "preferences": str(Path(cfg.preferences).resolve())}


def _open_policy(path: str, unnorm_key: str | None) -> tuple[dict[str, ActionTokenizer], ActionTokenizer]:
    """The checkpoint's action statistics and the ones in use, after checking that ``path`` holds a model."""
    root = Path(path)
    for names, what in ((["config.json"], "it is not a model checkpoint"),
                        (["model.safetensors", "model.safetensors.index.json"], "it has no weights"),
                        ([ACTION_STATS_FILE], "it has no action statistics")):
        if not any((root / name).is_file() for name in names):
            hint = " (a training run: point to its final/)" if (root / "final").is_dir() else ""
            raise DPOError(f"policy={path} holds no {names[0]}, so {what}; pass the final/ directory written by "
                           f"scripts/train_sft.py{hint}")
    try:
        tokenizers = load_action_tokenizers(root)
        return tokenizers, pick_action_tokenizer(tokenizers, unnorm_key)
    except (KeyError, ValueError) as e:
        raise DPOError(f"policy={path}: {e.args[0]}") from None


def _load(path: Path, what: str) -> VLA:
    try:
        return load_model(path)
    except (FileNotFoundError, ValueError) as e:
        raise DPOError(f"{what}={path}: {e}") from None


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DPOError("device=cuda but no CUDA device is visible; pass device=auto or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode with batch-norm statistics frozen, so that at step 0 the policy scores every frame exactly as its
    frozen reference does (FastVLM's ResNet has batch norm; a DPO batch of a few rollouts would otherwise normalise
    with its own statistics, far from the SFT ones)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO as configured (see the module docstring); return the summary also written to summary.json."""
    _check_known_keys(cfg)
    t0, out, device = time.perf_counter(), Path(cfg.output_dir), _device(cfg.device)
    prefs = PreferenceSet(cfg.preferences, cfg.pairs)
    action_tokenizers, tok = _open_policy(cfg.policy, cfg.unnorm_key)
    prefs.check_action_tokens(tok)
    starts = sorted({p["start_index"] for p in prefs.pairs})
    _, val_starts = split_episodes(len(starts), cfg.val_fraction, cfg.seed)
    val_set = {starts[i] for i in val_starts}
    train_pairs = [i for i, p in enumerate(prefs.pairs) if p["start_index"] not in val_set]
    val_pairs = [i for i, p in enumerate(prefs.pairs) if p["start_index"] in val_set]
    if len(train_pairs) < cfg.batch_size:
        raise DPOError(f"{len(train_pairs)} training pairs cannot fill one batch of batch_size={cfg.batch_size}; "
                       "lower batch_size or val_fraction, or collect more starts")

    resume_from = check_output_dir(out, cfg.resume, _config_record(cfg), RESUME_KEYS, DPOError)
    if resume_from is not None and not (out / REFERENCE_FILE).is_file():
        raise DPOError(f"{out / REFERENCE_FILE} is missing, so {out} cannot resume; choose another output_dir")
    if resume_from is not None and (out / "summary.json").is_file() \
            and json.loads((resume_from / STATE_FILE).read_text())["step"] == cfg.steps:
        tqdm.write(f"{out} already finished {cfg.steps} steps; raise steps to train further")
        return json.loads((out / "summary.json").read_text())
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    vla = _load(resume_from, "checkpoint") if resume_from else _load(Path(cfg.policy), "policy")
    model, ids = _train_mode(vla.model.to(device)), slice(tok.token_offset, tok.token_offset + tok.n_bins)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "checkpoints").glob(".tmp-*"):  # a checkpoint write that a crash interrupted
        shutil.rmtree(stale)
    (out / "config.json").write_text(json.dumps(_config_record(cfg), indent=2))
    if resume_from is None:  # the model is still the reference
        ref = reference_logps(vla, prefs, ids, device, cfg.ref_batch_frames, autocast)
        _write_reference(out / REFERENCE_FILE, ref, str(Path(cfg.policy).resolve()), weights_digest(model))
    ref = _read_reference(out / REFERENCE_FILE, prefs)

    # make_optimizer reads lr, weight_decay, warmup_steps, steps and min_lr_ratio, which DPOConfig shares with SFT
    params, optimizer, scheduler = make_optimizer(model, cfg)
    position = {"step": 0, "epoch": 0, "batch": 0, "world_size": 1, "samples_seen": 0}
    if resume_from is not None:
        position = restore_trainer_state(resume_from, optimizer, scheduler)
        if position["step"] > cfg.steps:
            raise DPOError(f"{resume_from} is past steps={cfg.steps}; raise steps to continue")
    sampler = EpochBatchSampler(train_pairs, cfg.batch_size, cfg.seed, 0, 1, position["epoch"], position["batch"])
    log, start_step = MetricsLogger(out, 0, position["step"]), position["step"]
    tqdm.write(f"DPO ({cfg.level} level, {cfg.loss_type}, beta {cfg.beta}) on {len(train_pairs)} train / "
               f"{len(val_pairs)} val pairs; " + (f"resuming from {resume_from}" if resume_from else "fresh start"))

    def batch_of(pair_indices: list[int]) -> dict:
        return pair_batch(prefs, [prefs.pairs[i] for i in pair_indices], cfg.level, vla, ref)

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        with autocast():
            outs = [pair_step(model, batch_of(val_pairs[s : s + cfg.batch_size]), ids, cfg, device)
                    for s in range(0, len(val_pairs), cfg.batch_size)]
        _train_mode(model)
        return window_metrics(outs, cfg.alpha)

    def save(step: int) -> None:
        state, tensors = trainer_state(optimizer, scheduler, position)

        def write(tmp: Path) -> None:
            save_checkpoint(vla, action_tokenizers, tmp)
            save_file(tensors, tmp / STATE_TENSORS)
            (tmp / STATE_FILE).write_text(json.dumps(state))

        with no_hf_progress_bars():
            write_atomically(out / "checkpoints" / f"step-{step}", write)
        prune_checkpoints(out / "checkpoints", cfg.keep_last)

    batches, window, window_t, train_metrics, val_metrics = iter(sampler), [], time.perf_counter(), None, None
    for step in tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps, desc="dpo"):
        for _ in range(cfg.grad_accum):
            keys = next(batches)
            with autocast():
                result = pair_step(model, batch_of([k[2] for k in keys]), ids, cfg, device)
            (result["objective"] / cfg.grad_accum).backward()
            window.append(result)
        epoch, b = keys[0][0], keys[0][1]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        epoch, b = (epoch + 1, 0) if b + 1 == sampler.batches_per_epoch else (epoch, b + 1)
        position = {"step": step, "epoch": epoch, "batch": b, "world_size": 1,
                    "samples_seen": position["samples_seen"] + cfg.batch_size * cfg.grad_accum}
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            train_metrics = {**window_metrics(window, cfg.alpha), "lr": lr,
                             "pairs_per_s": cfg.batch_size * len(window) / (now - window_t)}
            if grad_norm is not None:
                train_metrics["grad_norm"] = grad_norm.item()
            log(step, "train", train_metrics)
            window, window_t = [], now
        if val_pairs and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_metrics = validate()
            log(step, "val", val_metrics)
            window_t = time.perf_counter()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save(step)
            window_t = time.perf_counter()

    with no_hf_progress_bars():
        write_atomically(out / "final", lambda tmp: save_checkpoint(vla, action_tokenizers, tmp))
    summary = {
        "steps": cfg.steps, "resumed_from_step": start_step if resume_from else None, "level": cfg.level,
        "loss_type": cfg.loss_type, "beta": cfg.beta, "alpha": cfg.alpha, "train": train_metrics, "val": val_metrics,
        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "policy": str(Path(cfg.policy).resolve()),
        "preferences": str(prefs.root.resolve()), "checkpoint": str(out / "final"), "device": str(device),
        "seconds": time.perf_counter() - t0, "weights_digest": weights_digest(model),
    }
    write_json(out / "summary.json", summary)
    log.close()
    tqdm.write(f"wrote {out / 'final'} and {out / 'summary.json'}")
    return summary
