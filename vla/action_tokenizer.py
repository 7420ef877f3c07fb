"""Continuous robot actions <-> discrete language-model token ids (OpenVLA-style binning)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

GRIPPER_DIM = 6  # in (dx, dy, dz, droll, dpitch, dyaw, gripper)


class ActionTokenizer:
    """Maps actions of shape (..., D) to int64 token ids of shape (..., D) and back, one token per dimension.

    Bin contract, per dimension d:
      - bounds: ``[q01[d], q99[d]]``, the 1st and 99th percentiles of the training actions. Dimensions listed in
        ``absolute_dims`` (by default the gripper, index 6) keep the fixed bounds ``[0, 1]``: OpenVLA leaves the
        gripper unnormalised because it is a 0 = close / 1 = open command, not a distribution to stretch; fitting
        its percentiles would make a dataset that rarely closes the gripper unable to say "close".
      - normalise: ``u = 2 * (x - q01) / (q99 - q01) - 1``, then clip to ``[-1, 1]``. A degenerate dimension
        (``q99 == q01``) never divides by zero: every value maps to an end bin and decodes to ``q01``.
      - edges: ``linspace(-1, 1, n_bins + 1)``; bin ``b`` holds ``edges[b] <= u < edges[b + 1]`` (``u == 1`` goes
        to the last bin).
      - centres: ``c_b = -1 + (2 * b + 1) / n_bins``; decoding returns ``q01 + (c_b + 1) / 2 * (q99 - q01)``, so
        the round-trip error of an in-range value is at most half a bin, ``(q99 - q01) / (2 * n_bins)``. The
        gripper decodes to ``1 / (2 * n_bins)`` or ``1 - 1 / (2 * n_bins)``, never exactly 0 or 1; threshold it.
      - ids: bin ``b`` is token id ``token_offset + b``; all dimensions share the contiguous range
        ``[token_offset, token_offset + n_bins)`` of the language model's vocabulary.
      - out of range: ``encode`` clips values beyond the bounds into the end bins (``diagnostics`` reports how
        often); it raises on non-finite values. ``decode`` raises on any id outside the range.
    """

    def __init__(
        self,
        q01: Sequence[float],
        q99: Sequence[float],
        token_offset: int,
        n_bins: int = 256,
        absolute_dims: Sequence[int] = (GRIPPER_DIM,),
    ) -> None:
        q01_arr = np.asarray(q01, dtype=np.float64).copy()
        q99_arr = np.asarray(q99, dtype=np.float64).copy()
        if q01_arr.ndim != 1 or q01_arr.shape != q99_arr.shape:
            raise ValueError(f"q01 and q99 must be 1-D and of equal length, got {q01_arr.shape} and {q99_arr.shape}")
        if not (np.isfinite(q01_arr).all() and np.isfinite(q99_arr).all()):
            raise ValueError("q01 and q99 must be finite; fit the tokenizer on actions without NaN or inf")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        if token_offset < 0:
            raise ValueError(f"token_offset must be a non-negative token id, got {token_offset}")
        dims = q01_arr.shape[0]
        absolute = tuple(int(d) for d in absolute_dims)
        if any(not 0 <= d < dims for d in absolute):
            raise ValueError(f"absolute_dims {absolute} must index the {dims} action dimensions")
        q01_arr[list(absolute)] = 0.0
        q99_arr[list(absolute)] = 1.0
        if (q99_arr < q01_arr).any():
            raise ValueError(f"q99 must be >= q01 in every dimension, got q01={q01_arr}, q99={q99_arr}")
        self.q01 = q01_arr
        self.q99 = q99_arr
        self.token_offset = int(token_offset)
        self.n_bins = int(n_bins)
        self.absolute_dims = absolute

    @classmethod
    def fit(
        cls,
        actions: np.ndarray,
        token_offset: int,
        n_bins: int = 256,
        absolute_dims: Sequence[int] = (GRIPPER_DIM,),
    ) -> ActionTokenizer:
        """Fit per-dimension bounds as the 1st/99th percentiles of ``actions`` (N, D)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"actions must be a non-empty (N, D) array, got shape {actions.shape}")
        q01, q99 = np.percentile(actions, [1.0, 99.0], axis=0)
        return cls(q01, q99, token_offset, n_bins, absolute_dims)

    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, Sequence[float]],
        token_offset: int,
        n_bins: int = 256,
        absolute_dims: Sequence[int] = (GRIPPER_DIM,),
    ) -> ActionTokenizer:
        """Build from a dataset statistics entry holding ``q01`` and ``q99`` (e.g. meta/stats.json["action"])."""
        return cls(stats["q01"], stats["q99"], token_offset, n_bins, absolute_dims)

    @property
    def action_dim(self) -> int:
        return self.q01.shape[0]

    @property
    def bin_centers(self) -> np.ndarray:
        """(n_bins,) bin centres in normalised units [-1, 1]."""
        return -1.0 + (2.0 * np.arange(self.n_bins) + 1.0) / self.n_bins

    def _check_dims(self, arr: np.ndarray, what: str) -> None:
        if arr.ndim == 0 or arr.shape[-1] != self.action_dim:
            raise ValueError(f"{what} must have shape (..., {self.action_dim}), got {arr.shape}")

    def normalize(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (normalised values clipped to [-1, 1], boolean mask of values that were clipped), both (..., D)."""
        x = np.asarray(actions, dtype=np.float64)
        self._check_dims(x, "actions")
        if not np.isfinite(x).all():
            raise ValueError("actions contain NaN or inf; they cannot be tokenized")
        span = self.q99 - self.q01
        safe_span = np.where(span > 0, span, 1.0)
        u = np.where(span > 0, 2.0 * (x - self.q01) / safe_span - 1.0, np.where(x > self.q01, 1.0, -1.0))
        clipped = (x < self.q01) | (x > self.q99)
        return np.clip(u, -1.0, 1.0), clipped

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Actions (..., D) float -> token ids (..., D) int64 in [token_offset, token_offset + n_bins)."""
        u, _ = self.normalize(actions)
        bins = np.clip(np.floor((u + 1.0) / 2.0 * self.n_bins), 0, self.n_bins - 1).astype(np.int64)
        return bins + self.token_offset

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (..., D) -> actions (..., D) float32 at the bin centres, in the original units."""
        ids = np.asarray(token_ids)
        self._check_dims(ids, "token_ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
        bins = ids.astype(np.int64) - self.token_offset
        if ((bins < 0) | (bins >= self.n_bins)).any():
            bad = ids[(bins < 0) | (bins >= self.n_bins)]
            raise ValueError(
                f"token ids {bad[:8].tolist()} lie outside the action range "
                f"[{self.token_offset}, {self.token_offset + self.n_bins}); constrain decoding to action tokens"
            )
        u = self.bin_centers[bins]
        return (self.q01 + (u + 1.0) / 2.0 * (self.q99 - self.q01)).astype(np.float32)

    def diagnostics(self, actions: np.ndarray) -> dict[str, object]:
        """Bin usage, clipping and round-trip error of ``actions`` (N, D), as JSON-ready lists indexed by dimension.

        Keys: ``n``; ``bin_counts`` (D lists of n_bins counts); ``bins_used`` (D); ``clipped_fraction`` (D);
        ``roundtrip_abs_error_mean`` and ``roundtrip_abs_error_max`` (D, original units, clipping included).
        """
        x = np.asarray(actions, dtype=np.float64).reshape(-1, self.action_dim)
        _, clipped = self.normalize(x)
        bins = self.encode(x) - self.token_offset  # (N, D)
        counts = np.stack([np.bincount(bins[:, d], minlength=self.n_bins) for d in range(self.action_dim)])
        err = np.abs(self.decode(bins + self.token_offset).astype(np.float64) - x)  # (N, D)
        return {
            "n": int(x.shape[0]),
            "bin_counts": counts.tolist(),
            "bins_used": (counts > 0).sum(axis=1).tolist(),
            "clipped_fraction": clipped.mean(axis=0).tolist(),
            "roundtrip_abs_error_mean": err.mean(axis=0).tolist(),
            "roundtrip_abs_error_max": err.max(axis=0).tolist(),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "q01": self.q01.tolist(),
            "q99": self.q99.tolist(),
            "n_bins": self.n_bins,
            "token_offset": self.token_offset,
            "absolute_dims": list(self.absolute_dims),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ActionTokenizer:
        missing = {"q01", "q99", "n_bins", "token_offset", "absolute_dims"} - set(data)
        if missing:
            raise ValueError(f"action tokenizer dict lacks {sorted(missing)}; write it with ActionTokenizer.to_dict")
        return cls(data["q01"], data["q99"], data["token_offset"], data["n_bins"], data["absolute_dims"])

    def save(self, path: str | os.PathLike) -> None:
        """Write ``to_dict()`` as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActionTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return (
            f"ActionTokenizer(dims={self.action_dim}, n_bins={self.n_bins}, "
            f"ids=[{self.token_offset}, {self.token_offset + self.n_bins}), absolute_dims={self.absolute_dims})"
        )
