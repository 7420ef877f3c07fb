"""The helpers every script shell uses: the Hydra schemas in one place, and ``run(fn, cfg)``.

``run`` turns the composed config into its dataclass (whose ``__post_init__`` checks the values), refuses keys that
Hydra's ``+key=value`` slipped past the schema, calls ``fn`` and turns a ``UsageError`` into one line,
``error: <message>``, and exit status 1. Any other exception is a bug and shows its traceback. ``report(call)`` does
the same for the argparse scripts (merge_lora, benchmark).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from store.errors import UsageError

# Every schema, under the name the defaults lists of conf/*.yaml give it, and where it is defined. A schema's module
# is imported when it is registered, so that a script (and each of its spawned workers, which import the script
# again) loads only what it runs: demo generation never loads torch.
SCHEMAS = {
    "generate_demos_schema": "tasks.demos:DemoConfig",
    "generate_scenes_schema": "tasks.scenes:SceneConfig",
    "pretrain_schema": "vla.pretrain:PretrainConfig",
    "sft_schema": "vla.sft:SFTConfig",
    "evaluate_schema": "harness.evaluate:EvalConfig",
    "calibrate_schema": "harness.calibrate:CalibrateConfig",
    "collect_preferences_schema": "harness.preferences:CollectConfig",
    "dpo_schema": "vla.dpo:DPOConfig",
    "pipeline_schema": "harness.pipeline:PipelineConfig",
}


def register_configs(*names: str) -> None:
    """Register the schemas ``names`` (every one when none is given) in Hydra's ConfigStore."""
    for name in names or SCHEMAS:
        module, attr = SCHEMAS[name].split(":")
        ConfigStore.instance().store(name=name, node=getattr(importlib.import_module(module), attr))


def check_known_keys(cfg: Any, prefix: str = "", root: type | None = None) -> None:
    """Refuse attributes that no dataclass field declares, at any depth (OmegaConf sets a ``+key`` as one)."""
    root = root or type(cfg)
    extra = sorted(set(vars(cfg)) - {f.name for f in fields(cfg)})
    if extra:
        raise UsageError(f"unknown config key {prefix}{extra[0]}; check its spelling against conf/ "
                         f"({root.__module__}.{root.__qualname__} lists every key)")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            check_known_keys(value, f"{prefix}{f.name}.", root)


def run(fn: Callable[[Any], Any], cfg: DictConfig) -> Any:
    """``fn`` of the config object, with every input problem reported as one line (see the module docstring)."""
    try:
        obj = OmegaConf.to_object(cfg)
        check_known_keys(obj)
        return fn(obj)
    except MissingMandatoryValue as e:
        sys.exit(f"error: {e.full_key} is required; pass {e.full_key}=PATH")
    except UsageError as e:
        sys.exit(f"error: {e}")


def report(call: Callable[[], Any]) -> int:
    """The argparse scripts' exit status: 0 after ``call()``, or 1 after printing its ``UsageError`` as one line,
    ``error: <message>``, on stderr (what ``run`` does for the Hydra scripts)."""
    try:
        call()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
