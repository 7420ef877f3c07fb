"""SFT's data: the frames of a LeRobot dataset as tokenized training examples, batched and (optionally) augmented.

A dataset with the simulator's scene labels (``observation.object_positions``, episode ``objects`` and
``target_index``) also feeds grounded SFT (``vla.grounding``): the plan tokens of the named object's place before
the actions, and co-training rows of grounding queries about the frame's own scene. For a parallel action head
(``vla.parallel``) each frame's targets are the chunk of its own and its episode's next K - 1 actions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from store.lerobot import OBJECTS_KEY, DatasetError, LeRobotDataset
from vla.action_tokenizer import ActionTokenizer
from vla.grounding import Queries, plan_tokens
from vla.inputs import PROMPT_TEMPLATE, build_inputs, build_queries
from vla.loop import AUGMENT, QUERY, seed_of
from vla.model import VLA
from vla.parallel import QUERY_PREFIX, is_parallel, parallel_inputs

SHIFT, BRIGHTNESS, CONTRAST = 0.06, 0.15, 0.15  # augmentation: max shift (fraction of the side), jitter ranges


def open_dataset(path: str, features: tuple[str, ...] = ("action",)) -> LeRobotDataset:
    """The dataset at ``path``, checked for what training needs: q01/q99 of ``features`` in meta/stats.json."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset={path} does not exist; generate it with scripts/generate_demos.py or fix the path")
    ds = LeRobotDataset(root)
    for feature in features:
        missing = [k for k in ("q01", "q99") if k not in ds.stats.get(feature, {})]
        if missing:
            raise DatasetError(f"{root / 'meta/stats.json'} has no {feature} {'/'.join(missing)}; "
                               "regenerate the dataset (store.writer.DatasetWriter writes them)")
    return ds


class FrameDataset(Dataset):
    """Frames of a LeRobotDataset with their action token ids; indexed by (epoch, batch, frame) keys.

    With ``chunk`` K > 0 an item also holds ``chunk_ids`` (K, D), the token ids of the frame's action and of the
    next K - 1 actions of its episode, and ``chunk_valid`` (K,), false for those past the episode's last frame:
    they are not scored (ACT's ``is_pad``) rather than invented (a repeated last action would teach the policy to go
    on moving where the demonstration stopped)."""

    def __init__(self, ds: LeRobotDataset, action_tokenizer: ActionTokenizer, chunk: int = 0):
        self.ds, self.chunk = ds, chunk
        self.actions = ds.columns["action"].astype(np.float32)  # (N, D)
        self.action_ids = action_tokenizer.encode(self.actions)  # (N, D)
        if chunk:
            self.ahead = np.zeros((len(ds), chunk), np.int64)  # (N, K): the frame of each action of the chunk
            self.valid = np.zeros((len(ds), chunk), bool)
            for ep in range(len(ds.episodes)):
                frames = ds.episode_frames(ep)
                ahead = np.arange(frames.start, frames.stop)[:, None] + np.arange(chunk)  # (T, K)
                self.ahead[frames.start : frames.stop] = np.minimum(ahead, frames.stop - 1)
                self.valid[frames.start : frames.stop] = ahead < frames.stop

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        frame = key[2]
        item = self.ds[frame]
        out = {"key": key, "image": item["image"], "instruction": item["instruction"], "state": item["state"],
               "action_ids": self.action_ids[frame], "action": self.actions[frame]}
        if self.chunk:
            out.update(chunk_ids=self.action_ids[self.ahead[frame]], chunk_valid=self.valid[frame])
        if "object_positions" in item:
            episode = self.ds.episodes[item["episode_index"]]
            out.update(objects=episode["objects"], target=episode["target_index"], positions=item["object_positions"])
        return out


def has_scene_labels(ds: LeRobotDataset) -> bool:
    """Whether every frame carries the objects' labels and places that grounded SFT reads."""
    return OBJECTS_KEY in ds.columns and all(e.get("target_index") is not None for e in ds.episodes)


def instruction_templates(ds: LeRobotDataset) -> list[str]:
    """The dataset's instructions with the named object's label replaced by ``{target}`` (``Queries`` templates:
    a plan query names any object of the scene in the tasks' own words)."""
    templates = set()
    for episode in ds.episodes:
        name = episode["objects"][episode["target_index"]]
        templates.add(episode["instruction"].replace(name, "{target}", 1))
    return sorted(t for t in templates if "{target}" in t)


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (replicate-pad, random crop back) and brightness/contrast jitter of uint8 (B, H, W, 3) images."""
    B, H, W, _ = images.shape
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    pad = max(1, round(SHIFT * max(H, W)))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, 3, H + 2 pad, W + 2 pad)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=generator).tolist()
    x = torch.stack([padded[b, :, dy[b] : dy[b] + H, dx[b] : dx[b] + W] for b in range(B)])
    contrast = 1 + CONTRAST * (2 * torch.rand(B, 1, 1, 1, generator=generator) - 1)
    brightness = 255 * BRIGHTNESS * (2 * torch.rand(B, 1, 1, 1, generator=generator) - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class Collator:
    """Frames -> a ``build_inputs`` batch plus ``actions`` (B, D) float; the augmentation of a batch is seeded by its
    (epoch, batch) key and the rank.

    Grounded (``queries`` given): each row's answer is the plan (the named object's place, ``Queries.plan``) then
    its action tokens; and for each kind of the ``cotrain`` mixture ({"list": 0.125, ...}: fractions of the batch),
    that many of the first rows ask a grounding query about their own frame instead (``Queries.sample``, drawn by
    the QUERY stream of the batch key). Such a batch comes from ``build_queries``; its ``actions`` hold the action rows
    only: the last ``len(actions)`` rows.

    For a parallel model (``vla.parallel``; items of a ``FrameDataset`` with its chunk) the action rows come from
    ``parallel_inputs`` (the plan, when the model has one, then the chunk) and the co-training rows from
    ``build_queries`` under keys prefixed ``vla.parallel.QUERY_PREFIX``; ``actions`` hold the action rows.
    """

    def __init__(self, vla: VLA, seed: int, rank: int, augment: bool, queries: Queries | None = None,
                 cotrain: dict[str, float] | None = None):
        self.vla, self.seed, self.rank, self.augment = vla, seed, rank, augment
        self.queries, self.cotrain = queries, dict(cotrain or {})
        self.parallel, self.plan = is_parallel(vla.model), plan_tokens(vla.model)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        epoch, b, _ = items[0]["key"]
        images = torch.from_numpy(np.stack([it["image"] for it in items]))  # (B, H, W, 3)
        if self.augment:
            generator = torch.Generator().manual_seed(seed_of(self.seed, AUGMENT, epoch, b, self.rank))
            images = augment_images(images, generator)
        rng = np.random.default_rng(seed_of(self.seed, QUERY, epoch, b, self.rank))
        if self.parallel:
            return self._parallel(items, images, rng)
        if self.queries is not None:
            return self._grounded(items, images, rng)
        batch = build_inputs(self.vla, images, [it["instruction"] for it in items],
                             np.stack([it["action_ids"] for it in items]), np.stack([it["state"] for it in items]))
        batch["actions"] = torch.from_numpy(np.stack([it["action"] for it in items]))
        return batch

    def _kinds(self, rows: int) -> list[str]:
        return [kind for kind, share in self.cotrain.items() for _ in range(round(share * rows))]

    def _parallel(self, items: list[dict], images: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        kinds = self._kinds(len(items)) if self.queries is not None else []
        q, acts, states = len(kinds), items[len(kinds) :], np.stack([it["state"] for it in items])
        plan = [self.queries.plan(it["positions"][it["target"]], it["state"]) for it in acts] if self.plan else None
        chunks, valid = (np.stack([it[key] for it in acts]) for key in ("chunk_ids", "chunk_valid"))
        instructions = [it["instruction"] for it in acts]
        batch = parallel_inputs(self.vla, images[q:], instructions, chunks, valid, states[q:], plan)
        if kinds:
            prompts, answers = zip(*(self.queries.sample(k, it["objects"], it["positions"], rng)
                                     for k, it in zip(kinds, items)))
            queries = build_queries(self.vla, images[:q], prompts, answers, states[:q])
            batch.update({QUERY_PREFIX + key: value for key, value in queries.items()})
        batch["actions"] = torch.from_numpy(np.stack([it["action"] for it in acts]))
        return batch

    def _grounded(self, items: list[dict], images: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        kinds = self._kinds(len(items))
        prompts, answers = [], []
        for k, it in enumerate(items):
            if k < len(kinds):
                prompt, answer = self.queries.sample(kinds[k], it["objects"], it["positions"], rng)
            else:
                prompt = PROMPT_TEMPLATE.format(instruction=it["instruction"])
                answer = self.queries.plan(it["positions"][it["target"]], it["state"]) + it["action_ids"].tolist()
            prompts.append(prompt), answers.append(answer)
        batch = build_queries(self.vla, images, prompts, answers, np.stack([it["state"] for it in items]))
        batch["actions"] = torch.from_numpy(np.stack([it["action"] for it in items[len(kinds):]]))
        return batch
