"""The whole SFT loop vs a naive ``transformers`` forward/backward, side by side (``scripts/benchmark.py --only
train``)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from store.lerobot import Episode, LeRobotDataset
from store.writer import DatasetWriter
from vla.inputs import PROMPT_TEMPLATE, build_inputs, model_inputs
from vla.model import VLA, VLAModelConfig, build_vla
from vla.sft import ModelConfig, SFTConfig, TrainConfig, state_tokenizer, train
from vla.text_tokenizer import action_token_offset, build_tokenizer


def _naive_steps_per_s(vla: VLA, images: np.ndarray, instructions: list[str], action_ids: np.ndarray,
                       states: np.ndarray, steps: int) -> float:
    """Steps/s of a plain transformers loop on one prepared batch: ``model(**inputs)`` with the full labels (logits
    over the whole vocabulary at every position, the model's own loss), backward, a default AdamW step."""
    model = vla.model.train()
    batch = model_inputs(build_inputs(vla, images, instructions, action_ids, states))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    for i in range(steps + 1):  # the first step is an untimed warm-up
        if i == 1:
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def naive_step_throughput(steps: int = 8, batch_size: int = 16, model: VLAModelConfig | None = None,
                          image_size: int = 96) -> dict:
    """The whole SFT loop vs a naive transformers loop, side by side in this process, on the same model and batch size.

    The loop is ``train`` on a synthetic dataset (random ``image_size`` px frames, PNG decoding, augmentation, metrics
    and logging included; ``steps`` timed steps after one warm-up step, no checkpoint until the end). The naive loop
    (see ``_naive_steps_per_s``) runs on one batch of those frames before and after it, on a model of the same
    config; the faster of the two counts, so that a load change on a shared machine cannot favour the loop.
    """
    model = model or VLAModelConfig()
    rng = np.random.default_rng(0)
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    frames = batch_size * (steps + 1) // 4 + 1  # per episode, 4 episodes: one epoch covers the run
    with tempfile.TemporaryDirectory() as tmp:
        writer = DatasetWriter(Path(tmp) / "bench", fps=10, state_names=names, action_names=names, config={})
        for e in range(4):
            writer.write_episode(e, Episode(
                task="bench", instruction=f"pick up the {['red', 'blue', 'green', 'yellow'][e]} cube", seed=e,
                success=True, images=rng.integers(0, 256, (frames, image_size, image_size, 3), dtype=np.uint8),
                states=rng.normal(size=(frames, 7)).astype(np.float32),
                actions=np.concatenate([rng.normal(scale=0.01, size=(frames, 6)),
                                        rng.integers(0, 2, (frames, 1))], axis=1).astype(np.float32)))
        writer.finalize()
        cfg = SFTConfig(dataset=str(Path(tmp) / "bench"), output_dir=str(Path(tmp) / "run"),
                        model=ModelConfig(**asdict(model)),
                        train=TrainConfig(steps=steps + 1, batch_size=batch_size, warmup_steps=1, eval_every=0,
                                          val_fraction=0.0, log_every=steps + 1, save_every=steps + 1))
        ds = LeRobotDataset(cfg.dataset)
        items = [ds[i] for i in range(batch_size)]
        images, instructions = np.stack([it["image"] for it in items]), [it["instruction"] for it in items]
        states = np.stack([it["state"] for it in items])
        prompts = sorted({PROMPT_TEMPLATE.format(instruction=text) for text in ds.instructions})
        vla = build_vla(model, build_tokenizer(prompts))
        offset = action_token_offset(vla.tokenizer)
        if cfg.model.proprio:  # the same prompt as the loop's model
            vla = vla._replace(state_tokenizer=state_tokenizer(ds, offset))
        action_ids = rng.integers(offset, offset + 256, (batch_size, 7))
        naive_before = _naive_steps_per_s(vla, images, instructions, action_ids, states, steps)
        summary = train(cfg)
        naive_after = _naive_steps_per_s(vla, images, instructions, action_ids, states, steps)
    naive, loop = max(naive_before, naive_after), summary["samples_per_s"] / batch_size
    return {"batch_size": batch_size, "parameters": summary["parameters"], "threads": torch.get_num_threads(),
            "loop_steps_per_s": loop, "loop_samples_per_s": summary["samples_per_s"],
            "naive_steps_per_s": naive, "naive_samples_per_s": naive * batch_size,
            "naive_steps_per_s_before_after": [naive_before, naive_after], "speedup": loop / naive}
