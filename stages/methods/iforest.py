"""IsolationForest: every forest size of the grid from one forest.

scikit-learn draws all per-tree seeds up front (``RandomState(s).randint(MAX_INT,
size=N)``), so the forest of n trees with ``random_state=s`` is exactly the first n trees
of the forest of N > n trees: one fit of the largest size scores every size, with path
lengths accumulated tree by tree in scikit-learn's order (bit-identical scores). It needs
the raw rows (the unit's Gram does not help it) and accepts NaN, as scikit-learn's trees do.

The forest is grown by scikit-learn's own tree builder (``DepthFirstTreeBuilder`` with the
``RandomSplitter``), called once per tree with the random draws ``IsolationForest.fit``
makes, without the per-tree estimator objects, parameter checks and bagging bookkeeping
that cost most of its fit (about 2 of its 2.5 ms per tree on 1,254 x 50,176 features). A
check at first use grows a small forest both ways and compares the trees; on any
difference (another scikit-learn version) ``IsolationForest.fit`` itself is used.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import cache
from typing import Any, Literal

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.tree._criterion import MSE
from sklearn.tree._splitter import RandomSplitter
from sklearn.tree._tree import DepthFirstTreeBuilder, Tree
from sklearn.utils.random import sample_without_replacement

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


MAX_INT = np.iinfo(np.int32).max


def _grow_forest(
    X: np.ndarray,
    n_trees: int,
    seed: int,
    max_samples: str | int | float = "auto",
    max_features: int | float = 1.0,
    bootstrap: bool = False,
) -> tuple[list[Tree], list[np.ndarray | None], int]:
    """The trees of ``IsolationForest(n_trees, random_state=seed, ...).fit(X)`` (float32 X):
    (trees, each tree's feature columns or None for all, max_samples_).

    The same draws as scikit-learn 1.9: the targets ``uniform(n)`` and the per-tree seeds
    from ``RandomState(seed)``; per tree, its features and rows from ``RandomState(s)`` and
    its splitter's seed from ``RandomState(s).randint(MAX_INT)``. Rows enter as sample
    weights (as the ensemble passes them); where features are subsampled, only the drawn
    rows are copied, in ascending order: the splitter keeps the rows of non-zero weight in
    that order, so the tree is the same as on all rows.
    """
    n, dim = X.shape
    y = np.random.RandomState(seed).uniform(size=n).reshape(-1, 1)
    if max_samples == "auto":
        n_rows = min(256, n)
    elif isinstance(max_samples, float):
        n_rows = int(max_samples * n)
    else:
        n_rows = min(int(max_samples), n)
    max_depth = int(np.ceil(np.log2(max(n_rows, 2))))
    n_cols = int(max_features * dim) if isinstance(max_features, float) else int(max_features)
    if n_cols > dim:
        raise ValueError("max_features must be <= n_features")
    n_cols = max(1, n_cols)
    seeds = np.random.RandomState(seed).randint(MAX_INT, size=n_trees)
    trees, columns = [], []
    for s in seeds:
        draws = np.random.RandomState(s)
        features = sample_without_replacement(dim, n_cols, random_state=draws)
        if bootstrap:
            rows = draws.randint(0, n, n_rows)
        else:
            rows = sample_without_replacement(n, n_rows, random_state=draws)
        weight = np.bincount(rows, minlength=n).astype(np.float64)
        if n_cols == dim:
            X_tree, y_tree, features = X, y, None
        else:
            kept = np.flatnonzero(weight)
            X_tree = np.ascontiguousarray(X[np.ix_(kept, features)])
            y_tree, weight = np.ascontiguousarray(y[kept]), weight[kept]
        splitter = RandomSplitter(
            MSE(1, len(X_tree)), 1, 1, 0.0,
            np.random.RandomState(np.random.RandomState(s).randint(MAX_INT)), None,
        )  # fmt: skip
        tree = Tree(X_tree.shape[1], np.array([1], dtype=np.intp), 1)
        DepthFirstTreeBuilder(splitter, 2, 1, 0.0, max_depth, 0.0).build(
            tree, X_tree, y_tree, weight, None
        )
        trees.append(tree)
        columns.append(features)
    return trees, columns, n_rows


def _sklearn_forest(
    X: np.ndarray, n_trees: int, seed: int, **params: Any
) -> tuple[list[Tree], list[np.ndarray | None], int]:
    """The same as ``_grow_forest``, by ``IsolationForest.fit`` itself."""
    forest = IsolationForest(n_estimators=n_trees, random_state=seed, **params).fit(X)
    subsets = getattr(forest, "_max_features", X.shape[1]) != X.shape[1]
    columns = [f if subsets else None for f in forest.estimators_features_]
    return [e.tree_ for e in forest.estimators_], columns, forest.max_samples_


@cache
def _builder_matches() -> bool:
    """Whether ``_grow_forest`` grows scikit-learn's trees here (checked once per process
    on a small forest with NaN, feature and row subsampling, with and without bootstrap)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 7)).astype(np.float32)
    X[::17, 2] = np.nan
    for params in ({}, {"max_features": 0.5, "bootstrap": True, "max_samples": 0.5}):
        try:
            ours, theirs = _grow_forest(X, 4, 3, **params), _sklearn_forest(X, 4, 3, **params)
        except Exception:
            return False
        if ours[2] != theirs[2]:
            return False
        for a, b, fa, fb in zip(ours[0], theirs[0], ours[1], theirs[1], strict=True):
            if not np.array_equal(a.__getstate__()["nodes"], b.__getstate__()["nodes"]):
                return False
            if (fa is None) != (fb is None) or (fa is not None and not np.array_equal(fa, fb)):
                return False
    return True


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

    One forest of max(n) trees is grown; scikit-learn draws all per-tree seeds up front
    from ``RandomState(seed)``, so the forest of n trees is exactly its first n trees.
    Path lengths are accumulated tree by tree in scikit-learn's order, so each prefix's
    score is bit-identical to the smaller forest's. With ``train_rows``/``test_rows`` the
    arrays are the unit's feature rows and are indexed here: the training rows are a view
    when contiguous, and the test rows are scored ``chunk_bytes`` at a time, so memory stays
    near one copy of the features even for the study's 802,816-dim layers.
    """
    sizes = sorted({int(n) for n in n_estimators})
    X_fit = np.ascontiguousarray(_rows(X_train, train_rows), dtype=np.float32)
    grow = _grow_forest if _builder_matches() else _sklearn_forest
    trees, columns, max_samples = grow(X_fit, sizes[-1], seed, **params)
    del X_fit
    denom_unit = _average_path_length(np.array([max_samples]))
    leaf_values = [
        tree.compute_node_depths() + _average_path_length(tree.n_node_samples) - 1.0
        for tree in trees
    ]
    rows = np.arange(len(X_test)) if test_rows is None else np.asarray(test_rows)
    m = len(rows)
    wanted = set(sizes)
    prefix = {n: np.zeros(m) for n in sizes}
    step = max(1, int(chunk_bytes // max(4 * X_test.shape[1], 1)))
    for start in range(0, m, step):
        X = np.ascontiguousarray(_rows(X_test, rows[start : start + step]), dtype=np.float32)
        depths = np.zeros(len(X), order="f")
        for i, (tree, features, leaf_value) in enumerate(
            zip(trees, columns, leaf_values, strict=True), start=1
        ):
            leaves = tree.apply(X if features is None else X[:, features])
            depths += leaf_value[leaves]
            if i in wanted:
                prefix[i][start : start + len(X)] = depths
    out = {}
    for n in sizes:
        denominator = n * denom_unit
        out[n] = 2 ** (-np.divide(prefix[n], denominator, out=np.ones(m), where=denominator != 0))
    return {int(n): out[int(n)] for n in n_estimators}
