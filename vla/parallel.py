"""Parallel decoding (OpenVLA-OFT): every token of a chunk of K actions from one forward pass.

A model whose ``config.action_head`` is ``"parallel"`` (saved in config.json by SFT with ``model.action_head``, and
``config.action_chunk`` = K) reads the prompt of ``vla.inputs.build_inputs`` followed by S = P + K * D slots
(``vla.inputs.build_slots``) and predicts all S tokens at once: a grounded model's P plan tokens
(``vla.grounding.plan_tokens``), then the D tokens of action 0 (this step's), of action 1 (the next step's), ...,
of action K - 1.

- Placeholders: every slot holds the pad token id. Llama and Gemma embed it with ``padding_idx``: a zero vector that
  no gradient moves, OFT's "empty action embeddings". The slots differ by position (RoPE), and from the second
  layer on by what they read. Nothing is added to the vocabulary, so any checkpoint of a supported architecture can
  be fine-tuned into a parallel one.
- Mask (``slot_mask``): the prefix attends exactly as without slots (causal; PaliGemma's prompt is one
  bidirectional block), every slot attends to the whole prefix and to every slot (one bidirectional block:
  transformers' ``block_sequence_ids``), no prefix token sees a slot and no token sees padding. The model's own
  ``create_causal_mask`` builds it, in the form its attention implementation takes (bool for SDPA, additive for
  eager, a BlockMask for flex attention).
- Scores: the logits at slot s score answer token s directly (no shift). Training scores the slots only
  (``targets``: -100 elsewhere, and on the actions of a chunk that lie past the episode's end); there is no EOS.
- A grounded model's plan sits in the same block: plan and actions are drawn jointly in the one pass, the actions
  reading the plan slots' states rather than the drawn plan tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.masking_utils import create_causal_mask

from store.errors import UsageError
from vla.action_tokenizer import ActionTokenizer
from vla.grounding import plan_tokens, scored_logits, sequence_loss
from vla.inputs import IGNORE_INDEX, build_slots
from vla.model import ARCHITECTURES, VLA

ACTION_HEADS = ("autoregressive", "parallel")
QUERY_PREFIX = "query_"  # key prefix of the co-training rows (a build_queries batch) inside a parallel SFT batch
_MASKABLE = ("sdpa", "eager", "flex_attention")  # attention implementations that apply a 4-D mask as given


def is_parallel(model: torch.nn.Module) -> bool:
    """Whether ``model`` predicts its action tokens in parallel (``config.action_head``, saved in config.json)."""
    return getattr(model.config, "action_head", None) == "parallel"


def action_chunk(model: torch.nn.Module) -> int:
    """K, the actions a parallel model predicts per forward pass; 0 for an autoregressive model (no chunk)."""
    return int(getattr(model.config, "action_chunk", None) or 1) if is_parallel(model) else 0


def num_slots(model: torch.nn.Module, action_dim: int) -> int:
    """S = P + K * D: the placeholder slots of a parallel model's forward pass."""
    return plan_tokens(model) + action_chunk(model) * action_dim


def check_action_head(head: str, chunk: int) -> None:
    """Refuse an unknown head, a chunk below 1, or a chunk with the autoregressive head."""
    if head not in ACTION_HEADS:
        raise UsageError(f"model.action_head={head!r} is not one of {list(ACTION_HEADS)}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise UsageError(f"model.action_chunk={chunk!r} must be an integer >= 1 (actions predicted per forward pass)")
    if chunk > 1 and head != "parallel":
        raise UsageError(f"model.action_chunk={chunk} needs model.action_head=parallel: the autoregressive head would "
                         f"decode {chunk} x 7 tokens one by one")


def parallel_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot decode in parallel exactly, or None when it can."""
    text = model.config.get_text_config()
    if text._attn_implementation not in _MASKABLE:
        return (f"its attention implementation {text._attn_implementation!r} cannot apply the slot mask; load it "
                f"with attn_implementation set to one of {list(_MASKABLE)}")
    if getattr(text, "sliding_window", None) is not None:
        return "its text model uses a sliding window, which the one slot mask of every layer would drop"
    if model.config.model_type not in ARCHITECTURES:
        return f"its model type {model.config.model_type!r} is not one of {sorted(ARCHITECTURES)}"
    return None


def set_action_head(model: torch.nn.Module, head: str, chunk: int) -> None:
    """Make ``model`` decode with ``head`` and chunks of ``chunk`` actions (in its config, so saved in config.json),
    or raise UsageError for a model that cannot, and for a parallel model asked to turn autoregressive (fine-tuning
    keeps a parallel checkpoint parallel, as it keeps a grounded one grounded; its chunk may change)."""
    check_action_head(head, chunk)
    if head == "autoregressive":
        if is_parallel(model):
            raise UsageError("this checkpoint predicts its actions in parallel (action_head in its config.json); "
                             "fine-tune it with model.action_head=parallel")
        return
    if blocker := parallel_blocker(model):
        raise UsageError(f"model.action_head=parallel cannot run this model: {blocker}")
    model.config.action_head, model.config.action_chunk = head, chunk


# ---- forward ----


def slot_mask(model: torch.nn.Module, batch: dict[str, torch.Tensor], slots: int) -> torch.Tensor:
    """The attention mask (B, 1, L, L) of a ``build_slots`` batch whose last ``slots`` positions are slots (module
    docstring; a BlockMask under flex attention); ``model`` may be wrapped in DistributedDataParallel."""
    model = getattr(model, "module", model)
    ids = batch["input_ids"]  # (B, L)
    prefix = 0 if ARCHITECTURES[model.config.model_type].uses_token_type_ids else -1  # -1: causal
    groups = torch.full_like(ids, prefix)
    groups[:, -slots:] = 1
    shape_only = torch.empty(*ids.shape, 0, dtype=model.dtype, device=ids.device)  # read for B, L, dtype, device
    return create_causal_mask(config=model.config.get_text_config(), inputs_embeds=shape_only,
                              attention_mask=batch["attention_mask"], cache=None,
                              position_ids=batch["position_ids"], block_sequence_ids=groups)


def slot_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], slots: int) -> torch.Tensor:
    """Logits (B, S, V) of the last ``slots`` positions of a ``build_slots`` batch: slot s scores answer token s."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values")}
    return model(**inputs, attention_mask=slot_mask(model, batch, slots), logits_to_keep=slots).logits


def parallel_inputs(
    vla: VLA, images: np.ndarray | torch.Tensor, instructions: Sequence[str], chunk_ids: np.ndarray | torch.Tensor,
    chunk_valid: np.ndarray | torch.Tensor | None = None, states: np.ndarray | None = None,
    plan_ids: np.ndarray | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A training batch: ``build_slots`` with ``targets`` (B, S): the plan ids (B, P), then each row's K actions'
    token ids ``chunk_ids`` (B, K, D); -100 where ``chunk_valid`` (B, K) is false (actions past the episode's end)."""
    targets = torch.as_tensor(chunk_ids).long().clone()  # (B, K, D)
    if targets.ndim != 3 or len(targets) != len(instructions):
        raise ValueError(f"chunk_ids must be (B={len(instructions)}, K, D), got {tuple(targets.shape)}")
    if chunk_valid is not None:
        targets[~torch.as_tensor(chunk_valid, dtype=torch.bool)] = IGNORE_INDEX
    targets = targets.flatten(1)  # (B, K * D)
    if plan_ids is not None:
        targets = torch.cat([torch.as_tensor(plan_ids).long(), targets], dim=1)
    batch = build_slots(vla, images, instructions, targets.shape[1], states)
    batch["targets"] = targets
    return batch


def step_inputs(vla: VLA, images: np.ndarray, instructions: Sequence[str], token_ids: np.ndarray,
                states: np.ndarray | None, offsets: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """DPO's batch of a parallel policy's steps. ``images``, ``states``: the frames the steps' chunks were predicted
    from; ``token_ids`` (n, P + D): the plan and the executed action (``VLAPolicy`` info); ``offsets`` (n,): which
    action of its chunk each step executed (info ``chunk_offset``; None: 0). ``targets`` score that action's D slots,
    and the P plan slots where the offset is 0 (a chunk's plan is drawn once, with its first action)."""
    P, K = plan_tokens(vla.model), action_chunk(vla.model)
    token_ids = torch.as_tensor(token_ids).long()
    n, D = token_ids.shape[0], token_ids.shape[1] - P
    offsets = torch.zeros(n, dtype=torch.long) if offsets is None else torch.as_tensor(offsets).long()
    if offsets.shape != (n,) or (offsets < 0).any() or (offsets >= K).any():
        raise ValueError(f"offsets must be (n={n},) in [0, {K}) (this model's chunk), got {offsets.tolist()}")
    targets = torch.full((n, P + K * D), IGNORE_INDEX, dtype=torch.long)
    targets[:, :P] = torch.where(offsets[:, None] == 0, token_ids[:, :P], IGNORE_INDEX)
    targets.scatter_(1, P + offsets[:, None] * D + torch.arange(D), token_ids[:, P:])
    batch = build_slots(vla, images, instructions, targets.shape[1], states)
    batch["targets"] = targets
    return batch


def target_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: slice) -> torch.Tensor:
    """(B,) summed log-probs of each row's ``targets`` under the softmax over the action ids ``ids``: the
    distribution a ``VLAPolicy`` draws from and reports."""
    targets = batch["targets"]  # (B, S)
    logp = slot_logits(model, batch, targets.shape[1])[..., ids].float().log_softmax(-1)  # (B, S, n_bins)
    scored = targets != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(scored, targets - ids.start, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, 0.0).sum(dim=1)


def parallel_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], tok: ActionTokenizer, sigma: float,
                  autocast: Callable, plan: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SFT loss of a parallel batch (``vla.data.Collator``), and the logits (B, D, V) and targets (B, D) of each
    row's first action (for ``vla.sft.Meter``).

    The mean over every scored token (``vla.grounding.sequence_loss``: Gaussian targets with std ``sigma`` bins over
    the bins): the slots' targets and, with co-training rows (keys ``QUERY_PREFIX`` + a ``build_queries`` key, a second
    forward pass), their answers, as one grounded batch of the autoregressive head is scored."""
    bins, D = slice(tok.token_offset, tok.token_offset + tok.n_bins), tok.action_dim
    targets = batch["targets"]
    with autocast():
        logits = slot_logits(model, batch, targets.shape[1])
    valid = targets != IGNORE_INDEX
    total = sequence_loss(logits, targets.clamp(min=0), valid, bins, sigma) * valid.sum()
    count = valid.sum()
    queries = {key[len(QUERY_PREFIX) :]: value for key, value in batch.items() if key.startswith(QUERY_PREFIX)}
    if queries:
        with autocast():
            q_logits, q_targets, q_valid = scored_logits(model, queries)
        total = total + sequence_loss(q_logits, q_targets, q_valid, bins, sigma) * q_valid.sum()
        count = count + q_valid.sum()
    first = slice(plan, plan + D)
    return total / count, logits[:, first], targets[:, first]
