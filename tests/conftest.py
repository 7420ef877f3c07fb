import os
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny test models gain nothing from 2 threads

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> Callable:
    """``tiny_model(cls=VLAModelConfig, **overrides)``: the tiny model of conf/model/tiny.yaml (a ~0.13M-parameter
    Llava, 32 px images) as a ``cls``, e.g. ``vla.sft.ModelConfig``, with ``overrides`` such as ``arch="fast_vlm"``."""
    from vla.model import VLAModelConfig

    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml"))

    def make(cls: type = VLAModelConfig, **overrides) -> VLAModelConfig:
        return cls(**{**values, **overrides})

    return make
