"""FastEllipticEnvelope equals scikit-learn's EllipticEnvelope, branch by branch of FastMCD."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.covariance import EllipticEnvelope
from threadpoolctl import threadpool_limits

from stages.mcd import FastEllipticEnvelope


def _data(n: int, p: int, seed: int, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((p, p))
    train = rng.standard_normal((n, p)) @ mix
    train[: n // 20] += 6.0  # a few outliers for the MCD to reject
    test = rng.standard_normal((40, p)) @ mix * 1.5
    return train.astype(dtype), test.astype(dtype)


@pytest.mark.parametrize(
    ("n", "p", "dtype", "params"),
    [
        (120, 6, np.float64, {}),  # n <= 500: 30 trials, then the best on all rows
        (300, 1, np.float64, {}),  # one feature: scikit-learn's closed form
        (700, 12, np.float32, {}),  # 500 < n < 1500: subsets, merged set = all rows
        (1600, 5, np.float64, {}),  # n >= 1500: subsets, merged sample, final selection
        # subset supports (90 rows) smaller than the dimension: singular, scikit-learn's pinvh
        (600, 100, np.float32, {"support_fraction": 0.3}),
        (150, 150, np.float32, {}),  # as many features as rows (the capped PCA of a small set)
        (400, 8, np.float64, {"support_fraction": 0.8, "contamination": 0.2}),
        (200, 4, np.float64, {"assume_centered": True}),  # delegated to scikit-learn
    ],
)
def test_fast_elliptic_envelope_equals_sklearn(n, p, dtype, params) -> None:
    train, test = _data(n, p, seed=n + p, dtype=dtype)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        theirs = EllipticEnvelope(random_state=7, **params).fit(train)
        ours = FastEllipticEnvelope(random_state=7, **params).fit(train)
    np.testing.assert_array_equal(ours.raw_support_, theirs.raw_support_)
    np.testing.assert_array_equal(ours.support_, theirs.support_)
    np.testing.assert_allclose(ours.score_samples(test), theirs.score_samples(test), rtol=1e-9)
    np.testing.assert_allclose(ours.dist_, theirs.dist_, rtol=1e-9)
    assert ours.offset_ == pytest.approx(theirs.offset_, rel=1e-9)
    np.testing.assert_array_equal(ours.predict(test), theirs.predict(test))


def test_fast_elliptic_envelope_validates_params() -> None:
    train, _ = _data(50, 3, seed=0)
    with pytest.raises(ValueError, match="contamination"):
        FastEllipticEnvelope(contamination=0.9).fit(train)
