"""Supervised fine-tuning of a VLA on a LeRobot dataset (configs in conf/train_sft.yaml, docs in docs/training.md).

    python scripts/train_sft.py dataset=data/pick output_dir=runs/sft-pick
    python scripts/train_sft.py dataset=data/pick output_dir=runs/sft-pick resume=true
    torchrun --nproc-per-node 2 scripts/train_sft.py dataset=data/pick output_dir=runs/sft-pick-ddp
"""

import os
import sys

import hydra
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from store.lerobot import DatasetError
from vla.train import SFTConfig, SFTError, register_configs, train


@hydra.main(version_base=None, config_path="../conf", config_name="train_sft")
def main(cfg: DictConfig) -> None:
    try:
        sft: SFTConfig = OmegaConf.to_object(cfg)  # runs the __post_init__ checks
    except MissingMandatoryValue as e:
        sys.exit(f"error: {e.full_key} is required; pass {e.full_key}=PATH")
    except ValueError as e:
        sys.exit(f"error: invalid config: {e}")
    try:
        train(sft)
    except (SFTError, DatasetError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after BPE training
    register_configs()
    main()
