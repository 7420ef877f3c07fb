"""The VLA as a policy: observations -> one prompt forward -> constrained decoding of the action tokens -> actions.

Decoding reads only the logits of the contiguous action-token ids (``ActionTokenizer.token_offset`` onwards), so no
other token can ever be chosen. The first token comes from the Hugging Face forward over the prompt (the image and
the instruction), which also fills the KV cache; the other D - 1 tokens come from ``vla.decoding`` (a hand-written
lean decoder where the text model allows, else the model's own cached forward). A parallel model
(``vla.parallel``) predicts all its tokens, a chunk of K actions, in one forward pass instead, and
``vla.chunking`` executes the chunk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from vla.action_tokenizer import ActionTokenizer
from vla.checkpoint import load_action_tokenizers, pick_action_tokenizer
from vla.chunking import ENSEMBLE_DECAY, ChunkExecution
from vla.decoding import Decoding
from vla.grounding import PLAN_TOKENS, offset_tokenizer, plan_tokens
from vla.inputs import build_inputs, build_slots, model_inputs
from vla.model import VLA, load_model
from vla.parallel import action_chunk, is_parallel, num_slots, parallel_blocker, slot_logits

Observation = Mapping[str, Any]  # {"image": (H, W, 3) uint8, "state": (S,) float32, "instruction": str}

def action_confidence(probs: np.ndarray) -> np.ndarray:
    """Confidence of each action: the geometric mean of its D token probabilities, (..., D) -> (...).

    The one definition shared by the policy, evaluation and DPO. It equals ``exp(log_probs / D)``, where
    ``log_probs`` is the action's summed token log-probability, so it lies in (0, 1] and compares actions of any D.
    """
    probs = np.asarray(probs, dtype=np.float64)
    return np.exp(np.log(np.clip(probs, 1e-45, None)).mean(axis=-1))


class VLAPolicy:
    """``reset()`` / ``act(obs) -> (action, info)`` over a VLA: greedy (temperature 0) or sampled action tokens,
    from the smallest set of bins whose probability reaches ``top_p`` (nucleus sampling, as Hugging Face's
    ``generate``; 1 samples from every bin).

    ``obs`` is ``{"image": (H, W, 3) uint8, "instruction": str, ...}``; other keys (``state``) are ignored, as in
    OpenVLA. ``info`` holds ``token_ids`` (D,) int64, ``probs`` (D,) float32, the temperature-1 probability of each
    chosen token among the action tokens, ``confidence`` (``action_confidence(probs)``) and ``log_probs``, the sum
    of the chosen tokens' log-probabilities under the same distribution (what DPO scores). A grounded model
    (``vla.grounding.plan_tokens``: P > 0) first emits its plan, the named object's place, decoded like the actions:
    then ``token_ids`` is (P + D,), plan first, ``log_probs`` sums all P + D tokens, ``probs`` and ``confidence``
    read the actions only, ``plan`` (2,) is the decoded place (x, y) in metres and, for a plan with the tip's offset
    (P = 4, ``train.plan_offset``), ``plan_offset`` (2,) that offset in metres. ``act_batch`` does the
    same for N observations in one padded batch, with a leading N axis everywhere.

    Sampling draws from a ``torch.Generator`` seeded with ``seed``; ``reset(seed)`` reseeds it, with the
    constructor's seed when ``seed`` is None (like the scripted expert), so a rollout replays exactly. A batch
    draws its rows jointly, so sampled actions of a batch differ from those of single calls; greedy ones do not.
    ``fast=False`` forces the model's own cached forward for every token instead of the lean decoder.

    A parallel model (``vla.parallel``) draws every token of a chunk of K actions in one forward pass and executes
    the chunk as ``chunk_execution`` says (``vla.chunking``: ``open_loop``, or ``ensemble`` with ACT's
    ``ensemble_decay``); ``info`` then also holds ``chunk_offset``, the steps since the executed action's chunk was
    predicted, and ``log_probs`` counts a plan at offset 0 only. Its rows keep their chunks from call to call:
    ``reset`` drops them, ``keep_rows`` tells which rows of a batch go on when episodes leave it.

    The gripper (the action tokenizer's ``absolute_dims``, a 0 = close / 1 = open command) is executed as exactly 0
    or 1, thresholded at 0.5 (``binarize_gripper``, as OpenVLA's evaluations binarize it): its bin centres are never
    0 or 1, and the hand a bin short of open (0.994, fingers 0.5 mm short) is a state no scripted demo shows, which
    a policy reading its proprio state took for a grasp under way (docs/training.md). Token statistics, ``info``
    and DPO's log-probabilities do not change; ``binarize_gripper=False`` executes the bin centres.
    """

    def __init__(
        self,
        vla: VLA,
        action_tokenizer: ActionTokenizer,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        device: str | torch.device | None = None,
        fast: bool = True,
        chunk_execution: str = "open_loop",
        ensemble_decay: float = ENSEMBLE_DECAY,
        binarize_gripper: bool = True,
    ) -> None:
        if not (np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = sample from every bin), got {top_p}")
        vocab = vla.model.config.get_text_config().vocab_size
        lo, hi = action_tokenizer.token_offset, action_tokenizer.token_offset + action_tokenizer.n_bins
        if hi > vocab:
            raise ValueError(
                f"action token ids [{lo}, {hi}) exceed the model's vocabulary of {vocab}; "
                "use the action tokenizer saved with this checkpoint"
            )
        if device is not None:
            vla.model.to(device)
        self.vla, self.action_tokenizer, self.seed = vla, action_tokenizer, seed
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.binary_dims = list(action_tokenizer.absolute_dims) if binarize_gripper else []
        self.device = next(vla.model.parameters()).device
        self.ids = slice(lo, hi)
        self.decoding = Decoding(vla.model, self.ids, fast)
        self.plan = plan_tokens(vla.model)
        if self.plan and (vla.location_tokenizer is None or vla.location_tokenizer.token_offset != lo):
            raise ValueError("this model emits plan tokens but has no location tokenizer over its action ids; "
                             "load it with its location_tokenizer.json")
        self.offsets = offset_tokenizer(vla.location_tokenizer) if self.plan > PLAN_TOKENS else None
        self.fallback_reason = self.decoding.fallback_reason  # None: the lean decoder runs
        self.chunks = None
        if is_parallel(vla.model):
            if blocker := parallel_blocker(vla.model):
                raise ValueError(f"this parallel model cannot run: {blocker}")
            self.slots = num_slots(vla.model, action_tokenizer.action_dim)
            self.chunks = ChunkExecution(chunk_execution, action_chunk(vla.model), self.plan, action_tokenizer,
                                         ensemble_decay)
        self.generator = torch.Generator(self.device)
        self.reset()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, unnorm_key: str | None = None, **kwargs) -> VLAPolicy:
        """A policy from a checkpoint directory of ``save_checkpoint``; ``unnorm_key`` picks the action statistics."""
        action_tokenizer = pick_action_tokenizer(load_action_tokenizers(path), unnorm_key)
        return cls(load_model(path), action_tokenizer, **kwargs)

    def reset(self, seed: int | None = None) -> None:
        self.generator.manual_seed(self.seed if seed is None else seed)
        if self.chunks is not None:
            self.chunks.reset()

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Only the rows ``rows`` (indices into the last ``act_batch``, in order) go on: a chunked policy keeps their
        chunks. Nothing to do for an autoregressive model."""
        if self.chunks is not None:
            self.chunks.keep_rows(rows)

    def act(self, obs: Observation) -> tuple[np.ndarray, dict[str, Any]]:
        """One observation -> action (D,) float32 and info (see the class docstring)."""
        actions, info = self.act_batch([obs])
        return actions[0], {key: value[0] for key, value in info.items()}

    def act_batch(self, observations: Sequence[Observation]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """N observations -> actions (N, D) float32 and info arrays with a leading N axis."""
        images = np.stack([np.asarray(obs["image"]) for obs in observations])  # (N, H, W, 3)
        instructions = [obs["instruction"] for obs in observations]
        states = np.stack([np.asarray(obs["state"]) for obs in observations]) if "state" in observations[0] else None
        extra = {}
        if self.chunks is None:
            token_ids, log_probs = (t.cpu().numpy() for t in self.action_tokens(images, instructions, states))
        else:
            def predict(rows: np.ndarray) -> tuple[np.ndarray, ...]:
                return self.chunk_tokens(images[rows], [instructions[r] for r in rows],
                                         None if states is None else states[rows])

            token_ids, log_probs, extra["chunk_offset"] = self.chunks.step(len(observations), predict)
        P = self.plan
        probs = np.exp(log_probs[:, P:]).astype(np.float32)
        info = {
            "token_ids": token_ids,
            "probs": probs,
            "confidence": action_confidence(probs).astype(np.float32),
            "log_probs": log_probs.sum(axis=-1, dtype=np.float64),
            **extra,
        }
        if P:
            place = np.concatenate([token_ids[:, :2], token_ids[:, :1]], axis=1)  # (N, 3): z is not decoded
            info["plan"] = self.vla.location_tokenizer.decode(place)[:, :2].astype(np.float32)
            if self.offsets is not None:
                info["plan_offset"] = self.offsets.decode(token_ids[:, 2:P]).astype(np.float32)
        actions = self.action_tokenizer.decode(token_ids[:, P:])
        actions[:, self.binary_dims] = (actions[:, self.binary_dims] >= 0.5).astype(np.float32)
        return actions, info

    @torch.inference_mode()
    def action_tokens(self, images: np.ndarray, instructions: Sequence[str], states: np.ndarray | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, H, W, 3), N instructions and proprio states (N, S) (read only by a model with a state
        tokenizer) -> the emitted token ids (N, P + D), plan then actions, and their log-probs (N, P + D)."""
        with self._eval() as model:
            batch = build_inputs(self.vla, images, instructions, states=states)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = model(**model_inputs(batch), use_cache=True, logits_to_keep=1)
            D = self.plan + self.action_tokenizer.action_dim
            decoder = self.decoding.start(out.cache, batch, D - 1)
            logits = out.logits[:, -1, self.ids]  # (N, n_bins)
            bins, log_probs = [], []
            for d in range(D):
                chosen, log_prob = self._choose(logits)
                bins.append(chosen)
                log_probs.append(log_prob)
                if d + 1 < D:
                    logits = decoder.step(chosen)
        return torch.stack(bins, dim=1) + self.ids.start, torch.stack(log_probs, dim=1)

    @torch.inference_mode()
    def chunk_tokens(self, images: np.ndarray, instructions: Sequence[str], states: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A parallel model's one forward pass over N observations -> the token ids of its S = P + K * D slots
        (N, S) int64, their log-probs (N, S) float64, and the log-probs over the bins of the first action's D slots
        (N, D, n_bins) (a ``vla.chunking.Predict``)."""
        with self._eval() as model:
            batch = build_slots(self.vla, images, instructions, self.slots, states)
            logits = slot_logits(model, {k: v.to(self.device) for k, v in batch.items()}, self.slots)[..., self.ids]
        chosen, log_probs = self._choose(logits.flatten(0, 1))  # (N * S,) each
        N, D = len(instructions), self.action_tokenizer.action_dim
        first = torch.log_softmax(logits[:, self.plan : self.plan + D].float(), dim=-1)  # (N, D, n_bins)
        return ((chosen.view(N, -1) + self.ids.start).cpu().numpy(), log_probs.view(N, -1).double().cpu().numpy(),
                first.double().cpu().numpy())

    @contextmanager
    def _eval(self) -> Iterator[torch.nn.Module]:
        """The model in eval mode, its train mode restored afterwards."""
        model = self.vla.model
        was_training = model.training
        if was_training:
            model.eval()
        try:
            yield model
        finally:
            if was_training:
                model.train()

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, n_bins) over the action tokens -> chosen bins (N,) and their temperature-1 log-probs (N,)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if self.temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            if self.top_p < 1:
                probs = nucleus(probs, self.top_p)
            chosen = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return chosen, log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities (N, K) -> the same with every bin outside each row's nucleus zeroed: the most probable bins
    whose cumulative probability reaches ``top_p`` (always at least the first). Rows are left unnormalised, as
    ``torch.multinomial`` takes weights."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a bin already reaches top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def predict_action(vla: VLA, image: np.ndarray, instruction: str, action_tokenizer: ActionTokenizer,
                   state: np.ndarray | None = None) -> np.ndarray:
    """One uint8 image (H, W, 3), one instruction (and the proprio state (S,) for a model that reads it) -> the
    greedy action (D,) float32, like OpenVLA's ``predict_action``. It builds a policy each call (fusing the
    weights); for a rollout, keep one ``VLAPolicy``."""
    obs = {"image": image, "instruction": instruction, **({} if state is None else {"state": state})}
    action, _ = VLAPolicy(vla, action_tokenizer).act(obs)
    return action
