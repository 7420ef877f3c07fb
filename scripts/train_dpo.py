"""DPO of a VLA on a preference set (configs in conf/train_dpo.yaml, docs in docs/dpo.md).

    python scripts/train_dpo.py policy=runs/sft/final preferences=prefs/sft output_dir=runs/dpo beta=0.1
    python scripts/train_dpo.py policy=runs/sft/final preferences=prefs/sft output_dir=runs/dpo resume=true
"""

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from vla.dpo import train_dpo


@hydra.main(version_base=None, config_path="../conf", config_name="train_dpo")
def main(cfg: DictConfig) -> None:
    run(train_dpo, cfg)


if __name__ == "__main__":
    register_configs("dpo_schema")
    main()
