"""Generate scripted-expert demonstrations into a LeRobot v3 dataset (tasks/demos.py; conf/generate_demos.yaml).

    python scripts/generate_demos.py task=pick num_episodes=200 workers=2 output_dir=data/pick
"""

import os

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from tasks.demos import generate


@hydra.main(version_base=None, config_path="../conf", config_name="generate_demos")
def main(cfg: DictConfig) -> None:
    run(generate, cfg)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    register_configs("generate_demos_schema")
    main()
