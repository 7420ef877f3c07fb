"""Direct preference optimisation (DPO) of a VLA on judged rollout pairs, against its frozen SFT reference.

The objective's pure functions live in ``vla.dpo_loss`` (TRL v0.7's shape). Here: the pair batches of a preference
set (``store.preferences.PreferenceSet``, written by ``harness.preferences``), the frozen reference's log-probs, and
``train_dpo(cfg)``: the DPO trainer in ``vla.loop.run``, on one process.

Log-probabilities are those the policy samples from: the softmax over the action-token ids only (``VLAPolicy``'s
``log_probs``), summed over the D action tokens of a step. A chunked policy's step (``vla.parallel``) is scored on
the frame its chunk was predicted from (``t - chunk_offset``), its action's slots of that chunk, with the chunk's
plan at offset 0 only. A trajectory's log-probability is the sum over its steps
(GRAPE's trajectory-wise preference optimisation, ``level=trajectory``); ``level=step`` instead makes every aligned
step i < min(T_chosen, T_rejected) of a pair its own DPO example. Every micro-batch is one forward over all the
frames of its chosen and rejected rollouts (right-padded, logits only at the scored positions). The reference
log-probs are computed once per frame with the initial (SFT) model and stored, so the reference is never loaded
during training. An optional SFT term ``alpha * nll`` (mean negative log-prob per action token of the chosen steps)
keeps the chosen actions likely (RPO); ``dpop_lambda`` (DPO-Positive) penalises a chosen trajectory that has become
less likely than under the reference. ``logps/chosen_shift`` (nats per token of the chosen steps against the
reference) is logged, and ``collapse_nats`` warns once when it falls below minus that many nats.

Besides what the loop writes into ``cfg.output_dir`` (config.json, metrics.jsonl with TRL's names such as
rewards/chosen and rewards/accuracies, tb/, checkpoints/step-N/, final/ for ``VLAPolicy.from_pretrained``,
summary.json): ``reference_logps.parquet`` (episode_index, logps (T,)), the frozen reference's per-step log-probs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from store.errors import MISSING, UsageError, require
from store.files import write_parquet
from store.intact import read_parquet
from store.preferences import PAIR_FILTERS, PreferenceSet
from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import ACTION_STATS_FILE, load_action_tokenizers, pick_action_tokenizer, save_checkpoint
from vla.grounding import plan_tokens
from vla.inputs import IGNORE_INDEX, build_inputs, model_inputs
from vla.loop import Dist, LoopConfig, LoopResult, distributed, run, split_episodes
from vla.dpo_loss import LOSSES, chosen_shift, dpo_loss, dpo_metrics, sequence_logps
from vla.model import VLA, WEIGHT_FILES, load_model
from vla.parallel import is_parallel, step_inputs as parallel_step_inputs, target_logps
from vla.run_state import weights_digest

REFERENCE_FILE = "reference_logps.parquet"
LEVELS = ("trajectory", "step")
RESUME_KEYS = ("policy", "preferences", "pairs", "level", "loss_type", "beta", "alpha", "dpop_lambda", "unnorm_key")


def action_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: slice) -> torch.Tensor:
    """(B,) summed log-probs of each row's action tokens (and a grounded model's plan tokens, which share their ids)
    under the softmax over the action ids ``ids``.

    ``batch`` comes from ``step_inputs`` (right-padded); the LM head runs only from the position before the
    earliest scored token on. A parallel model's batch (with ``targets``) is scored by ``vla.parallel.target_logps``.
    """
    if "targets" in batch:
        return target_logps(model, batch, ids)
    first = int((batch["labels"] != IGNORE_INDEX).float().argmax(dim=1).min())  # the earliest scored token
    keep = batch["input_ids"].shape[1] - first + 1
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits[..., ids]  # (B, keep, n_bins)
    labels = batch["labels"][:, -keep:]  # (B, keep)
    is_action = (labels >= ids.start) & (labels < ids.stop)
    return sequence_logps(logits, torch.where(is_action, labels - ids.start, IGNORE_INDEX))


# ---- config ----


@dataclass
class DPOConfig:
    policy: str = MISSING  # SFT checkpoint directory (final/): the initial policy and the frozen reference
    preferences: str = MISSING  # a preference set (the output_dir of scripts/collect_preferences.py)
    output_dir: str = MISSING
    resume: bool = False  # continue from the latest checkpoint in output_dir
    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    level: str = "trajectory"  # trajectory: one example per pair; step: one per aligned step of a pair
    alpha: float = 0.0  # weight of the SFT (NLL) term on the chosen steps; 0 disables
    dpop_lambda: float = 0.0  # DPO-Positive (vla.dpo_loss): penalty on a chosen log-ratio below 0; 0 is plain DPO
    collapse_nats: float | None = 1.0  # warn when the chosen steps lose this many nats per token; null: never
    pairs: str = "all"  # all | chosen_success: only the pairs whose chosen rollout succeeded
    ref_batch_frames: int = 64  # frames per forward while computing the reference log-probs
    unnorm_key: str | None = None  # which action statistics of a multi-dataset checkpoint
    # The loop: batch_size counts pairs (all their frames go through one forward); seed sets the start split and
    # the pair order; val_fraction holds out start states, and eval_every validates on their pairs.
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=200, batch_size=2, lr=2e-5, weight_decay=0.0, warmup_steps=10, save_every=100, eval_every=50))

    def __post_init__(self) -> None:
        if self.ref_batch_frames < 1:
            raise UsageError(f"ref_batch_frames={self.ref_batch_frames} must be >= 1; raise it")
        if self.alpha < 0 or self.dpop_lambda < 0:
            raise UsageError(f"alpha={self.alpha} and dpop_lambda={self.dpop_lambda} must be >= 0 (0 turns them off)")
        if self.collapse_nats is not None and not self.collapse_nats > 0:
            raise UsageError(f"collapse_nats={self.collapse_nats} must be > 0, or null to never warn")
        if not self.beta > 0:
            raise UsageError(f"beta={self.beta} must be > 0 (0.1 is usual)")
        if self.loss_type not in LOSSES or self.level not in LEVELS:
            raise UsageError(f"loss_type={self.loss_type!r} must be one of {sorted(LOSSES)} and level={self.level!r} "
                             f"one of {list(LEVELS)}")
        if self.pairs not in PAIR_FILTERS:
            raise UsageError(f"pairs={self.pairs!r} must be one of {list(PAIR_FILTERS)}")


# ---- pair batches and the reference ----


def step_inputs(vla: VLA, images: np.ndarray, instructions: list[str], token_ids: np.ndarray, states: np.ndarray,
                offsets: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """``build_inputs`` over a policy's emitted token ids (n, P + D): a grounded model's P plan tokens, then the
    actions (``VLAPolicy`` info ``token_ids``); a parallel model's ``vla.parallel.step_inputs``, with ``offsets``."""
    if is_parallel(vla.model):
        return parallel_step_inputs(vla, images, instructions, token_ids, states, offsets)
    P = plan_tokens(vla.model)
    return build_inputs(vla, images, instructions, token_ids[:, P:], states, plan_ids=token_ids[:, :P] if P else None)


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
    images, token_ids, states, offsets = (np.concatenate([p[i] for p in parts]) for i in (0, 2, 3, 4))
    inputs = step_inputs(vla, images, [t for p in parts for t in p[1]], token_ids, states, offsets)
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
    losses, chosen_rewards, rejected_rewards = dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                                        cfg.dpop_lambda)
    labels = batch["inputs"]["targets" if "targets" in batch["inputs"] else "labels"]
    scored = ((labels >= ids.start) & (labels < ids.stop)).sum(dim=1)  # (N,) plan and action tokens per frame
    tokens = scored.new_zeros(2 * n).index_add(0, batch["segments"].to(scored.device), scored)[:n]  # (n,) chosen
    nll = -pi[:n].sum() / int(tokens.sum())  # per scored token of the chosen steps
    return {"objective": losses.mean() + cfg.alpha * nll, "losses": losses.detach(), "nll": nll.detach(),
            "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "logps_chosen": pi[:n].detach(), "logps_rejected": pi[n:].detach(),
            "shift": chosen_shift(pi[:n], ref[:n], tokens).detach().reshape(1)}


def window_metrics(outs: list[dict], alpha: float) -> dict:
    """Metrics over the ``pair_step`` outputs of a log window or a validation pass."""
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("losses", "chosen_rewards", "rejected_rewards",
                                                        "logps_chosen", "logps_rejected")}
    metrics = {**dpo_metrics(cat["losses"], cat["chosen_rewards"], cat["rejected_rewards"]),
               "logps/chosen": cat["logps_chosen"].mean().item(),
               "logps/rejected": cat["logps_rejected"].mean().item(),
               "logps/chosen_shift": torch.cat([o["shift"] for o in outs]).mean().item(),
               "examples": len(cat["losses"])}
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
        steps = prefs.steps(ep)
        chunks = []
        for s in range(0, len(steps[0]), batch_frames):
            batch = step_inputs(vla, *(part[s : s + batch_frames] for part in steps))
            with autocast():
                chunks.append(action_logps(model, {k: v.to(device) for k, v in batch.items()}, ids).double().cpu())
        out[ep] = torch.cat(chunks).numpy()
    if was_training:
        _train_mode(model)
    return out


def _write_reference(path: Path, ref: dict[int, np.ndarray], policy: str, digest: str) -> None:
    table = pa.table({"episode_index": pa.array(list(ref), pa.int64()),
                      "logps": pa.array([v.tolist() for v in ref.values()], pa.list_(pa.float64()))})
    write_parquet(path, table.replace_schema_metadata({"policy": policy, "weights_digest": digest}))


def _read_reference(path: Path, prefs: PreferenceSet) -> dict[int, np.ndarray]:
    table = read_parquet(path, "choose another output_dir (a fresh run writes the reference log-probs first)")
    ref = {r["episode_index"]: np.asarray(r["logps"]) for r in table.to_pylist()}
    if any(ep not in ref or len(ref[ep]) != len(prefs.token_ids[ep]) for ep in prefs.episodes()):
        raise UsageError(f"{path} does not match preferences={prefs.root}; resume with the same preferences or "
                         "choose another output_dir")
    return ref


# ---- the trainer ----


def _open_policy(path: str, unnorm_key: str | None) -> tuple[dict[str, ActionTokenizer], ActionTokenizer]:
    """The checkpoint's action statistics and the ones in use, after checking that ``path`` holds a model."""
    root = Path(path)
    for names, what in ((["config.json"], "it is not a model checkpoint"),
                        (list(WEIGHT_FILES), "it has no weights"),
                        ([ACTION_STATS_FILE], "it has no action statistics")):
        if not any((root / name).is_file() for name in names):
            hint = " (a training run: point to its final/)" if (root / "final").is_dir() else ""
            raise UsageError(f"policy={path} holds no {names[0]}, so {what}; pass the final/ directory written by "
                             f"scripts/train_sft.py{hint}")
    try:
        tokenizers = load_action_tokenizers(root)
        return tokenizers, pick_action_tokenizer(tokenizers, unnorm_key)
    except UsageError as e:
        raise UsageError(f"policy={path}: {e}") from None


def _load(path: Path, what: str) -> VLA:
    try:
        return load_model(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{what}={path}: {e}") from None


def _train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode with batch-norm statistics frozen, so that at step 0 the policy scores every frame exactly as its
    frozen reference does (FastVLM's ResNet has batch norm; a DPO batch of a few rollouts would otherwise normalise
    with its own statistics, far from the SFT ones)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


class DPO:
    """DPO as a ``vla.loop.Trainer``: batches of pairs, the DPO objective, TRL's metrics, validation on the pairs of
    held-out start states."""

    name, rate, resume_keys, resume_files = "dpo", "pairs_per_s", RESUME_KEYS, (REFERENCE_FILE,)

    def __init__(self, cfg: DPOConfig, env: Dist):
        self.cfg, self.env = cfg, env
        self.prefs = PreferenceSet(cfg.preferences, cfg.pairs)
        self.action_tokenizers, tok = _open_policy(cfg.policy, cfg.unnorm_key)
        plan = json.loads((Path(cfg.policy) / "config.json").read_text()).get("plan_tokens") or 0
        self.prefs.check_action_tokens(tok, plan)
        self.ids = slice(tok.token_offset, tok.token_offset + tok.n_bins)
        starts = sorted({p["start_index"] for p in self.prefs.pairs})
        _, val_starts = split_episodes(len(starts), cfg.train.val_fraction, cfg.train.seed)
        val_set = {starts[i] for i in val_starts}
        self.train_pairs = [i for i, p in enumerate(self.prefs.pairs) if p["start_index"] not in val_set]
        self.val_pairs = [i for i, p in enumerate(self.prefs.pairs) if p["start_index"] in val_set]
        self.window: list[dict] = []  # pair_step outputs since the last log
        self.lowest_shift = 0.0  # the lowest logps/chosen_shift logged in this process (the collapse guard)

    def record(self) -> dict:
        return {**asdict(self.cfg), "policy": str(Path(self.cfg.policy).resolve()),
                "preferences": str(Path(self.cfg.preferences).resolve())}

    def build(self, resume_from: Path | None) -> torch.nn.Module:
        self.vla = _load(resume_from, "checkpoint") if resume_from else _load(Path(self.cfg.policy), "policy")
        return _train_mode(self.vla.model.to(self.env.device))

    def items(self) -> list[int]:
        return self.train_pairs

    def start(self, out: Path, resume_from: Path | None) -> None:
        if resume_from is None:  # the model is still the reference
            ref = reference_logps(self.vla, self.prefs, self.ids, self.env.device, self.cfg.ref_batch_frames,
                                  self.env.autocast)
            _write_reference(out / REFERENCE_FILE, ref, str(Path(self.cfg.policy).resolve()),
                             weights_digest(self.vla.model))
        self.ref = _read_reference(out / REFERENCE_FILE, self.prefs)

    def describe(self) -> str:
        c = self.cfg
        return (f"DPO ({c.level} level, {c.loss_type}, beta {c.beta}) on {len(self.train_pairs)} train / "
                f"{len(self.val_pairs)} val pairs")

    def _batch(self, pair_indices: list[int]) -> dict:
        return pair_batch(self.prefs, [self.prefs.pairs[i] for i in pair_indices], self.cfg.level, self.vla, self.ref)

    def batches(self, keys: Iterable[list[tuple[int, int, int]]]) -> Iterator[dict]:
        return (self._batch([k[2] for k in batch]) for batch in keys)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        with self.env.autocast():
            result = pair_step(model, batch, self.ids, self.cfg, self.env.device)
        self.window.append(result)
        return result["objective"]

    def train_metrics(self) -> dict:
        metrics, self.window = window_metrics(self.window, self.cfg.alpha), []
        shift, limit = metrics["logps/chosen_shift"], self.cfg.collapse_nats
        if limit is not None and shift < -limit and self.lowest_shift >= -limit:
            tqdm.write(f"warning: the chosen steps have lost {-shift:.2f} nats per token against the reference "
                       f"(collapse_nats={limit}): DPO is making both sides of its pairs unlikely; try dpop_lambda=50, "
                       "alpha > 0 or a lower train.lr")
        self.lowest_shift = min(self.lowest_shift, shift)
        return metrics

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict | None:
        if not self.val_pairs:
            return None
        model.eval()
        size = self.cfg.train.batch_size
        with self.env.autocast():
            outs = [pair_step(model, self._batch(self.val_pairs[s : s + size]), self.ids, self.cfg, self.env.device)
                    for s in range(0, len(self.val_pairs), size)]
        _train_mode(model)
        return window_metrics(outs, self.cfg.alpha)

    def save(self, path: Path) -> None:
        save_checkpoint(self.vla, self.action_tokenizers, path)

    def summary(self, result: LoopResult) -> dict:
        c = self.cfg
        collapsed = c.collapse_nats is not None and self.lowest_shift < -c.collapse_nats
        return {"level": c.level, "loss_type": c.loss_type, "beta": c.beta, "alpha": c.alpha,
                "dpop_lambda": c.dpop_lambda, "chosen_shift_min": self.lowest_shift, "collapsed": collapsed,
                "train": result.train,
                "val": result.val, "train_pairs": len(self.train_pairs), "val_pairs": len(self.val_pairs),
                "policy": str(Path(c.policy).resolve()), "preferences": str(self.prefs.root.resolve()),
                "weights_digest": result.digests[0]}


def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO as configured (see the module docstring); return the summary also written to summary.json."""
    require(cfg, "policy", "preferences", "output_dir")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("DPO runs in one process; start scripts/train_dpo.py with python, not torchrun")
    with distributed(cfg.train.device) as env:
        return run(DPO(cfg, env), cfg.train, Path(cfg.output_dir), cfg.resume, env)
