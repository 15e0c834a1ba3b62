"""FastEllipticEnvelope equals scikit-learn's EllipticEnvelope, branch by branch of FastMCD.

Where every FastMCD subset has fewer rows than dimensions, the subset covariances are
singular and the candidates follow rounding noise (scikit-learn disagrees with itself
across BLAS thread counts there): those cases compare with scikit-learn running on our
pseudo-inverse, so the branch logic is checked bit for bit on any CPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import linalg
from sklearn.covariance import EllipticEnvelope
from threadpoolctl import threadpool_limits

from stages import mcd
from stages.mcd import FastEllipticEnvelope


def _data(n: int, p: int, seed: int, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((p, p))
    train = rng.standard_normal((n, p)) @ mix
    train[: n // 20] += 6.0  # a few outliers for the MCD to reject
    test = rng.standard_normal((40, p)) @ mix * 1.5
    return train.astype(dtype), test.astype(dtype)


@pytest.mark.parametrize(
    ("n", "p", "dtype", "params", "singular"),
    [
        (120, 6, np.float64, {}, False),  # n <= 500: 30 trials, then the best on all rows
        (300, 1, np.float64, {}, False),  # one feature: scikit-learn's closed form
        (700, 12, np.float32, {}, False),  # 500 < n < 1500: subsets, merged set = all rows
        (1600, 5, np.float64, {}, False),  # n >= 1500: subsets, merged sample, final selection
        # subset supports (90 rows) smaller than the dimension: singular, the pinvh path
        (600, 100, np.float32, {"support_fraction": 0.3}, True),
        (
            150,
            150,
            np.float32,
            {},
            True,
        ),  # as many features as rows (the capped PCA of a small set)
        (400, 8, np.float64, {"support_fraction": 0.8, "contamination": 0.2}, False),
        (200, 4, np.float64, {"assume_centered": True}, False),  # delegated to scikit-learn
    ],
)
def test_fast_elliptic_envelope_equals_sklearn(n, p, dtype, params, singular, monkeypatch) -> None:
    train, test = _data(n, p, seed=n + p, dtype=dtype)
    if singular:
        monkeypatch.setattr(linalg, "pinvh", lambda a, **_: mcd._pinvh(a))
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
