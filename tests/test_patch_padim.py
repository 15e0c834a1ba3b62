"""PaDiM math (stages.patch.padim) against numpy/scipy written out per position."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from stages.patch.padim import channel_subset, padim_distances


def plain(train: np.ndarray, queries: np.ndarray, channels: np.ndarray) -> np.ndarray:
    out = np.empty(queries.shape[:2])
    for p in range(train.shape[1]):
        x = train[:, p, channels].astype(np.float64)
        cov = np.cov(x, rowvar=False) + 0.01 * np.eye(len(channels))
        vi = np.linalg.inv(cov)
        mu = x.mean(axis=0)
        for i in range(len(queries)):
            out[i, p] = mahalanobis(queries[i, p, channels].astype(np.float64), mu, vi)
    return out


@pytest.mark.parametrize(("n_train", "memory_bytes"), [(40, 1 << 28), (6, 1 << 28), (40, 1)])
def test_padim_equals_plain(n_train: int, memory_bytes: int) -> None:
    """Many images, fewer images than channels (the regularisation carries the
    covariance), and one position per block."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(20, 20))
    train = (rng.normal(size=(n_train, 12, 20)) @ mix).astype(np.float32) + 3.0
    queries = (rng.normal(size=(7, 12, 20)) @ mix * 1.5).astype(np.float32) + 3.0
    channels = channel_subset(20, 8, seed=1)
    got = padim_distances(train, queries, channels, memory_bytes=memory_bytes)
    np.testing.assert_allclose(got, plain(train, queries, channels), rtol=1e-8)


def test_channel_subset_seeded() -> None:
    a = channel_subset(448, 100, 3)
    assert len(set(a.tolist())) == 100 and a.max() < 448 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, channel_subset(448, 100, 3))
    assert not np.array_equal(a, channel_subset(448, 100, 4))
    np.testing.assert_array_equal(channel_subset(50, 100, 0), np.arange(50))


def test_padim_bad_input() -> None:
    with pytest.raises(ValueError, match="same grid"):
        padim_distances(np.zeros((3, 4, 5)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        padim_distances(np.zeros((1, 4, 5)), np.zeros((2, 4, 5)))
