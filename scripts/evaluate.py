"""Evaluate any policy on a suite, optionally against a baseline on the identical episodes (harness/evaluate.py;
conf/evaluate.yaml).

    python scripts/evaluate.py policy=runs/sft/final suite=success episodes_per_task=50 workers=2
    python scripts/evaluate.py policy=expert suite=safety
    python scripts/evaluate.py policy=runs/dpo/final baseline=runs/sft/final suite=safety
"""

import os
import sys
from functools import partial

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from harness.evaluate import evaluate


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(partial(evaluate, command="python scripts/evaluate.py " + " ".join(sys.argv[1:])), cfg)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    register_configs("evaluate_schema")
    main()
