"""PCAReconstruction: squared error of reconstructing an image from its top components.

What a linear autoencoder would learn. The shared path needs no reconstruction: the error
is the squared distance to the training mean minus what the top ``pca_components``
components hold, ``||x - mean||^2 - ||z||^2``, both from the unit's Gram and PCA basis
(shared with EllipticEnvelope). Both paths set an error below ``NOISE`` of the image's
energy ``||x - mean||^2`` to exactly 0: it is rounding noise (the difference's relative
error is ~1e-13 for a thousand rows), and with as many components as the data's rank every
error is such noise, which must rank as ties, not by the CPU's summation order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.methods.base import PCADetector, PCAFamily

NOISE = 1e-9


def denoised(error: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Squared reconstruction errors, 0 where below ``NOISE`` x the energy ``||x - mean||^2``."""
    return np.where(error > NOISE * energy, error, 0.0)


class PCAReconstructionError(PCADetector):
    """Plain reference: PCA; score = ``||x - inverse_transform(transform(x))||^2``."""

    def fit(self, X: np.ndarray, y: Any = None) -> PCAReconstructionError:
        self._fit_pca(X)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        error = ((X - self.pca_.inverse_transform(self.pca_.transform(X))) ** 2).sum(axis=1)
        return -denoised(error, ((X - self.pca_.mean_) ** 2).sum(axis=1))


class PCAReconstructionFamily(PCAFamily):
    name = "PCAReconstruction"
    detector = PCAReconstructionError

    def score(
        self, z_train: np.ndarray, z_queries: np.ndarray, centred_sq: np.ndarray
    ) -> np.ndarray:
        return denoised(centred_sq - np.einsum("ij,ij->i", z_queries, z_queries), centred_sq)
