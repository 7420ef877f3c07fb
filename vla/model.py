"""The VLA model: a SigLIP vision encoder, a projector and a causal LM, built and loaded with `transformers`.

Two real architectures share one input builder: Llava (SigLIP + Llama) and PaliGemma (SigLIP + Gemma). A checkpoint
directory is a plain Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files,
``preprocessor_config.json``) that ``load_model`` reopens without any code from this project but the registry below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    FastVlmConfig,
    FastVlmForConditionalGeneration,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ResNetConfig,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from store.errors import UsageError
from vla.action_tokenizer import ActionTokenizer
from vla.text_tokenizer import action_token

STATE_TOKENIZER_FILE = "state_tokenizer.json"
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
IGNORE_INDEX = -100


@dataclass
class VLAModelConfig:
    """Sizes of a VLA built from scratch. The default (FastVLM: ResNet + Llama) has ~4.5M parameters and 36 image
    tokens at 96 px. For arch=fast_vlm, the vision_heads and vision_intermediate_size are unused."""

    arch: str = "fast_vlm"
    image_size: int = 96
    patch_size: int = 16
    vision_hidden_size: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    vision_intermediate_size: int = 768
    text_hidden_size: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate_size: int = 768
    projector_act: str = "gelu"
    max_position_embeddings: int = 256
    # arch=fast_vlm: the instruction scales and shifts the channels of every ResNet stage (FiLM, as in RT-1), so
    # the image tokens the LM reads are already conditioned on what to look for. Saved in config.json.
    film: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UsageError(f"arch={self.arch!r} is not supported; choose one of {sorted(ARCHITECTURES)}")
        if self.film and self.arch != "fast_vlm":
            raise UsageError(f"film=true conditions a ResNet tower's stages; arch={self.arch} has none, use fast_vlm")
        for name in (
            "image_size", "patch_size", "vision_hidden_size", "vision_layers", "vision_heads",
            "vision_intermediate_size", "text_hidden_size", "text_layers", "text_heads", "text_intermediate_size",
            "max_position_embeddings",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise UsageError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size} "
                "(one image token per patch); change either"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise UsageError(
                f"vision_hidden_size={self.vision_hidden_size} must be divisible by vision_heads={self.vision_heads}"
            )
        if self.text_hidden_size % self.text_heads or (self.text_hidden_size // self.text_heads) % 2:
            raise UsageError(
                f"text_hidden_size={self.text_hidden_size} / text_heads={self.text_heads} must be an even integer "
                "(rotary embeddings rotate pairs of channels); change either"
            )
        if self.max_position_embeddings < self.num_image_tokens + 32:
            raise UsageError(
                f"max_position_embeddings={self.max_position_embeddings} leaves no room for the prompt after "
                f"{self.num_image_tokens} image tokens; raise it to at least {self.num_image_tokens + 32}"
            )

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def vision_config(self) -> SiglipVisionConfig:
        # No pooling head: the LM reads every patch, and unused parameters would break DDP.
        return SiglipVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_use_head=False,
        )

    def text_kwargs(self, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
        """Keyword arguments shared by the Llama and Gemma configs."""
        return {
            "vocab_size": len(tokenizer),
            "hidden_size": self.text_hidden_size,
            "intermediate_size": self.text_intermediate_size,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "num_key_value_heads": self.text_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }


def _llava_config(cfg: VLAModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    # SigLIP has no CLS token: keep every patch ("full") from the last layer (-1); the Llava defaults
    # ("default", -2) drop the first patch and skip a layer, so the image-token count would not match.
    return LlavaConfig(
        vision_config=cfg.vision_config(),
        text_config=LlamaConfig(**cfg.text_kwargs(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        projector_hidden_act=cfg.projector_act,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _conv_vision_config(cfg: VLAModelConfig) -> ResNetConfig:
    """A ResNet whose last feature map has one cell per ``patch_size`` square: FastVLM's image tokens.

    The stem (7x7 conv, stride 2, max-pool) divides the side by 4 and every later stage by 2, so 96 px with 16 px
    "patches" gives 3 stages and a 6x6 map, the same 36 tokens as the ViT; channels double per stage up to
    ``vision_hidden_size``; ``vision_layers`` basic blocks are spread over the stages (at least one each).
    """
    stages = int(np.log2(cfg.patch_size)) - 1
    if cfg.patch_size != 2 ** (stages + 1) or stages < 1:
        raise UsageError(f"arch=fast_vlm needs patch_size = a power of two >= 4, got {cfg.patch_size}")
    widths = [max(8, cfg.vision_hidden_size >> (stages - 1 - i)) for i in range(stages)]
    depths = [max(1, cfg.vision_layers // stages)] * stages
    vision = ResNetConfig(num_channels=3, embedding_size=widths[0], hidden_sizes=widths, depths=depths,
                          layer_type="basic", downsample_in_first_stage=False)
    # What FastVLM's projector and num_image_tokens read; saved in config.json with the rest.
    vision.hidden_size, vision.image_size, vision.patch_size = widths[-1], cfg.image_size, cfg.patch_size
    return vision


def _fastvlm_config(cfg: VLAModelConfig, tokenizer: PreTrainedTokenizerFast) -> FastVlmConfig:
    config = FastVlmConfig(
        vision_config=_conv_vision_config(cfg),
        text_config=LlamaConfig(**cfg.text_kwargs(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        projector_hidden_act=cfg.projector_act,
    )
    if cfg.film:
        # The ids FiLM averages: words of the prompt, not special, state or action tokens (those sit at the end).
        first_word = max(tokenizer.all_special_ids) + 1
        config.film_token_range = [first_word, tokenizer.convert_tokens_to_ids(action_token(0))]
    return config


class _Instruction:
    """The instruction vector of the current forward pass, shared by a FiLM model and its stage hooks."""

    value: torch.Tensor | None = None


def _film_hook(stage: torch.nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    # A plain function reading the stage's own attribute, so that a deep copy of the model (a frozen DPO reference)
    # modulates with its own copies of the layer and the instruction.
    layer, instruction = stage.film
    if instruction.value is None:
        raise RuntimeError("a FiLM model reads the instruction: call the model's forward, not its vision tower")
    gamma, beta = layer(instruction.value).chunk(2, dim=1)  # (B, C) each
    return out * (1 + gamma[..., None, None]) + beta[..., None, None]


class FilmFastVlm(FastVlmForConditionalGeneration):
    """FastVLM, optionally with FiLM: when ``config.film_token_range`` is set, the mean embedding of the prompt's
    words (ids in that range), layer-normalised, gives a per-channel scale and shift for every ResNet stage's output,
    ``h * (1 + gamma) + beta``, zero-initialised so that training starts from the plain model.

    Without it this is exactly ``FastVlmForConditionalGeneration``, so every FastVLM checkpoint loads through it.
    Only the forward pass sets the instruction: a vision-tower call outside it raises instead of using a stale one.
    """

    def __init__(self, config: FastVlmConfig) -> None:
        super().__init__(config)
        self.film, self._instruction = None, _Instruction()
        if getattr(config, "film_token_range", None) is None:
            return
        self.film = torch.nn.ModuleList(
            torch.nn.Linear(config.text_config.hidden_size, 2 * width) for width in config.vision_config.hidden_sizes
        )
        for layer in self.film:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        for stage, layer in zip(self.model.vision_tower.encoder.stages, self.film):
            stage.film = (layer, self._instruction)  # a plain attribute: not a submodule, not in the state dict
            stage.register_forward_hook(_film_hook)

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        film = getattr(self, "film", None)  # post_init runs before __init__ has made it
        if film is not None and any(module is layer for layer in film):  # weights a checkpoint lacks start at zero
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        if self.film is None or pixel_values is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   **kwargs)
        low, high = self.config.film_token_range
        words = (input_ids >= low) & (input_ids < high)
        if attention_mask is not None:
            words &= attention_mask.bool()
        embeddings = self.get_input_embeddings()(input_ids) * words[..., None]  # (B, L, H)
        mean = embeddings.sum(1) / words.sum(1, keepdim=True).clamp(min=1)
        # Normalised: token embeddings start ~0.02 per channel, which would keep the modulation ~100x too weak.
        self._instruction.value = F.layer_norm(mean, mean.shape[-1:])
        try:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   **kwargs)
        finally:
            self._instruction.value = None


def _paligemma_config(cfg: VLAModelConfig, tokenizer: PreTrainedTokenizerFast) -> PaliGemmaConfig:
    text = GemmaConfig(**cfg.text_kwargs(tokenizer), head_dim=cfg.text_hidden_size // cfg.text_heads)
    return PaliGemmaConfig(
        vision_config=cfg.vision_config(),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=cfg.text_hidden_size,
        hidden_size=cfg.text_hidden_size,
    )


@dataclass(frozen=True)
class _Arch:
    """What differs between architectures, keyed by ``config.model_type``."""

    model_class: type[PreTrainedModel]
    make_config: Callable[[VLAModelConfig, PreTrainedTokenizerFast], PretrainedConfig]
    # Prompt layout: Llava and FastVLM read "<s> <image>*N prompt" (the defaults); PaliGemma reads
    # "<image>*N <s> prompt \n" as a bidirectional prefix (token_type_ids 0) and the actions as a causal suffix
    # (token_type_ids 1).
    image_before_bos: bool = False
    prefix_separator: str = ""
    uses_token_type_ids: bool = False
    position_offset: int = 0  # PaliGemma counts positions from 1
    unused_parameters: tuple[str, ...] = ()  # parameter-name prefixes the forward pass never reads


ARCHITECTURES: dict[str, _Arch] = {
    "llava": _Arch(
        model_class=LlavaForConditionalGeneration,
        make_config=_llava_config,
        # vision_feature_layer=-1 takes hidden_states[-1], which SigLIP returns before its post-layernorm.
        unused_parameters=("model.vision_tower.post_layernorm.",),
    ),
    # A convolutional vision tower (ResNet) whose feature map becomes the image tokens, as in Apple's FastVLM.
    "fast_vlm": _Arch(
        model_class=FilmFastVlm,
        make_config=_fastvlm_config,
    ),
    "paligemma": _Arch(
        model_class=PaliGemmaForConditionalGeneration,
        make_config=_paligemma_config,
        image_before_bos=True,
        prefix_separator="\n",
        uses_token_type_ids=True,
        position_offset=1,
    ),
}


class VLA(NamedTuple):
    """A model with the tokenizer and image processor it was trained with; a checkpoint saves all three.

    ``state_tokenizer``, when set, makes the model read the robot's proprio state: ``build_inputs`` writes it as
    one token per state dimension after the image tokens (bins of the dataset's state q01/q99, in the action-token
    range). It is saved as ``state_tokenizer.json``; a checkpoint without that file reads images and text only.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    image_processor: SiglipImageProcessorPil
    state_tokenizer: ActionTokenizer | None = None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.state_tokenizer is not None:
            self.state_tokenizer.save(Path(path) / STATE_TOKENIZER_FILE)


def _freeze_unused(model: PreTrainedModel) -> PreTrainedModel:
    """Stop gradients for parameters the forward pass never reads, so DDP needs no unused-parameter search."""
    prefixes = ARCHITECTURES[model.config.model_type].unused_parameters
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return model


def build_model(cfg: VLAModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A randomly initialised model of ``cfg.arch`` whose vocabulary is ``tokenizer``'s (fp32, train mode)."""
    if tokenizer.image_token_id is None or tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs <image>, pad and eos tokens; build it with vla.text_tokenizer")
    arch = ARCHITECTURES[cfg.arch]
    model = arch.model_class(arch.make_config(cfg, tokenizer))
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    for name, module in model.named_modules():
        if name.endswith("embeddings.position_embedding"):
            with torch.no_grad():
                module.weight.copy_(sincos_2d(grid, module.weight.shape[1]))
    return _freeze_unused(model.train())


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position codes (MAE / ViT-style), rows in row-major patch order.

    The vision tower starts from these instead of small random vectors: where a patch lies is then a smooth
    function of its code from step 0 (SigLIP's random init gives position codes ~10x weaker than the patch
    content, one unrelated vector per patch), which is what a policy must read off to move towards an object. The
    codes stay trainable.
    """
    if dim % 4:
        raise UsageError(f"vision_hidden_size={dim} must be a multiple of 4 for 2-D sine-cosine position codes")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim / 4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None].double() * freqs[None]  # (grid * grid, dim / 4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def build_image_processor(cfg: VLAModelConfig) -> SiglipImageProcessorPil:
    """SigLIP preprocessing at ``cfg.image_size``: bilinear resize, scale to [0, 1], normalise (mean = std = 0.5)."""
    return SiglipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, resample=PILImageResampling.BILINEAR
    )


def build_vla(cfg: VLAModelConfig, tokenizer: PreTrainedTokenizerFast) -> VLA:
    return VLA(build_model(cfg, tokenizer), tokenizer, build_image_processor(cfg))


def load_model(path: str | os.PathLike) -> VLA:
    """Load a checkpoint directory (ours or any local HF checkpoint of a supported architecture), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"{path} holds no config.json, so it is not a model checkpoint; "
            "pass a directory written by VLA.save_pretrained / model.save_pretrained"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"{path} holds a {model_type!r} model; supported model types are {sorted(ARCHITECTURES)}. "
            "Convert the checkpoint or register its architecture in vla.model.ARCHITECTURES"
        )
    for required in ("tokenizer.json", "preprocessor_config.json"):
        if not (path / required).is_file():
            raise UsageError(
                f"{path} lacks {required}; save the checkpoint with VLA.save_pretrained so that it is self-contained"
            )
    model = ARCHITECTURES[model_type].model_class.from_pretrained(path).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    image_processor = SiglipImageProcessorPil.from_pretrained(path)
    state_file = path / STATE_TOKENIZER_FILE
    state_tokenizer = ActionTokenizer.load(state_file) if state_file.is_file() else None
    return VLA(_freeze_unused(model), tokenizer, image_processor, state_tokenizer)


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
) -> dict[str, torch.Tensor]:
    """The one input builder for SFT, DPO and the policy, for every registered architecture.

    images: uint8 (B, H, W, 3). instructions: B strings. action_ids: int (B, D) token ids from
    ``ActionTokenizer.encode`` for training/scoring, or None for inference. states: float (B, S) proprio states,
    required when ``vla.state_tokenizer`` is set and ignored otherwise.

    Each row is ``<image>*N`` and ``<s>`` (order per architecture), then, when the model reads the state, its S
    state tokens, then ``PROMPT_TEMPLATE`` filled with the instruction, then, with ``action_ids``, the D action
    tokens and ``</s>``. Image, state and prompt tokens are all read and never scored.

    Padding: with ``action_ids`` rows are right-padded (targets sit at known positions, simplest for losses);
    without, rows are left-padded so that position -1 of every row is the prediction point of the first action
    token and generated tokens append at the same index for all rows. ``position_ids`` count real tokens only,
    so padding changes no logit.

    Returns tensors: ``input_ids``, ``attention_mask``, ``position_ids`` (B, L), ``pixel_values`` (B, 3, h, w),
    ``token_type_ids`` (B, L) for PaliGemma (0 = bidirectional prefix, 1 = causal suffix), ``labels`` (B, L) when
    ``action_ids`` is given: -100 everywhere except the D action tokens and the EOS, where they equal
    ``input_ids`` (the model shifts them: logits at position t score the token at t + 1), and
    ``action_positions`` (B, D): where the action tokens sit in ``input_ids``, so ``logits[b, action_positions - 1]``
    score them. Pass ``model_inputs(batch)`` to the model.
    """
    config = vla.model.config
    arch = ARCHITECTURES[config.model_type]
    tokenizer = vla.tokenizer
    batch = len(instructions)
    pixel_values = preprocess_images(images, vla.image_processor)
    if pixel_values.shape[0] != batch:
        raise ValueError(f"got {pixel_values.shape[0]} images for {batch} instructions")

    image_ids = [config.image_token_id] * num_image_tokens(config)
    lead = image_ids + [tokenizer.bos_token_id] if arch.image_before_bos else [tokenizer.bos_token_id] + image_ids
    prompts = [PROMPT_TEMPLATE.format(instruction=text) + arch.prefix_separator for text in instructions]
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

    if action_ids is None:
        suffix = torch.zeros(batch, 0, dtype=torch.long)
    else:
        actions = torch.as_tensor(action_ids)
        if actions.ndim != 2 or actions.shape[0] != batch or actions.dtype.is_floating_point:
            raise ValueError(f"action_ids must be integer (B={batch}, D), got {actions.dtype} {tuple(actions.shape)}")
        if actions.min() < 0 or actions.max() >= config.text_config.vocab_size:
            raise ValueError("action_ids lie outside the vocabulary; encode actions with the checkpoint's tokenizer")
        eos = torch.full((batch, 1), tokenizer.eos_token_id, dtype=torch.long)
        suffix = torch.cat([actions.long(), eos], dim=1)  # (B, D + 1)

    lengths = [len(p) + suffix.shape[1] for p in prefixes]
    seq_len = max(lengths)
    if seq_len > config.text_config.max_position_embeddings:
        raise ValueError(
            f"prompt of {seq_len} tokens exceeds max_position_embeddings="
            f"{config.text_config.max_position_embeddings}; shorten the instruction or enlarge the model config"
        )
    input_ids = torch.full((batch, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    is_suffix = torch.zeros(batch, seq_len, dtype=torch.bool)
    left_pad = action_ids is None
    action_starts = []
    for row, (prefix, length) in enumerate(zip(prefixes, lengths)):
        start = seq_len - length if left_pad else 0
        tokens = torch.cat([torch.tensor(prefix, dtype=torch.long), suffix[row]])
        input_ids[row, start : start + length] = tokens
        attention_mask[row, start : start + length] = 1
        is_suffix[row, start + len(prefix) : start + length] = True
        action_starts.append(start + len(prefix))

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
    if action_ids is not None:
        out["labels"] = torch.where(is_suffix, input_ids, IGNORE_INDEX)
        out["action_positions"] = torch.tensor(action_starts).unsqueeze(1) + torch.arange(suffix.shape[1] - 1)  # (B, D)
    return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a ``build_inputs`` batch that the model's forward accepts."""
    return {key: value for key, value in batch.items() if key != "action_positions"}
