"""Executing the chunks of a parallel action head (``vla.parallel``), row by row over a batch of episodes.

A chunk is K actions predicted from one observation: action 0 for the step it was predicted at, action k for k
steps later. ``ChunkExecution.step`` says which action each row executes now and what the policy reports with it:

    open_loop  a row predicts a chunk, executes its K actions over its next K steps, then predicts again.
               Reported: the executed action's D tokens and log-probs as predicted, ``chunk_offset`` = k (steps since
               the chunk was predicted), and the chunk's P plan tokens, whose log-probs count at k = 0 only (a
               chunk's plan is drawn once).
    ensemble   every step predicts a chunk (ACT's temporal ensembling); the executed action is the weighted mean of
               the actions that the last K chunks predicted for this step, w_i = exp(-decay * i) with i = 0 the
               oldest prediction (ACT: decay 0.01), snapped to the bin centres (encoded and decoded) so that its
               token ids describe it exactly. Reported: those tokens' log-probs under this step's own chunk
               (``chunk_offset`` 0), plan included.

So the log-probability of a whole rollout (the sum over its steps) is that of every token the policy drew, each
once, under the observation it was drawn from (open loop); ``vla.dpo`` scores a step on the frame ``t -
chunk_offset``. Rows keep their chunks across calls while the batch keeps its size; ``keep_rows`` says which rows go
on when episodes leave a batch; a batch of another size without it starts every row afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from vla.action_tokenizer import ActionTokenizer

EXECUTIONS = ("open_loop", "ensemble")
ENSEMBLE_DECAY = 0.01  # ACT's m

# rows (m,) -> their chunks' token ids (m, S) int64, the ids' log-probs (m, S) and the log-probs over the bins of
# every row's first action (m, D, n_bins); S = P + K * D
Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


class ChunkExecution:
    """Per-row chunk state of one policy: ``step(n, predict)`` for a batch of n rows, ``keep_rows``, ``reset``."""

    def __init__(self, mode: str, chunk: int, plan: int, tokenizer: ActionTokenizer,
                 decay: float = ENSEMBLE_DECAY) -> None:
        if mode not in EXECUTIONS:
            raise ValueError(f"chunk_execution={mode!r} is not one of {list(EXECUTIONS)}")
        if not np.isfinite(decay):
            raise ValueError(f"ensemble_decay must be finite, got {decay}")
        self.mode, self.K, self.P, self.tok, self.decay = mode, chunk, plan, tokenizer, float(decay)
        self.reset()

    def reset(self) -> None:
        self.rows = 0  # rows held; 0: none
        self.tokens = self.log_probs = self.offset = None  # open loop: (n, S), (n, S), (n,) next action to execute
        self.history: list[np.ndarray] = []  # ensemble: decoded chunks (n, K, D) of the last K steps, oldest first

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Only ``rows`` (indices into the last batch, in order) go on, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows:
            if self.tokens is not None:
                self.tokens, self.log_probs, self.offset = self.tokens[rows], self.log_probs[rows], self.offset[rows]
            self.history = [h[rows] for h in self.history]
            self.rows = len(rows)

    def step(self, n: int, predict: Predict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next action of each of n rows: token ids (n, P + D) int64 (plan, then the action), their log-probs
        (n, P + D) float64 (0 for a plan not drawn at this step) and chunk offsets (n,) int64."""
        if n != self.rows:
            self.reset()
            self.rows = n
        return self._open_loop(predict) if self.mode == "open_loop" else self._ensemble(predict)

    def _open_loop(self, predict: Predict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        P, K, n = self.P, self.K, self.rows
        if self.tokens is None:
            self.offset = np.full(n, K)
        due = np.flatnonzero(self.offset >= K)
        if due.size:
            tokens, log_probs, _ = predict(due)
            if self.tokens is None:
                self.tokens = np.zeros((n, tokens.shape[1]), np.int64)
                self.log_probs = np.zeros((n, tokens.shape[1]), np.float64)
            self.tokens[due], self.log_probs[due], self.offset[due] = tokens, log_probs, 0
        D = (self.tokens.shape[1] - P) // K
        offset = self.offset.copy()
        cols = P + offset[:, None] * D + np.arange(D)  # (n, D)
        plan_log_probs = np.where(offset[:, None] == 0, self.log_probs[:, :P], 0.0)
        self.offset += 1
        token_ids = np.concatenate([self.tokens[:, :P], np.take_along_axis(self.tokens, cols, 1)], axis=1)
        log_probs = np.concatenate([plan_log_probs, np.take_along_axis(self.log_probs, cols, 1)], axis=1)
        return token_ids, log_probs, offset

    def _ensemble(self, predict: Predict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        P, K, n, lo = self.P, self.K, self.rows, self.tok.token_offset
        tokens, log_probs, first = predict(np.arange(n))
        D = first.shape[1]
        self.history = (self.history + [self.tok.decode(tokens[:, P:].reshape(n, K, D))])[-K:]
        ages = range(len(self.history) - 1, -1, -1)  # the oldest chunk was predicted len - 1 steps ago
        candidates = np.stack([chunk[:, age] for chunk, age in zip(self.history, ages)], axis=1)  # (n, m, D)
        weights = np.exp(-self.decay * np.arange(len(self.history)))  # (m,): index 0, the oldest, weighs most
        blend = np.einsum("nmd,m->nd", candidates.astype(np.float64), weights / weights.sum())
        ids = self.tok.encode(blend)  # (n, D): the bins of the executed action
        action_log_probs = np.take_along_axis(first, (ids - lo)[..., None], axis=-1)[..., 0]
        token_ids = np.concatenate([tokens[:, :P], ids], axis=1)
        return token_ids, np.concatenate([log_probs[:, :P], action_log_probs], axis=1), np.zeros(n, np.int64)
