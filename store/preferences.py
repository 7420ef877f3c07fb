"""The preference-set format: a collection's rollouts as a LeRobot dataset plus two tables, and its reader.

Under the set's root: the LeRobot v3 dataset of every rollout (episode = start * K + k), ``rollouts.parquet`` (one
row per episode: start, seeds, outcome, judge scores, safety counts, action token ids (T, D), log-probs,
confidences, chunk offsets (T,): steps since each action's chunk was predicted, 0 when absent) and ``pairs.parquet``
(pair_index, start_index, chosen / rejected episode indices, per-axis scores, gap, main axis, reason).
``harness.preferences`` writes it, ``vla.dpo`` trains on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from store.errors import UsageError
from store.files import write_parquet
from store.intact import read_parquet, reading
from store.lerobot import LeRobotDataset

PAIR_FILTERS = ("all", "chosen_success")  # which pairs of a set a reader keeps
PAIRS_FILE = "pairs.parquet"  # pair_index, start_index, chosen, rejected (episode indices), scores, axis, reason
ROLLOUTS_FILE = "rollouts.parquet"  # one row per episode: episode_index, token_ids (T, D), scores, ...


def write_tables(root: Path, records: list[dict]) -> None:
    """``rollouts.parquet`` and ``pairs.parquet`` of the judged start records (``{"rollouts", "pairs"}`` each), in
    start order."""
    rollouts, pairs = _tables(records)
    write_parquet(root / ROLLOUTS_FILE, rollouts)
    write_parquet(root / PAIRS_FILE, pairs)


def _tables(records: list[dict]) -> tuple[pa.Table, pa.Table]:
    """(rollouts, pairs) tables of the staged start records, in start order."""
    rollouts = pa.Table.from_pylist([r for rec in records for r in rec["rollouts"]])
    i = rollouts.schema.get_field_index("error")
    rollouts = rollouts.set_column(i, "error", rollouts["error"].cast(pa.string()))  # all None: null type otherwise
    pairs = [{"pair_index": i, **p} for i, p in enumerate(p for rec in records for p in rec["pairs"])]
    empty = pa.schema([(k, pa.int64()) for k in ("pair_index", "start_index", "chosen", "rejected")])
    return rollouts, pa.Table.from_pylist(pairs, schema=None if pairs else empty)


class PreferenceSet:
    """A preference set on disk: its rollouts as a LeRobot dataset, their action token ids and the judged pairs."""

    def __init__(self, root: str | os.PathLike, pairs: str = "all"):
        """``pairs``: all, or chosen_success (only the pairs whose chosen rollout succeeded)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"preferences={root} does not exist; collect it with scripts/collect_preferences.py "
                             "or fix the path")
        for name in (PAIRS_FILE, ROLLOUTS_FILE):
            if not (self.root / name).is_file():
                raise UsageError(f"preferences={root} holds no {name}; rerun scripts/collect_preferences.py with the "
                                 "same arguments until it writes summary.json")
        self.frames = LeRobotDataset(self.root)
        fix = f"collect the preference set again (delete {root} and rerun scripts/collect_preferences.py)"
        rollouts = read_parquet(self.root / ROLLOUTS_FILE, fix)
        optional = [c for c in ("chunk_offsets",) if c in rollouts.schema.names]
        with reading(self.root / ROLLOUTS_FILE, fix, (KeyError,)):  # a table without the columns read here
            rows = rollouts.select(["episode_index", "token_ids", "success", *optional]).to_pylist()
        self.token_ids = {r["episode_index"]: np.asarray(r["token_ids"], dtype=np.int64) for r in rows}  # (T, D)
        self.offsets = {r["episode_index"]: np.asarray(r.get("chunk_offsets") or np.zeros(len(r["token_ids"])),
                                                       dtype=np.int64) for r in rows}  # (T,)
        success = {r["episode_index"]: r["success"] for r in rows}
        self.pairs = read_parquet(self.root / PAIRS_FILE, fix, ["start_index", "chosen", "rejected"]).to_pylist()
        if not self.pairs:
            raise UsageError(f"preferences={root} holds no pairs (no start state's rollouts differed by more than "
                             "the margin); collect more starts or rollouts_per_start, or lower margin")
        if pairs == "chosen_success":
            self.pairs = [p for p in self.pairs if success[p["chosen"]]]
            if not self.pairs:
                raise UsageError(f"preferences={root} holds no pair whose chosen rollout succeeded; pass pairs=all, "
                                 "or collect more starts")
        for ep in self.episodes():
            if ep not in self.token_ids or len(self.token_ids[ep]) != len(self.frames.episode_frames(ep)):
                raise UsageError(f"preferences={root}: episode {ep} has no token ids for each of its frames in "
                                 f"{ROLLOUTS_FILE}; collect the preference set again")

    def episodes(self) -> list[int]:
        """Episode indices that appear in some pair."""
        return sorted({p[side] for p in self.pairs for side in ("chosen", "rejected")})

    def check_action_tokens(self, tok, plan: int = 0) -> None:
        """Refuse token ids outside ``tok``'s (a vla ActionTokenizer's) (plan + action_dim) x [token_offset,
        + n_bins): a grounded policy's ``plan`` tokens come first and share the action ids."""
        lo, hi, width = tok.token_offset, tok.token_offset + tok.n_bins, plan + tok.action_dim
        for ep in self.episodes():
            ids = self.token_ids[ep]
            if ids.shape[1] != width or ids.min() < lo or ids.max() >= hi:
                raise UsageError(f"preferences={self.root}: episode {ep} holds token ids outside the policy's "
                                 f"{width} x [{lo}, {hi}) plan and action tokens; collect preferences with this policy")

    def steps(self, ep: int, n: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray,
                                                             np.ndarray]:
        """The first ``n`` (all) steps of episode ``ep``: images (n, H, W, 3) uint8, instructions, token ids (n, D),
        proprio states (n, S), chunk offsets (n,). Images and states are those each step's action was predicted
        from: frame t - offset_t (the step's own frame unless a chunked policy acted)."""
        items = [self.frames[i] for i in self.frames.episode_frames(ep)[:n]]
        offsets = self.offsets[ep][: len(items)]
        source = np.arange(len(items)) - offsets  # (n,)
        images, states = np.stack([it["image"] for it in items]), np.stack([it["state"] for it in items])
        instructions = [self.frames.episodes[ep]["instruction"]] * len(items)
        return images[source], instructions, self.token_ids[ep][: len(items)], states[source], offsets
