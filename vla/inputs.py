"""The one input builder of SFT, DPO and the policy: images, proprio state and instruction -> model inputs.

``build_inputs`` lays out ``<image>*N``, ``<s>``, the state tokens, ``PROMPT_TEMPLATE`` and (for training and
scoring) the action tokens for every architecture of ``vla.model.ARCHITECTURES``; ``preprocess_images`` is a fast
torch version of the image processor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vla.model import ARCHITECTURES, VLA

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
IGNORE_INDEX = -100


def num_image_tokens(config: PretrainedConfig) -> int:
    """Image tokens a prompt needs: one per vision patch (per cell of the ResNet's last feature map)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def preprocess_images(images: np.ndarray | torch.Tensor, image_processor: SiglipImageProcessorPil) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> float32 pixel values (B, 3, h, w) with the processor's size, scale, mean, std.

    A torch re-implementation of the processor for speed (its PIL path costs ~3 ms an image). Images already at
    the processor's size match it to float rounding; others are resized bilinearly with antialiasing, within
    about one grey level of PIL's bilinear resize (PIL rounds to uint8 in between).
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    size = (image_processor.size["height"], image_processor.size["width"])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if image_processor.do_rescale:
        x = x * image_processor.rescale_factor
    if image_processor.do_normalize:
        mean = torch.tensor(image_processor.image_mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def build_inputs(
    vla: VLA,
    images: np.ndarray | torch.Tensor,
    instructions: Sequence[str],
    action_ids: np.ndarray | torch.Tensor | None = None,
    states: np.ndarray | None = None,
    plan_ids: np.ndarray | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The one input builder for SFT, DPO and the policy, for every registered architecture.

    images: uint8 (B, H, W, 3). instructions: B strings. action_ids: int (B, D) token ids from
    ``ActionTokenizer.encode`` for training/scoring, or None for inference. states: float (B, S) proprio states,
    required when ``vla.state_tokenizer`` is set and ignored otherwise. plan_ids: int (B, P) tokens a grounded model
    emits before the actions (the named object's location tokens), scored like the actions; only with action_ids.

    Each row is ``<image>*N`` and ``<s>`` (order per architecture), then, when the model reads the state, its S
    state tokens, then ``PROMPT_TEMPLATE`` filled with the instruction, then, with ``action_ids``, the P plan tokens,
    the D action tokens and ``</s>``. Image, state and prompt tokens are all read and never scored.

    Padding: with ``action_ids`` rows are right-padded (targets sit at known positions, simplest for losses);
    without, rows are left-padded so that position -1 of every row is the prediction point of the first generated
    token and generated tokens append at the same index for all rows. ``position_ids`` count real tokens only,
    so padding changes no logit.

    Returns tensors: ``input_ids``, ``attention_mask``, ``position_ids`` (B, L), ``pixel_values`` (B, 3, h, w),
    ``token_type_ids`` (B, L) for PaliGemma (0 = bidirectional prefix, 1 = causal suffix), ``labels`` (B, L) when
    ``action_ids`` is given: -100 everywhere except the plan tokens, the D action tokens and the EOS, where they
    equal ``input_ids`` (the model shifts them: logits at position t score the token at t + 1), and
    ``action_positions`` (B, D): where the action tokens sit in ``input_ids``, so ``logits[b, action_positions - 1]``
    score them. Pass ``model_inputs(batch)`` to the model.
    """
    batch = len(instructions)
    if action_ids is None:
        if plan_ids is not None:
            raise ValueError("plan_ids come with action_ids (training and scoring); a policy generates its plan")
        return _layout(vla, images, _prompts(vla, instructions), [[]] * batch, states, left_pad=True)
    actions = _token_matrix(vla, action_ids, batch, "action_ids")
    plan = _token_matrix(vla, plan_ids, batch, "plan_ids") if plan_ids is not None else actions[:, :0]
    eos = torch.full((batch, 1), vla.tokenizer.eos_token_id, dtype=torch.long)
    out = _layout(vla, images, _prompts(vla, instructions), torch.cat([plan, actions, eos], dim=1).tolist(), states)
    out["action_positions"] = out.pop("answer_starts")[:, None] + plan.shape[1] + torch.arange(actions.shape[1])
    return out


def build_queries(
    vla: VLA,
    images: np.ndarray | torch.Tensor,
    prompts: Sequence[str],
    answers: Sequence[Sequence[int]],
    states: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Vision-language questions with their answers, laid out as ``build_inputs`` lays out actions: ``prompts`` are
    B whole prompts (e.g. ``"In: List the objects.\\nOut:"``), ``answers`` B token-id lists of any length (text
    tokens and location tokens); each row's answer and ``</s>`` are labelled, everything else is -100. Rows are
    right-padded; ``answer_starts`` (B,) gives where each answer begins."""
    arch = ARCHITECTURES[vla.model.config.model_type]
    eos = vla.tokenizer.eos_token_id
    return _layout(vla, images, [p + arch.prefix_separator for p in prompts], [[*a, eos] for a in answers], states)


def build_slots(
    vla: VLA, images: np.ndarray | torch.Tensor, instructions: Sequence[str], slots: int,
    states: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The prompt rows of ``build_inputs`` (no actions) followed by ``slots`` placeholder tokens (the pad id) that
    a parallel action head (``vla.parallel``) fills in one forward pass. Rows are left-padded, so the slots are the
    last ``slots`` positions of every row; ``attention_mask`` is 1 on them, ``position_ids`` count them as tokens.
    No ``token_type_ids``: ``vla.parallel.slot_mask`` gives the whole attention pattern."""
    pad = vla.tokenizer.pad_token_id
    out = _layout(vla, images, _prompts(vla, instructions), [[pad] * slots] * len(instructions), states, left_pad=True)
    out.pop("token_type_ids", None)
    return out


def _prompts(vla: VLA, instructions: Sequence[str]) -> list[str]:
    separator = ARCHITECTURES[vla.model.config.model_type].prefix_separator
    return [PROMPT_TEMPLATE.format(instruction=text) + separator for text in instructions]


def _token_matrix(vla: VLA, ids, batch: int, name: str) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.ndim != 2 or ids.shape[0] != batch or ids.dtype.is_floating_point:
        raise ValueError(f"{name} must be integer (B={batch}, D), got {ids.dtype} {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= vla.model.config.text_config.vocab_size:
        raise ValueError(f"{name} lie outside the vocabulary; encode them with the checkpoint's tokenizers")
    return ids.long()


def _layout(vla: VLA, images, prompts: list[str], suffixes: list[list[int]], states, left_pad: bool = False,
            ) -> dict[str, torch.Tensor]:
    """``lead + state tokens + prompt`` then each row's ``suffix`` (scored when any row has one)."""
    config = vla.model.config
    arch = ARCHITECTURES[config.model_type]
    tokenizer = vla.tokenizer
    batch = len(prompts)
    pixel_values = preprocess_images(images, vla.image_processor)
    if pixel_values.shape[0] != batch:
        raise ValueError(f"got {pixel_values.shape[0]} images for {batch} instructions")

    image_ids = [config.image_token_id] * num_image_tokens(config)
    lead = image_ids + [tokenizer.bos_token_id] if arch.image_before_bos else [tokenizer.bos_token_id] + image_ids
    state_ids = [[]] * batch
    if vla.state_tokenizer is not None:
        if states is None:
            raise ValueError("this model reads the proprio state (its checkpoint has state_tokenizer.json); "
                             "pass states=obs['state'] for every row")
        states = np.asarray(states, dtype=np.float64)
        if states.shape != (batch, vla.state_tokenizer.action_dim):
            raise ValueError(f"states must be (B={batch}, {vla.state_tokenizer.action_dim}), got {states.shape}")
        state_ids = vla.state_tokenizer.encode(states).tolist()
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prefixes = [lead + s + ids for s, ids in zip(state_ids, prompt_ids)]

    lengths = [len(p) + len(s) for p, s in zip(prefixes, suffixes)]
    seq_len = max(lengths)
    if seq_len > config.text_config.max_position_embeddings:
        raise ValueError(
            f"prompt of {seq_len} tokens exceeds max_position_embeddings="
            f"{config.text_config.max_position_embeddings}; shorten the instruction or enlarge the model config"
        )
    input_ids = torch.full((batch, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    is_suffix = torch.zeros(batch, seq_len, dtype=torch.bool)
    answer_starts = []
    for row, (prefix, suffix, length) in enumerate(zip(prefixes, suffixes, lengths)):
        start = seq_len - length if left_pad else 0
        input_ids[row, start : start + length] = torch.tensor(prefix + list(suffix), dtype=torch.long)
        attention_mask[row, start : start + length] = 1
        is_suffix[row, start + len(prefix) : start + length] = True
        answer_starts.append(start + len(prefix))

    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) + arch.position_offset  # (B, L)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_values": pixel_values,
    }
    if arch.uses_token_type_ids:
        # Right padding joins the causal suffix; left padding joins the prefix so that no query row is all-masked.
        padding_type = 0 if left_pad else 1
        out["token_type_ids"] = torch.where(attention_mask.bool(), is_suffix.long(), padding_type)
    if not left_pad:
        out["labels"] = torch.where(is_suffix, input_ids, IGNORE_INDEX)
        out["answer_starts"] = torch.tensor(answer_starts)
    return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a ``build_inputs`` batch that the model's forward accepts."""
    return {key: value for key, value in batch.items() if key not in ("action_positions", "answer_starts")}
