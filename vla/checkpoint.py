"""A VLA checkpoint directory: the Hugging Face files of `VLA.save_pretrained` plus the action statistics.

`action_tokenizer.json` maps a dataset name (OpenVLA's `unnorm_key`) to that dataset's `ActionTokenizer.to_dict()`,
so one checkpoint can act in the units of every dataset it was trained on. A LoRA run's checkpoint holds adapters
(`vla.lora`); `merge_lora` turns it into a plain one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from store.errors import UsageError
from store.files import write_atomically, write_text
from store.intact import check_files, reading
from vla.action_tokenizer import ActionTokenizer
from vla.lora import is_adapter
from vla.model import DAMAGED_FIX, VLA, load_model

ACTION_STATS_FILE = "action_tokenizer.json"


def save_checkpoint(vla: VLA, action_tokenizers: dict[str, ActionTokenizer], path: str | os.PathLike) -> None:
    """Write the model, its processors and the action statistics into `path` (created if missing)."""
    path = Path(path)
    vla.save_pretrained(path)
    write_text(path / ACTION_STATS_FILE, json.dumps({k: t.to_dict() for k, t in action_tokenizers.items()}, indent=1))


def load_action_tokenizers(path: str | os.PathLike) -> dict[str, ActionTokenizer]:
    file = Path(path) / ACTION_STATS_FILE
    if not file.is_file():
        raise UsageError(
            f"{file} is missing: {path} holds no action statistics; point to a checkpoint written by scripts/train_sft.py"
        )
    check_files(path, DAMAGED_FIX)  # its other files too: the callers read config.json next
    with reading(file, DAMAGED_FIX, (ValueError, KeyError, TypeError, AttributeError)):
        return {k: ActionTokenizer.from_dict(v) for k, v in json.loads(file.read_text()).items()}


def pick_action_tokenizer(tokenizers: dict[str, ActionTokenizer], unnorm_key: str | None) -> ActionTokenizer:
    """The statistics named `unnorm_key`, or the only ones when the checkpoint has a single dataset."""
    if unnorm_key is None:
        if len(tokenizers) != 1:
            raise UsageError(f"this checkpoint has action statistics for {sorted(tokenizers)}; pass unnorm_key=<one of them>")
        return next(iter(tokenizers.values()))
    if unnorm_key not in tokenizers:
        raise UsageError(f"unnorm_key={unnorm_key!r} is not in this checkpoint; choose one of {sorted(tokenizers)}")
    return tokenizers[unnorm_key]


def load_checkpoint(path: str | os.PathLike) -> tuple[VLA, dict[str, ActionTokenizer]]:
    return load_model(path), load_action_tokenizers(path)


def merge_lora(adapter: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Fold the LoRA adapters of the checkpoint ``adapter`` into its base weights and write a plain checkpoint, which
    acts as the adapter does and loads without peft, to ``output`` (atomically); return ``output``."""
    adapter, output = Path(adapter), Path(output)
    if not is_adapter(adapter):
        raise UsageError(f"{adapter} holds no adapter_config.json, so it is not a LoRA checkpoint; pass the final/ "
                         "(or checkpoints/step-N/) directory of a run with model.lora.r > 0")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} exists and is not an empty directory; choose a new output path")
    vla, action_tokenizers = load_checkpoint(adapter)
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        merged = vla._replace(model=vla.model.merge_and_unload())
    write_atomically(output, lambda tmp: save_checkpoint(merged, action_tokenizers, tmp))
    return output
