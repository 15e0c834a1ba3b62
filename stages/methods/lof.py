"""LocalOutlierFactor (novelty=True): every n_neighbors from the unit's one sorted kNN table.

scikit-learn's formula is reproduced on the table's first k columns: reachability distance
``max(d(p, o), k-distance(o))``, local reachability density with its ``1e-10``, k capped to
``n_train - 1``. With float32 features the distances are rounded to float32 before the
arithmetic, as scikit-learn's own distance computation returns them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.neighbors import LocalOutlierFactor

from stages.methods.base import DetectorConfig, Family, Hyper, PositiveFloat, PositiveInt
from stages.methods.unit import Needs, UnitData


class LocalOutlierFactorFamily(Family):
    class hyper(Hyper):
        n_neighbors: PositiveInt = 20
        novelty: Literal[True] = True  # score_samples on new data needs novelty=True
        metric: str = "minkowski"
        p: PositiveFloat = 2.0

    name = "LocalOutlierFactor"
    probed = ("metric", "p")  # e.g. seuclidean or precomputed pass the check, never a fit

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        return LocalOutlierFactor(**{"novelty": True, **params})

    def shares(self, config: DetectorConfig) -> bool:
        """Euclidean distances only (``minkowski`` with ``p=2``, or ``euclidean``)."""
        p = self.hyperparams(config)
        return p.metric == "euclidean" or (p.metric == "minkowski" and p.p == 2)

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        needs.reserve(knn=max(self.hyperparams(c).n_neighbors for c in configs))

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray]:
        table = data.knn(split)
        n = len(data.train[split])
        ks = [self.hyperparams(c).n_neighbors for c in configs]
        by_k = lof_from_table(table.fit_dist, table.fit_idx, table.query_dist, table.query_idx,
                              n, ks, data.dtype)  # fmt: skip
        return [by_k[k] for k in ks]


def lof_from_table(
    fit_dist: np.ndarray,
    fit_idx: np.ndarray,
    query_dist: np.ndarray,
    query_idx: np.ndarray,
    n_train: int,
    n_neighbors: Sequence[int],
    dtype: np.dtype | type = np.float64,
) -> dict[int, np.ndarray]:
    """``-score_samples`` of ``LocalOutlierFactor(novelty=True, n_neighbors=k)`` for every k,
    from sorted kNN tables at least ``min(max k, n_train - 1)`` deep."""
    if np.dtype(dtype) == np.float32:
        fit_dist, query_dist = fit_dist.astype(np.float32), query_dist.astype(np.float32)
    out: dict[int, np.ndarray] = {}
    for k_req in n_neighbors:
        k = max(1, min(int(k_req), n_train - 1))
        dfit, ifit = fit_dist[:, :k], fit_idx[:, :k]
        dq, iq = query_dist[:, :k], query_idx[:, :k]
        dist_k = dfit[:, k - 1]
        lrd = 1.0 / (np.mean(np.maximum(dfit, dist_k[ifit]), axis=1) + 1e-10)
        lrd_q = 1.0 / (np.mean(np.maximum(dq, dist_k[iq]), axis=1) + 1e-10)
        out[int(k_req)] = np.mean(lrd[iq] / lrd_q[:, np.newaxis], axis=1)
    return out
