"""Fixtures of the parallel action head's tests (test_parallel_decoding.py, test_chunking.py): tiny parallel VLAs and the
action tokenizer they act with."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from vla.action_tokenizer import ActionTokenizer
from vla.grounding import PLAN_TOKENS, location_tokenizer
from vla.model import VLA, build_vla
from vla.parallel import set_action_head
from vla.text_tokenizer import action_token_offset, build_tokenizer


@pytest.fixture(scope="session")
def parallel_tokenizer():
    return build_tokenizer(["pick up the red cube", "push the blue ball into the green bowl"] * 10, vocab_size=300)


@pytest.fixture(scope="session")
def action_tok(parallel_tokenizer) -> ActionTokenizer:
    q01 = np.array([-0.03, -0.02, -0.05, -0.2, -0.1, -0.4, 0.0])
    return ActionTokenizer(q01, -2 * q01 + 0.01, action_token_offset(parallel_tokenizer))


@pytest.fixture(scope="session")
def parallel_vla(parallel_tokenizer, tiny_model) -> Callable[..., VLA]:
    """``parallel_vla(arch="fast_vlm", chunk=3, plan=False)``: a tiny random-init VLA with the parallel head, in
    eval mode; with ``plan``, grounded (2 plan tokens and a location tokenizer); ``arch="fast_vlm/film"`` gives FiLM,
    its scales and shifts moved off their zero init."""

    def make(arch: str = "fast_vlm", chunk: int = 3, plan: bool = False, seed: int = 0) -> VLA:
        torch.manual_seed(seed)
        arch, _, film = arch.partition("/")
        vla = build_vla(tiny_model(arch=arch, film=bool(film)), parallel_tokenizer)
        with torch.no_grad():
            for layer in vla.model.film if film else ():
                layer.weight.normal_(0, 0.3)
        set_action_head(vla.model, "parallel", chunk)
        if plan:
            vla.model.config.plan_tokens = PLAN_TOKENS
            vla = vla._replace(location_tokenizer=location_tokenizer(action_token_offset(parallel_tokenizer)))
        vla.model.eval()
        return vla

    return make
