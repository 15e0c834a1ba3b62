"""KMeansDistance: distance to the nearest of k centroids of the training images (seeded).

The course's Method 2. The shared path runs scikit-learn's own ``KMeans`` on the unit's
full-rank PCA coordinates of the training set (at most n_train dimensions instead of
hundreds of thousands): centroids lie in the training rows' affine span, where the PCA
coordinates are an isometry, so every distance k-means++ and Lloyd compute is the same in
exact arithmetic. ``tol`` is scaled by ``n_components / n_features`` because scikit-learn
makes it relative to the mean per-feature variance (the total variance is the same in
both spaces). A query's squared distance to a centroid adds what lies outside the span:
``||x - mean||^2 - ||z||^2``. n_clusters is capped to the training set's size.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.cluster import KMeans

from stages.methods.base import DetectorConfig, Family, Hyper, PositiveInt, capped
from stages.methods.unit import ALL, Needs, UnitData


class KMeansDistanceDetector(OutlierMixin, BaseEstimator):
    """Plain reference: ``KMeans`` on the training rows; score = distance to the nearest centroid."""

    def __init__(self, n_clusters: int = 8, n_init: str | int = "auto", max_iter: int = 300,
                 tol: float = 1e-4, random_state: int | None = None) -> None:  # fmt: skip
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> KMeansDistanceDetector:
        self.kmeans_ = KMeans(n_clusters=capped(self.n_clusters, len(X)), n_init=self.n_init,
                              max_iter=self.max_iter, tol=self.tol,
                              random_state=self.random_state).fit(X)  # fmt: skip
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -np.asarray(self.kmeans_.transform(X), dtype=np.float64).min(axis=1)


class KMeansDistanceFamily(Family):
    class hyper(Hyper):
        n_clusters: PositiveInt = 8
        n_init: Literal["auto"] | PositiveInt = "auto"
        max_iter: PositiveInt = 300
        tol: Annotated[float, Field(ge=0)] = 1e-4

    name = "KMeansDistance"
    seeded = True

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        return KMeansDistanceDetector(**params, random_state=seed)

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        needs.reserve(pca=ALL)

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray | BaseException]:
        pca = data.pca(split)
        z_train, z_queries = pca.z_train, pca.z_queries
        outside = np.maximum(pca.centred_sq - np.einsum("ij,ij->i", z_queries, z_queries), 0.0)
        scale = z_train.shape[1] / data.n_features
        out: list[np.ndarray | BaseException] = []
        for config in configs:
            p = self.hyperparams(config)
            try:
                model = KMeans(n_clusters=capped(p.n_clusters, len(z_train)), n_init=p.n_init,
                               max_iter=p.max_iter, tol=p.tol * scale,
                               random_state=seed).fit(z_train)  # fmt: skip
                inside = model.transform(z_queries) ** 2
                out.append(np.sqrt(inside.min(axis=1) + outside))
            except Exception as exc:
                out.append(exc)
        return out
