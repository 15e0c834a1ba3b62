"""Mahalanobis: a Gaussian with Ledoit-Wolf shrinkage after PCA (score: squared distance).

The classic parametric baseline (as PaDiM per patch). ``sklearn.covariance.LedoitWolf``
on the projections of the training images on the top ``pca_components`` principal
components, taken from the unit's PCA basis shared with EllipticEnvelope. The distance is
invariant to the components' signs, which the Gram's eigendecomposition leaves arbitrary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from stages.methods.base import PCADetector, PCAFamily


class PCAMahalanobis(PCADetector):
    """Plain reference: PCA, then ``LedoitWolf``; score = squared Mahalanobis distance."""

    def fit(self, X: np.ndarray, y: Any = None) -> PCAMahalanobis:
        X = self._fit_pca(X)
        self.covariance_ = LedoitWolf().fit(self.pca_.transform(X))
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -self.covariance_.mahalanobis(self.pca_.transform(np.asarray(X, np.float64)))


class MahalanobisFamily(PCAFamily):
    name = "Mahalanobis"
    detector = PCAMahalanobis

    def score(
        self, z_train: np.ndarray, z_queries: np.ndarray, centred_sq: np.ndarray
    ) -> np.ndarray:
        return LedoitWolf().fit(z_train).mahalanobis(z_queries)
