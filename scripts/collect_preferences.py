"""Collect judged preference pairs from K sampled rollouts per start state of a VLA policy (harness/preferences.py;
conf/collect_preferences.yaml).

    python scripts/collect_preferences.py policy=runs/sft/final starts=200 rollouts_per_start=4 output_dir=prefs/sft
"""

import os

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from harness.preferences import collect


@hydra.main(version_base=None, config_path="../conf", config_name="collect_preferences")
def main(cfg: DictConfig) -> None:
    run(collect, cfg)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    register_configs("collect_preferences_schema")
    main()
