"""A run directory's state for vla/loop.py: trainer state for exact resume (safetensors + JSON, no pickles), the
latest complete checkpoint, the metrics log (cut back to the checkpoint a run resumes from), and the check that a
new run never overwrites an old one."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from store.errors import UsageError, require_dir
from store.intact import check_files, read_json
from vla.model import WEIGHT_FILES

STATE_FILE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every state-dict tensor's bytes, in key order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- trainer state and checkpoints ----


def trainer_state(optimizer, scheduler, position: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON structure, tensors) of optimizer, scheduler, RNGs and data position, for ``restore_trainer_state``."""
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v.detach().cpu().contiguous()
               for i, s in opt["state"].items() for k, v in s.items()}
    np_state = np.random.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    state = {
        **position,
        "optimizer": {"param_groups": opt["param_groups"],
                      "state": {str(i): sorted(s) for i, s in opt["state"].items()}},
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": [np_state[0], *np_state[2:]]},
    }
    return state, tensors


def restore_trainer_state(path: Path, optimizer, scheduler) -> dict:
    """Load optimizer, scheduler and RNGs from checkpoint ``path``; return its data position."""
    state = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(path / STATE_TENSORS)
    opt = state["optimizer"]
    optimizer.load_state_dict({
        "state": {int(i): {k: tensors[f"optimizer.{i}.{k}"] for k in keys} for i, keys in opt["state"].items()},
        "param_groups": opt["param_groups"],
    })
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return {k: state[k] for k in ("step", "epoch", "batch", "world_size", "samples_seen")}


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The highest complete ``step-N`` under ``checkpoints`` (``.tmp-*`` and incomplete dirs ignored)."""
    found = []
    for path in checkpoints.glob("step-*") if checkpoints.is_dir() else ():
        match = _STEP_DIR.fullmatch(path.name)
        if match and all((path / f).is_file() for f in (STATE_FILE, STATE_TENSORS)) \
                and any((path / f).is_file() for f in WEIGHT_FILES):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


@contextmanager
def no_hf_progress_bars():
    """Silence transformers' "Writing model shards" bar, which would break our progress bar, then restore it."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path)


def check_output_dir(out: Path, resume: bool, record: dict, keys: tuple[str, ...]) -> Path | None:
    """The checkpoint to resume from (None: start fresh). Raise UsageError if `out` holds a run that must not be
    overwritten (no resume) or that was trained with other values of `keys` than `record` (resume), or that is
    damaged: a file where the directory goes, a corrupt config.json, a truncated file in the checkpoint to resume."""
    require_dir(out)
    held = [p.name for p in (out / "checkpoints", out / "final", out / "summary.json") if p.exists()]
    if held and not resume:
        raise UsageError(f"{out} already holds a run ({', '.join(held)}); pass resume=true to continue or choose "
                         "another output_dir")
    if resume and (out / "config.json").is_file():
        before = read_json(out / "config.json", "choose another output_dir (or delete this one to start again)")
        for key in keys:
            if before.get(key) != record[key]:
                raise UsageError(f"resume=true but {out} was trained with {key}={before.get(key)}, not "
                                 f"{record[key]}; resume with the same settings, or choose another output_dir")
    latest = latest_checkpoint(out / "checkpoints") if resume else None
    if latest is not None:
        check_files(latest, f"delete {latest} to resume from the checkpoint before it, or choose another output_dir")
    return latest


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line that a killed run cut short (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLogger:
    """Rank 0's metrics.jsonl, TensorBoard and console lines; other ranks log nothing."""

    def __init__(self, out: Path, rank: int, start_step: int):
        self.out, self.enabled = out, rank == 0
        if self.enabled:
            path = out / "metrics.jsonl"
            if path.is_file():  # drop what a killed run logged after its last checkpoint
                rows = [ln for ln in path.read_text().splitlines() if _step(ln) <= start_step]
                path.write_text("".join(ln + "\n" for ln in rows))
            self.tb = SummaryWriter(out / "tb", purge_step=start_step + 1)

    def __call__(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        for key, value in metrics.items():
            for name, v in value.items() if isinstance(value, dict) else [("", value)]:
                self.tb.add_scalar(f"{split}/{key}/{name}".rstrip("/"), v, step)
        tqdm.write(f"[{split}] step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                          if isinstance(v, float)))

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
