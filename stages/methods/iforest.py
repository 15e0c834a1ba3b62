"""IsolationForest: every forest size of the grid from one forest.

scikit-learn draws all per-tree seeds up front (``RandomState(s).randint(MAX_INT,
size=N)``), so the forest of n trees with ``random_state=s`` is exactly the first n trees
of the forest of N > n trees: one fit of the largest size scores every size, with path
lengths accumulated tree by tree in scikit-learn's order (bit-identical scores). It needs
the raw rows (the unit's Gram does not help it) and accepts NaN, as scikit-learn's trees do.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.ensemble import IsolationForest

from stages.methods.base import (
    DetectorConfig,
    Fraction,
    Hyper,
    PositiveInt,
    SklearnFamily,
)
from stages.methods.unit import Needs, UnitData


class IsolationForestFamily(SklearnFamily):
    class hyper(Hyper):
        n_estimators: PositiveInt = 100
        max_samples: Literal["auto"] | PositiveInt | Fraction = "auto"
        max_features: PositiveInt | Fraction = 1.0
        bootstrap: bool = False

    name = "IsolationForest"
    estimator_class = IsolationForest
    seeded = True
    needs_finite = False

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        needs.reserve(raw=True)

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray | BaseException]:
        """One forest per set of non-size hyperparameters, scored by its tree prefixes."""
        forests: dict[tuple, list[int]] = {}
        for i, config in enumerate(configs):
            rest = tuple(kv for kv in config.params if kv[0] != "n_estimators")
            forests.setdefault(rest, []).append(i)
        out: list[Any] = [None] * len(configs)
        for rest, members in forests.items():
            sizes = [self.hyperparams(configs[i]).n_estimators for i in members]
            try:
                by_size = iforest_scores(data.raw, data.raw, sizes, seed,
                                         train_rows=data.train[split],
                                         test_rows=data.queries(split), **dict(rest))  # fmt: skip
            except Exception as exc:  # e.g. max_features > dim: fails at fit, as in sklearn
                by_size = dict.fromkeys(sizes, exc)
            for i, n in zip(members, sizes, strict=True):
                out[i] = by_size[n]
        return out


def _average_path_length(n_samples_leaf: np.ndarray) -> np.ndarray:
    """Average path length of an unsuccessful BST search (scikit-learn's formula)."""
    n = np.asarray(n_samples_leaf, dtype=np.float64)
    out = np.zeros(n.shape)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _rows(X: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``X[rows]``, as a view when ``rows`` is a contiguous ascending range (no copy)."""
    if rows is None:
        return X
    rows = np.asarray(rows)
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return X[rows[0] : rows[0] + len(rows)]
    return X[rows]


def iforest_scores(
    X_train: np.ndarray,
    X_test: np.ndarray,
    n_estimators: Sequence[int],
    seed: int,
    *,
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
    chunk_bytes: int = 1 << 28,
    **params: Any,
) -> dict[int, np.ndarray]:
    """``-score_samples`` of IsolationForest(n_estimators=n, random_state=seed) for every n.

    One forest of max(n) trees is fitted; scikit-learn draws all per-tree seeds up front
    from ``RandomState(seed)``, so the forest of n trees is exactly its first n trees.
    Path lengths are accumulated tree by tree in scikit-learn's order, so each prefix's
    score is bit-identical to the smaller forest's. With ``train_rows``/``test_rows`` the
    arrays are the unit's feature rows and are indexed here: the training rows are a view
    when contiguous, and the test rows are scored ``chunk_bytes`` at a time, so memory stays
    near one copy of the features even for the study's 802,816-dim layers.
    """
    sizes = sorted({int(n) for n in n_estimators})
    forest = IsolationForest(n_estimators=sizes[-1], random_state=seed, **params)
    forest.fit(np.asarray(_rows(X_train, train_rows), dtype=np.float32))
    denom_unit = _average_path_length(np.array([forest.max_samples_]))
    n_features = X_test.shape[1]
    all_features = getattr(forest, "_max_features", n_features) == n_features
    trees = [
        (
            tree,
            features,
            tree.tree_.compute_node_depths()
            + _average_path_length(tree.tree_.n_node_samples)
            - 1.0,
        )
        for tree, features in zip(forest.estimators_, forest.estimators_features_, strict=True)
    ]
    rows = np.arange(len(X_test)) if test_rows is None else np.asarray(test_rows)
    m = len(rows)
    wanted = set(sizes)
    prefix = {n: np.zeros(m) for n in sizes}
    step = max(1, int(chunk_bytes // max(4 * n_features, 1)))
    for start in range(0, m, step):
        X = np.ascontiguousarray(_rows(X_test, rows[start : start + step]), dtype=np.float32)
        depths = np.zeros(len(X), order="f")
        for i, (tree, features, leaf_value) in enumerate(trees, start=1):
            leaves = tree.apply(X if all_features else X[:, features], check_input=False)
            depths += leaf_value[leaves]
            if i in wanted:
                prefix[i][start : start + len(X)] = depths
    out = {}
    for n in sizes:
        denominator = n * denom_unit
        out[n] = 2 ** (-np.divide(prefix[n], denominator, out=np.ones(m), where=denominator != 0))
    return {int(n): out[int(n)] for n in n_estimators}
