"""The main job in one command: demos -> SFT -> evaluation -> preferences -> DPO -> evaluation, then one table
(harness/pipeline.py; conf/pipeline.yaml).

    python scripts/pipeline.py                                   # embedded defaults, ~40 min on 2 CPU cores
    python scripts/pipeline.py 'stages="eval,dpo"' output_dir=runs/pipeline
    python scripts/pipeline.py experiment=full                  # more demos, steps, episodes (conf/experiment/)
"""

import os

import hydra
from omegaconf import DictConfig

from harness.cli import register_configs, run
from harness.pipeline import Pipeline


@hydra.main(version_base=None, config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    run(lambda pipeline: Pipeline(pipeline).run(), cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    register_configs("pipeline_schema")
    main()
