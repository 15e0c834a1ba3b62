"""OneClassSVM: every kernel of the grid from the unit's linear Gram (``kernel='precomputed'``).

The shared path builds libsvm's kernel matrices from ``K = X X^T`` with libsvm's own
operation order (``powi`` for poly), and ``gamma='scale'`` exactly as scikit-learn computes
it (``1 / (n_features * X.var())``, the variance from the Gram's shifted row sums). libsvm
then runs on the precomputed kernel, so only the kernel's last bits differ from the plain
estimator; with the study's ``max_iter=1000`` cap the stopping iterate can depend on them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.svm import OneClassSVM

from stages.methods.base import (
    DetectorConfig,
    Fraction,
    Hyper,
    PositiveFloat,
    PositiveInt,
    SklearnFamily,
)
from stages.methods.unit import UnitData


class OneClassSVMFamily(SklearnFamily):
    """OneClassSVM; the study capped it at max_iter=1000 (set in the grid as ``fixed``)."""

    class hyper(Hyper):
        kernel: Literal["linear", "rbf", "sigmoid", "poly"] = "rbf"
        degree: PositiveInt = 3
        gamma: Literal["scale", "auto"] | PositiveFloat = "scale"
        coef0: float = 0.0
        nu: Fraction = 0.5
        tol: PositiveFloat = 1e-3
        max_iter: int = -1

    name = "OneClassSVM"
    estimator_class = OneClassSVM

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray | BaseException]:
        gram, train, queries = data.gram, data.train[split], data.queries(split)
        K_tr, K_q = gram.K[np.ix_(train, train)], gram.K[np.ix_(queries, train)]
        sq = np.diagonal(gram.K)
        x_var = gram.var(train)
        out: list[np.ndarray | BaseException] = []
        for config in configs:
            p = self.hyperparams(config).model_dump()
            try:
                out.append(ocsvm_scores(K_tr, K_q, sq[train], sq[queries], gram.n_features,
                                        x_var, p))  # fmt: skip
            except Exception as exc:
                out.append(exc)
        return out


def _powi(base: np.ndarray, times: int) -> np.ndarray:
    """libsvm's ``powi`` (square-and-multiply), so poly kernels match it bit for bit."""
    tmp, ret = base.copy(), np.ones_like(base)
    t = times
    while t > 0:
        if t % 2 == 1:
            ret *= tmp
        tmp = tmp * tmp
        t //= 2
    return ret


def ocsvm_kernel(
    dot: np.ndarray,
    sq_rows: np.ndarray,
    sq_cols: np.ndarray,
    kernel: str,
    gamma: float,
    degree: int = 3,
    coef0: float = 0.0,
) -> np.ndarray:
    """A libsvm kernel matrix from linear dot products, with libsvm's operation order."""
    with np.errstate(over="ignore", invalid="ignore"):
        if kernel == "linear":
            return dot.copy()
        if kernel == "rbf":
            return np.exp(-gamma * (sq_rows[:, None] + sq_cols[None, :] - 2.0 * dot))
        if kernel == "poly":
            return _powi(gamma * dot + coef0, int(degree))
        if kernel == "sigmoid":
            return np.tanh(gamma * dot + coef0)
    raise ValueError(f"unsupported OneClassSVM kernel {kernel!r}")


def ocsvm_gamma(gamma: Any, n_features: int, x_var: float) -> float:
    """scikit-learn's gamma: 'scale' = 1 / (n_features * X.var()), 'auto' = 1 / n_features."""
    if gamma == "scale":
        return 1.0 / (n_features * x_var) if x_var != 0 else 1.0
    if gamma == "auto":
        return 1.0 / n_features
    return float(gamma)


def ocsvm_scores(
    K_train: np.ndarray,
    K_test: np.ndarray,
    sq_train: np.ndarray,
    sq_test: np.ndarray,
    n_features: int,
    x_var: float,
    params: dict[str, Any],
) -> np.ndarray:
    """``-score_samples`` of ``OneClassSVM(**params)`` from linear Gram blocks (precomputed)."""
    params = dict(params)
    kernel = params.pop("kernel", "rbf")
    gamma = ocsvm_gamma(params.pop("gamma", "scale"), n_features, x_var)
    degree = params.pop("degree", 3)
    coef0 = params.pop("coef0", 0.0)
    k_train = ocsvm_kernel(K_train, sq_train, sq_train, kernel, gamma, degree, coef0)
    k_test = ocsvm_kernel(K_test, sq_test, sq_train, kernel, gamma, degree, coef0)
    if kernel == "rbf":  # libsvm predicts rbf from direct differences: never above 1
        np.minimum(k_test, 1.0, out=k_test)
    if not (np.isfinite(k_train).all() and np.isfinite(k_test).all()):
        return np.full(len(K_test), np.nan)
    model = OneClassSVM(kernel="precomputed", **params).fit(k_train)
    return -model.score_samples(k_test)
