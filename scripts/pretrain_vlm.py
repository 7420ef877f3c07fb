"""Vision-language pretraining (stage 0) on simulator scenes (vla/pretrain.py; conf/pretrain_vlm.yaml).

    python scripts/generate_scenes.py output_dir=data/scenes
    python scripts/pretrain_vlm.py scenes=data/scenes output_dir=runs/base
    python scripts/train_sft.py dataset=data/pick model.pretrained=runs/base/final output_dir=runs/sft-pick
"""

import os

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from vla.pretrain import pretrain


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain_vlm")
def main(cfg: DictConfig) -> None:
    run(pretrain, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    register_configs("pretrain_schema")
    main()
