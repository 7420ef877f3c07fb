"""Render labelled scenes for vision-language pretraining (tasks/scenes.py; conf/generate_scenes.yaml).

    python scripts/generate_scenes.py num_scenes=16000 workers=2 output_dir=data/scenes
"""

import os

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from tasks.scenes import generate_scenes


@hydra.main(version_base=None, config_path="../conf", config_name="generate_scenes")
def main(cfg: DictConfig) -> None:
    run(generate_scenes, cfg)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    register_configs("generate_scenes_schema")
    main()
