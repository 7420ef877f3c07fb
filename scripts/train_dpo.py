"""DPO of a VLA on a preference set (configs in conf/train_dpo.yaml, docs in docs/dpo.md).

    python scripts/train_dpo.py policy=runs/sft/final preferences=prefs/sft output_dir=runs/dpo beta=0.1
    python scripts/train_dpo.py policy=runs/sft/final preferences=prefs/sft output_dir=runs/dpo resume=true
"""

import sys

import hydra
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from store.lerobot import DatasetError
from vla.dpo import DPOConfig, DPOError, register_configs, train_dpo


@hydra.main(version_base=None, config_path="../conf", config_name="train_dpo")
def main(cfg: DictConfig) -> None:
    try:
        dpo: DPOConfig = OmegaConf.to_object(cfg)  # runs the __post_init__ checks
    except MissingMandatoryValue as e:
        sys.exit(f"error: {e.full_key} is required; pass {e.full_key}=PATH")
    except ValueError as e:
        sys.exit(f"error: invalid config: {e}")
    try:
        train_dpo(dpo)
    except (DPOError, DatasetError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    register_configs()
    main()
