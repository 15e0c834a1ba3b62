"""Mahalanobis: a Gaussian with Ledoit-Wolf shrinkage after PCA (score: squared distance).

The classic parametric baseline (as PaDiM per patch). ``sklearn.covariance.LedoitWolf``
on the projections of the training images on the top ``pca_components`` principal
components, taken from the unit's PCA basis shared with EllipticEnvelope. The distance is
invariant to the components' signs, which the Gram's eigendecomposition leaves arbitrary.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from stages.methods.base import PCADetector, PCAFamily


class PCAMahalanobis(PCADetector):
    """PCA, then ``LedoitWolf`` on the training projections; score = squared distance."""

    @staticmethod
    def score_projected(
        z_train: np.ndarray, z_queries: np.ndarray, centred_sq: np.ndarray
    ) -> np.ndarray:
        return LedoitWolf().fit(z_train).mahalanobis(z_queries)


class MahalanobisFamily(PCAFamily):
    name = "Mahalanobis"
    detector = PCAMahalanobis
