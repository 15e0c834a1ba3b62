"""KNNDistance: distance to the k-th nearest training image, or the mean over the k nearest.

The course's kNN baseline. The shared path reads every k of the grid from the unit's one
sorted kNN table (the one LocalOutlierFactor uses); k is capped to the training set's size.
A training image queried in-sample is its own nearest neighbour at distance 0, as
``NearestNeighbors.kneighbors(X_train)`` has it. With float32 features the distances are
rounded to float32, as scikit-learn returns them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.neighbors import NearestNeighbors

from stages.methods.base import DetectorConfig, Family, Hyper, PositiveInt, capped
from stages.methods.unit import Needs, UnitData


def aggregate_distances(dist: np.ndarray, aggregate: str) -> np.ndarray:
    """Score of sorted neighbour distances (n, k): the k-th (last) column, or their mean."""
    return dist[:, -1] if aggregate == "kth" else dist.mean(axis=1)


class KNNDistanceDetector(OutlierMixin, BaseEstimator):
    """Plain reference: ``NearestNeighbors`` on the training rows, score = aggregated distance."""

    def __init__(self, n_neighbors: int = 5, aggregate: str = "kth") -> None:
        self.n_neighbors = n_neighbors
        self.aggregate = aggregate

    def fit(self, X: np.ndarray, y: Any = None) -> KNNDistanceDetector:
        self.k_ = capped(self.n_neighbors, len(X))
        self.nn_ = NearestNeighbors(n_neighbors=self.k_).fit(X)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        dist, _ = self.nn_.kneighbors(X)
        return -aggregate_distances(np.asarray(dist, dtype=np.float64), self.aggregate)


class KNNDistanceFamily(Family):
    class hyper(Hyper):
        n_neighbors: PositiveInt = 5
        aggregate: Literal["kth", "mean"] = "kth"

    name = "KNNDistance"

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        return KNNDistanceDetector(**params)

    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        """The ``NearestNeighbors`` the reference fits."""
        return [(NearestNeighbors(n_neighbors=params["n_neighbors"]), {})]

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        needs.reserve(knn=max(self.hyperparams(c).n_neighbors for c in configs))

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray]:
        dist = data.knn(split).query_dist.astype(data.dtype).astype(np.float64)
        n = len(data.train[split])
        out = []
        for config in configs:
            p = self.hyperparams(config)
            out.append(aggregate_distances(dist[:, : capped(p.n_neighbors, n)], p.aggregate))
        return out
