"""The shipped base: a stage-0 checkpoint (``vla.pretrain``) kept in the repository, as real VLAs start from a
downloaded VLM.

It was built with one command (docs/training.md, "Stage 0") and exported here in fp16 by ``export``, which prints
the digest that ``SHIPPED_SHA256`` records; ``shipped_base()`` checks that digest before anyone trains on it::

    python scripts/generate_scenes.py output_dir=data/scenes
    python scripts/pretrain_vlm.py scenes=data/scenes output_dir=runs/base
    python -m vla.bases runs/base/final            # writes vla/bases/scene-base, prints its sha256
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from store.errors import UsageError
from store.files import write_atomically
from vla.model import load_model

SHIPPED = Path(__file__).resolve().parent / "bases" / "scene-base"
SHIPPED_SHA256 = "f6081643330ccd5330781bfafe813c46f9d2ed35cde864f3b100b3c8d7d18c8a"
WEIGHTS = "model.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_base() -> Path:
    """The shipped base's directory, after checking its weights against ``SHIPPED_SHA256``."""
    weights = SHIPPED / WEIGHTS
    if not weights.is_file():
        raise UsageError(f"the shipped base {SHIPPED} has no {WEIGHTS}; restore it (git checkout -- {SHIPPED}) or "
                         "build one from scratch with the pipeline's base=pretrain")
    found = file_sha256(weights)
    if found != SHIPPED_SHA256:
        raise UsageError(f"the shipped base {weights} has sha256 {found[:16]}..., not {SHIPPED_SHA256[:16]}...: it "
                         f"is damaged or was replaced; restore it (git checkout -- {SHIPPED}) or use base=pretrain")
    return SHIPPED


def export(source: str | Path, target: Path = SHIPPED) -> str:
    """Write the checkpoint at ``source`` to ``target`` in fp16 (half the bytes; loading upcasts to fp32) and
    return its weights' sha256."""
    vla = load_model(source)
    vla = vla._replace(model=vla.model.to(torch.float16))
    write_atomically(target, vla.save_pretrained)
    return file_sha256(target / WEIGHTS)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vla.bases CHECKPOINT_DIR  (e.g. runs/base/final)")
    print(f"wrote {SHIPPED}; set SHIPPED_SHA256 = \"{export(sys.argv[1])}\" in vla/bases.py")
