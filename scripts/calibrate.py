"""Fit a policy's calibrated probability of success on rollouts from its own calibration seeds (harness/calibrate.py;
conf/calibrate.yaml; docs/calibration.md).

    python scripts/calibrate.py policy=runs/sft/final 'task="reach,pick"' episodes_per_task=100
    python scripts/calibrate.py policy=perturbed 'task="reach,pick"' episodes_per_task=150 output_dir=runs/perturbed
"""

import os
import sys
from functools import partial

import hydra
from omegaconf import DictConfig

from harness.calibrate import calibrate
from harness.cli import register_configs, run


@hydra.main(version_base=None, config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    run(partial(calibrate, command="python scripts/calibrate.py " + " ".join(sys.argv[1:])), cfg)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    register_configs("calibrate_schema")
    main()
