"""PCAReconstruction: squared error of reconstructing an image from its top components.

What a linear autoencoder would learn. No reconstruction is needed: the error is the
squared distance to the training mean minus what the top ``pca_components`` components
hold, ``||x - mean||^2 - ||z||^2`` (from the unit's Gram and the PCA basis it shares with
EllipticEnvelope; the plain reference runs scikit-learn's ``PCA`` and projects the same
way). An error below ``NOISE`` of the image's energy ``||x - mean||^2`` is set to exactly
0: it is rounding noise (the difference's relative error is ~1e-13 for a thousand rows),
and with as many components as the data's rank every error is such noise, which must
rank as ties, not by the CPU's summation order.
"""

from __future__ import annotations

import numpy as np

from stages.methods.base import PCADetector, PCAFamily

NOISE = 1e-9


class PCAReconstructionError(PCADetector):
    """PCA; score = squared reconstruction error, 0 below ``NOISE`` x the energy."""

    @staticmethod
    def score_projected(
        z_train: np.ndarray, z_queries: np.ndarray, centred_sq: np.ndarray
    ) -> np.ndarray:
        error = centred_sq - np.einsum("ij,ij->i", z_queries, z_queries)
        return np.where(error > NOISE * centred_sq, error, 0.0)


class PCAReconstructionFamily(PCAFamily):
    name = "PCAReconstruction"
    detector = PCAReconstructionError
