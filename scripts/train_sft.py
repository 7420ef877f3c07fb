"""Supervised fine-tuning of a VLA on a LeRobot dataset (configs in conf/train_sft.yaml, docs in docs/training.md).

    python scripts/train_sft.py dataset=data/pick output_dir=runs/sft-pick
    python scripts/train_sft.py dataset=data/pick output_dir=runs/sft-pick resume=true
    torchrun --nproc-per-node 2 scripts/train_sft.py dataset=data/pick output_dir=runs/sft-pick-ddp
"""

import os

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from vla.sft import train


@hydra.main(version_base=None, config_path="../conf", config_name="train_sft")
def main(cfg: DictConfig) -> None:
    run(train, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after BPE training
    register_configs("sft_schema")
    main()
