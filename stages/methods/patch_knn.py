"""PatchKNN: KNNDistance on the patch bank, the image-level kNN baseline made local.

A patch scores the distance to its ``n_neighbors``-th nearest patch of the coreset bank
(``aggregate: kth``) or the mean over those nearest (``mean``); ``n_neighbors`` is capped
to the bank's size. An image scores its largest patch score. The bank is PatchCore's:
every training patch thinned to ``coreset_ratio`` by the greedy k-center order.

Shared path: the same greedy order as PatchCore (same cache name and computation, so one
run serves both), and one pass of distances to the largest bank from which every ratio
takes the ``n_neighbors`` nearest of its prefix. The plain reference is scikit-learn's
``NearestNeighbors`` on its own coreset bank.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.neighbors import NearestNeighbors

from stages.methods.base import DetectorConfig, Hyper, PositiveInt, Scored, capped
from stages.methods.knn import aggregate_distances
from stages.methods.patchcore import (
    CoresetRatio,
    PatchDetector,
    PatchFamily,
    as_patches,
    plain_bank,
    reserve_coreset,
    shared_bank,
)
from stages.methods.unit import Needs, UnitData
from stages.patch.patchcore import prefix_nearest


class PatchKNNDetector(PatchDetector):
    """Plain PatchKNN: ``NearestNeighbors`` (float64) on the coreset bank."""

    def __init__(
        self,
        n_neighbors: int = 1,
        aggregate: str = "kth",
        coreset_ratio: float = 0.1,
        random_state: int = 0,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.aggregate = aggregate
        self.coreset_ratio = coreset_ratio
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> PatchKNNDetector:
        patches = as_patches(X)
        bank = plain_bank(patches.reshape(-1, patches.shape[2]), self.coreset_ratio,
                          self.random_state)  # fmt: skip
        self.k_ = capped(self.n_neighbors, len(bank))
        self.nn_ = NearestNeighbors(n_neighbors=self.k_).fit(bank.astype(np.float64))
        return self

    def score_images(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        patches = as_patches(X)
        dist, _ = self.nn_.kneighbors(patches.reshape(-1, patches.shape[2]).astype(np.float64))
        scores = aggregate_distances(dist, self.aggregate).reshape(patches.shape[:2])
        return scores.max(axis=1), scores.reshape(np.shape(X)[:3]).astype(np.float32)


class PatchKNNFamily(PatchFamily):
    class hyper(Hyper):
        n_neighbors: PositiveInt = 1
        aggregate: Literal["kth", "mean"] = "kth"
        coreset_ratio: CoresetRatio = 0.1

    name = "PatchKNN"
    seeded = True  # the coreset's projection and start
    detector = PatchKNNDetector

    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        """The ``NearestNeighbors`` the reference fits."""
        return [(NearestNeighbors(n_neighbors=params.get("n_neighbors", 1)), {})]

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        reserve_coreset(needs, [self.hyperparams(c).coreset_ratio for c in configs])

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Scored]:
        params = [self.hyperparams(c) for c in configs]
        ratios = sorted({p.coreset_ratio for p in params})
        bank, sizes = shared_bank(data, split, seed, ratios)
        grids = data.patches(data.queries(split))
        flat = grids.reshape(-1, grids.shape[3])
        k = max(p.n_neighbors for p in params)
        found = prefix_nearest(flat, bank, sizes, k)
        out = []
        for p in params:
            dist = found[ratios.index(p.coreset_ratio)][0]
            kk = capped(p.n_neighbors, dist.shape[1])
            scores = aggregate_distances(dist[:, :kk], p.aggregate).reshape(grids.shape[:3])
            out.append(Scored(scores.max(axis=(1, 2)), scores.astype(np.float32)))
        return out
