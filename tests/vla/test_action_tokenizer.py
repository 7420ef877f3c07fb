"""Tests for vla/action_tokenizer.py: the bin contract, fitting, diagnostics and persistence."""

import numpy as np
import pytest

from vla.action_tokenizer import ActionTokenizer

OFFSET, N_BINS = 1000, 256


@pytest.fixture
def actions() -> np.ndarray:
    rng = np.random.default_rng(0)
    moves = rng.normal(0.0, [0.01, 0.01, 0.02, 0.05, 0.05, 0.1], size=(2000, 6))
    gripper = rng.integers(0, 2, size=(2000, 1)).astype(np.float64)
    return np.concatenate([moves, gripper], axis=1)  # (N, 7)


@pytest.fixture
def tokenizer(actions: np.ndarray) -> ActionTokenizer:
    return ActionTokenizer.fit(actions, token_offset=OFFSET, n_bins=N_BINS)


def in_range_values(tok: ActionTokenizer, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random values within the bounds plus the bounds, the bin edges and the bin centres of every dimension."""
    span = tok.q99 - tok.q01
    edges = np.linspace(-1.0, 1.0, tok.n_bins + 1)
    special = np.concatenate([edges, tok.bin_centers])[:, None]  # normalised units
    return np.concatenate([tok.q01 + rng.uniform(size=(n, 7)) * span, tok.q01 + (special + 1) / 2 * span])


def test_fit_gives_percentile_bounds_and_absolute_gripper(actions, tokenizer):
    np.testing.assert_allclose(tokenizer.q01[:6], np.percentile(actions[:, :6], 1, axis=0))
    np.testing.assert_allclose(tokenizer.q99[:6], np.percentile(actions[:, :6], 99, axis=0))
    assert (tokenizer.q01[6], tokenizer.q99[6]) == (0.0, 1.0)


def test_from_stats_matches_fit(actions, tokenizer):
    stats = {"q01": np.percentile(actions, 1, axis=0).tolist(), "q99": np.percentile(actions, 99, axis=0).tolist()}
    other = ActionTokenizer.from_stats(stats, token_offset=OFFSET)
    assert other.to_dict() == tokenizer.to_dict()


def test_round_trip_error_at_most_half_a_bin(tokenizer):
    values = in_range_values(tokenizer, np.random.default_rng(1), 5000)
    ids = tokenizer.encode(values)
    assert ids.dtype == np.int64 and ids.shape == values.shape
    half_bin = (tokenizer.q99 - tokenizer.q01) / (2 * N_BINS)
    err = np.abs(tokenizer.decode(ids) - values)
    assert (err <= half_bin * (1 + 1e-4) + 1e-6).all(), (err / half_bin).max()


def test_ids_in_range_and_out_of_range_values_clip(tokenizer):
    rng = np.random.default_rng(2)
    values = rng.normal(0.0, 10.0, size=(4, 3, 7))  # leading batch shape (4, 3), mostly far out of range
    ids = tokenizer.encode(values)
    assert ids.shape == (4, 3, 7)
    assert ((ids >= OFFSET) & (ids < OFFSET + N_BINS)).all()
    low, high = tokenizer.q01 - 5.0, tokenizer.q99 + 5.0
    np.testing.assert_array_equal(tokenizer.encode(low[None]), np.full((1, 7), OFFSET))
    np.testing.assert_array_equal(tokenizer.encode(high[None]), np.full((1, 7), OFFSET + N_BINS - 1))
    np.testing.assert_array_equal(tokenizer.encode(tokenizer.q99[None]), np.full((1, 7), OFFSET + N_BINS - 1))
    decoded = tokenizer.decode(tokenizer.encode(values))
    assert (decoded >= tokenizer.q01 - 1e-6).all() and (decoded <= tokenizer.q99 + 1e-6).all()


def test_decode_rejects_ids_outside_the_action_range(tokenizer):
    good = np.full((2, 7), OFFSET)
    for bad in (OFFSET - 1, OFFSET + N_BINS):
        ids = good.copy()
        ids[1, 3] = bad
        with pytest.raises(ValueError, match="outside the action range"):
            tokenizer.decode(ids)
    with pytest.raises(ValueError, match="shape"):
        tokenizer.decode(np.full((2, 6), OFFSET))


def test_encode_rejects_non_finite(tokenizer):
    with pytest.raises(ValueError, match="NaN"):
        tokenizer.encode(np.full((1, 7), np.nan))


def test_degenerate_dimension_does_not_divide_by_zero():
    acts = np.zeros((50, 7))
    acts[:, 0] = np.linspace(-1, 1, 50)
    acts[:, 1] = 0.25  # constant: q01 == q99
    tok = ActionTokenizer.fit(acts, token_offset=0)
    with np.errstate(all="raise"):
        decoded = tok.decode(tok.encode(acts))
    np.testing.assert_allclose(decoded[:, 1], 0.25)


def test_gripper_commands_stay_distinguishable(tokenizer):
    commands = np.zeros((2, 7))
    commands[1, 6] = 1.0
    decoded = tokenizer.decode(tokenizer.encode(commands))[:, 6]
    np.testing.assert_allclose(decoded, [0.5 / N_BINS, 1 - 0.5 / N_BINS], atol=1e-6)


def test_diagnostics(actions, tokenizer):
    diag = tokenizer.diagnostics(actions)
    assert diag["n"] == len(actions)
    assert np.asarray(diag["bin_counts"]).shape == (7, N_BINS)
    assert (np.asarray(diag["bin_counts"]).sum(axis=1) == len(actions)).all()
    assert diag["bins_used"][6] == 2  # gripper: only the two end bins
    clipped = np.asarray(diag["clipped_fraction"])
    assert ((clipped[:6] > 0.01) & (clipped[:6] < 0.03)).all()  # ~1% below q01 plus ~1% above q99
    assert clipped[6] == 0.0
    half_bin = (tokenizer.q99 - tokenizer.q01) / (2 * N_BINS)
    assert (np.asarray(diag["roundtrip_abs_error_mean"]) <= half_bin * 1.5).all()
    assert (np.asarray(diag["roundtrip_abs_error_max"]) > half_bin).any()  # clipped outliers err more


def test_save_load_identity(tmp_path, actions, tokenizer):
    path = tmp_path / "action_tokenizer.json"
    tokenizer.save(path)
    loaded = ActionTokenizer.load(path)
    assert loaded.to_dict() == tokenizer.to_dict()
    np.testing.assert_array_equal(loaded.encode(actions), tokenizer.encode(actions))
    assert ActionTokenizer.from_dict(tokenizer.to_dict()).to_dict() == tokenizer.to_dict()


def test_from_dict_names_missing_keys(tokenizer):
    data = tokenizer.to_dict()
    del data["token_offset"]
    with pytest.raises(ValueError, match="token_offset"):
        ActionTokenizer.from_dict(data)
