"""LoRA fine-tuning through ``peft``: low-rank adapters on a pretrained VLA, trained and saved alone.

``model.lora.r > 0`` (SFT, from ``model.pretrained``) wraps the model in a ``peft.PeftModel``: every base weight is
frozen, batch-norm statistics included, and only the adapters (and any ``modules_to_save``) train. Its checkpoint
directory is a peft adapter (``adapter_config.json``, whose ``base_model_name_or_path`` is the base's absolute path,
and ``adapter_model.safetensors``) plus the adapted model's ``config.json`` (a grounded or parallel head lives there),
the tokenizers and the action statistics. ``vla.model.load_model`` reopens it on top of its base, so the policy,
evaluation, DPO and resume take an adapter directory wherever they take a checkpoint; ``vla.checkpoint.merge_lora``
(``scripts/merge_lora.py``) folds the adapters into a plain checkpoint that needs no peft.

The defaults are OpenVLA's LoRA recipe: rank 32, alpha 16, no dropout, every linear layer but the output head.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from store.errors import UsageError
from store.intact import check_files

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraConfig:
    """``model.lora``: r = 0 fine-tunes every weight; r > 0 trains rank-r adapters on a frozen pretrained model."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # peft's names: "all-linear" (every nn.Linear but the LM head) or module-name suffixes such as q_proj, v_proj.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained and saved whole next to the adapters (e.g. lm_head for a vocabulary the base never used).
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise UsageError(f"model.lora.r={self.r!r} must be an integer >= 0 (0 turns LoRA off; 32 is OpenVLA's)")
        if self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UsageError(f"model.lora.alpha={self.alpha} must be > 0 and model.lora.dropout={self.dropout} "
                             "in [0, 1)")
        if self.r and not self.target_modules:
            raise UsageError("model.lora.target_modules is empty; name the layers to adapt, or [all-linear]")


class FrozenBatchNorm2d(torch.nn.BatchNorm2d):
    """Batch norm that stays in eval mode: under LoRA the base is frozen, its running statistics included (they are
    not saved with the adapters, so updating them would make the reloaded model differ from the trained one)."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


def _freeze_batch_norm(model: torch.nn.Module) -> None:
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = FrozenBatchNorm2d
            module.eval()


def add_lora(model: PreTrainedModel, cfg: LoraConfig, base: str | Path) -> PeftModel:
    """``model`` (loaded from the directory ``base``) with trainable rank-``cfg.r`` adapters and every other weight
    frozen."""
    targets = cfg.target_modules[0] if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            modules_to_save=list(cfg.modules_to_save) or None,
                            base_model_name_or_path=str(Path(base).resolve()))
    _freeze_batch_norm(model)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise UsageError(f"model.lora: {e}") from None


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base checkpoint directory an adapter directory names, checked to hold a model."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UsageError(f"{path} is a LoRA adapter of the base model {base!r}, which is not there; restore that "
                         f"directory or set base_model_name_or_path in {Path(path) / ADAPTER_CONFIG}")
    check_files(base, f"restore the base model that the LoRA adapter {path} was trained on")
    return Path(base)


def load_adapted(path: str | Path, model_class: type[PreTrainedModel]) -> PeftModel:
    """The adapter directory ``path`` on top of its base (fp32, eval mode, adapters trainable for resume and DPO)."""
    config = model_class.config_class.from_pretrained(path)  # the adapted model's config: plan tokens, action head
    base = model_class.from_pretrained(adapter_base(path), config=config, dtype=torch.float32)
    _freeze_batch_norm(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, path, is_trainable=True).eval()


def save_adapted(model: PeftModel, path: str | Path) -> None:
    """The adapters and the adapted model's config.json into ``path``."""
    model.save_pretrained(path)
    model.get_base_model().config.save_pretrained(path)
