"""IsolationForest's grown forest against plain scikit-learn: the same bits for every size."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from stages.methods.iforest import _builder_matches, _grow_forest, iforest_scores

SIZES = [1, 7, 10, 33, 60]


def _data(nan: bool) -> tuple[np.ndarray, np.ndarray]:
    """Wide-ish rows with many constant (ReLU-like zero) columns, as the features have."""
    rng = np.random.default_rng(4)
    X = np.maximum(rng.normal(size=(420, 40)), 0.0) * (rng.random(40) < 0.6)
    X[::3, :5] += 1.5  # a cluster that makes the trees uneven
    if nan:
        X[5, 3] = X[17, 0] = X[300:310, 12] = np.nan
    return X[:350], X[350:]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"max_features": 0.3},
        {"max_features": 7, "bootstrap": True},
        {"bootstrap": True, "max_samples": 0.5},
        {"max_samples": 64},
        {"max_samples": 1000},  # more than the rows: scikit-learn caps it (and warns)
    ],
    ids=repr,
)
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
def test_scores_bitwise_equal_plain_sklearn(params: dict, nan: bool) -> None:
    X_tr, X_te = _data(nan)
    queries = np.concatenate([X_te, X_tr])
    ours = iforest_scores(X_tr, queries, SIZES, seed=11, **params)
    for n in SIZES:
        with warnings.catch_warnings():  # max_samples above the rows: its warning
            warnings.simplefilter("ignore")
            forest = IsolationForest(n_estimators=n, random_state=11, **params).fit(X_tr)
        theirs = -forest.score_samples(queries)
        assert ours[n].dtype == theirs.dtype
        np.testing.assert_array_equal(ours[n], theirs, err_msg=f"n_estimators={n} {params}")


def test_grown_trees_are_sklearns_and_the_check_holds() -> None:
    """Node for node (features, thresholds, children, NaN direction, counts), and the
    check at first use agrees here, so the stage takes the fast path."""
    X_tr, _ = _data(nan=True)
    X32 = X_tr.astype(np.float32)
    trees, columns, max_samples = _grow_forest(X32, 25, 3, max_features=0.5, bootstrap=True)
    forest = IsolationForest(n_estimators=25, random_state=3, max_features=0.5,
                             bootstrap=True).fit(X32)  # fmt: skip
    assert max_samples == forest.max_samples_ == 256
    for ours, est, cols, feats in zip(trees, forest.estimators_, columns,
                                      forest.estimators_features_, strict=True):  # fmt: skip
        np.testing.assert_array_equal(
            ours.__getstate__()["nodes"], est.tree_.__getstate__()["nodes"]
        )
        np.testing.assert_array_equal(cols, feats)
    assert _builder_matches()


def test_max_features_above_dim_fails_as_sklearn() -> None:
    X_tr, X_te = _data(nan=False)
    with pytest.raises(ValueError, match="max_features must be <= n_features"):
        iforest_scores(X_tr, X_te, [5], seed=0, max_features=41)
    with pytest.raises(ValueError, match="max_features must be <= n_features"):
        IsolationForest(n_estimators=5, random_state=0, max_features=41).fit(X_tr)
