"""The VLA model: a vision tower, a projector and a causal LM, built from a config or loaded with `transformers`.

Three registered architectures (``ARCHITECTURES``, keyed by ``config.model_type``): FastVLM (a ResNet tower + Llama,
the default; ``vla.film`` adds FiLM to it), Llava (SigLIP ViT + Llama) and PaliGemma (SigLIP + Gemma). They share
one input builder, ``vla.inputs.build_inputs``. A checkpoint directory is a plain Hugging Face directory
(``config.json``, ``model.safetensors``, tokenizer files, ``preprocessor_config.json``) that ``load_model`` reopens
without any code from this project but the registry below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import (
    FastVlmConfig,
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
from store.intact import check_files
from vla.action_tokenizer import ActionTokenizer
from vla.film import FilmFastVlm
from vla.lora import PeftModel, is_adapter, load_adapted, save_adapted
from vla.text_tokenizer import action_token
from vla.towers import TOWERS, load_weights, weights_file

# A checkpoint's weights: one file, a sharded index, or LoRA adapters on a base (vla.lora).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
STATE_TOKENIZER_FILE = "state_tokenizer.json"
LOCATION_TOKENIZER_FILE = "location_tokenizer.json"
DAMAGED_FIX = "save the checkpoint again (rerun the run that wrote it) or point to another checkpoint"


@dataclass
class VLAModelConfig:
    """Sizes of a VLA built from scratch. The default (FastVLM: ResNet + Llama) has ~4.5M parameters and 36 image
    tokens at 96 px. For arch=fast_vlm, the vision_heads and vision_intermediate_size are unused; with a pretrained
    ``vision_tower`` (vla.towers.TOWERS) the vision_hidden_size and vision_layers are too."""

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
    # arch=fast_vlm: "resnet" (random init, sized by vision_*) or a pretrained tower of vla.towers.TOWERS, whose
    # ImageNet weights come from its package's file, or from vision_weights (a local state-dict file) with its
    # vision_weights_sha256; the digest is checked when the model is built.
    vision_tower: str = "resnet"
    vision_weights: str | None = None
    vision_weights_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UsageError(f"arch={self.arch!r} is not supported; choose one of {sorted(ARCHITECTURES)}")
        if self.film and self.arch != "fast_vlm":
            raise UsageError(f"film=true conditions a ResNet tower's stages; arch={self.arch} has none, use fast_vlm")
        self._check_vision_tower()
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

    def _check_vision_tower(self) -> None:
        if self.vision_tower == "resnet":
            if self.vision_weights is not None or self.vision_weights_sha256 is not None:
                raise UsageError("vision_weights and vision_weights_sha256 are for a pretrained vision_tower; the "
                                 f"resnet tower starts random: unset them or choose one of {sorted(TOWERS)}")
            return
        if self.vision_tower not in TOWERS:
            raise UsageError(f"vision_tower={self.vision_tower!r} is not known; choose resnet or one of "
                             f"{sorted(TOWERS)}")
        if self.arch != "fast_vlm" or self.film:
            raise UsageError(f"vision_tower={self.vision_tower} fills FastVLM's tower slot without FiLM; "
                             "use arch=fast_vlm and film=false, or vision_tower=resnet")
        if self.patch_size not in TOWERS[self.vision_tower].patch_sizes:
            raise UsageError(f"vision_tower={self.vision_tower} has feature maps at strides "
                             f"{list(TOWERS[self.vision_tower].patch_sizes)}; set patch_size to one of them")
        if self.vision_weights is not None and self.vision_weights_sha256 is None:
            raise UsageError(f"vision_weights={self.vision_weights} needs vision_weights_sha256 (the file's digest, "
                             "from sha256sum) so that the weights are checked before use")
        weights_file(self.vision_tower, self.vision_weights)  # the file is there (its digest is checked on build)

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
    if cfg.vision_tower == "resnet":
        vision = _conv_vision_config(cfg)
    else:  # cut where its feature map has one cell per patch; build_model loads its ImageNet weights
        vision = TOWERS[cfg.vision_tower].make_config(cfg.image_size, cfg.patch_size)
    config = FastVlmConfig(
        vision_config=vision,
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
    ``location_tokenizer``, when set, is the model's place vocabulary (``vla.grounding``): a model pretrained on
    grounding queries has one, saved as ``location_tokenizer.json``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    image_processor: SiglipImageProcessorPil
    state_tokenizer: ActionTokenizer | None = None
    location_tokenizer: ActionTokenizer | None = None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        if isinstance(self.model, PeftModel):  # vla.lora: the adapters and the adapted config, not the base weights
            save_adapted(self.model, path)
        else:
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        for tokenizer, name in ((self.state_tokenizer, STATE_TOKENIZER_FILE),
                                (self.location_tokenizer, LOCATION_TOKENIZER_FILE)):
            if tokenizer is not None:
                tokenizer.save(Path(path) / name)


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
    if cfg.vision_tower != "resnet":
        load_weights(model.model.vision_tower, cfg.vision_tower, cfg.vision_weights, cfg.vision_weights_sha256)
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
    """Load a checkpoint directory (ours or any local HF checkpoint of a supported architecture), in eval mode; a
    LoRA adapter directory (``vla.lora``) comes back as a ``PeftModel`` on top of its base."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"{path} holds no config.json, so it is not a model checkpoint; "
            "pass a directory written by VLA.save_pretrained / model.save_pretrained"
        )
    check_files(path, DAMAGED_FIX)  # a truncated or corrupt file: one line naming it, not the library's traceback
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
    # fp32 whatever the file holds (the shipped base is fp16): training and CPU inference run in fp32, autocast
    # gives bf16 where asked.
    model_class = ARCHITECTURES[model_type].model_class
    if is_adapter(path):
        model = load_adapted(path, model_class)
    else:
        model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    image_processor = SiglipImageProcessorPil.from_pretrained(path)
    state, location = (ActionTokenizer.load(path / f) if (path / f).is_file() else None
                       for f in (STATE_TOKENIZER_FILE, LOCATION_TOKENIZER_FILE))
    return VLA(_freeze_unused(model), tokenizer, image_processor, state, location)

