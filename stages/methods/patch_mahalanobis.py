"""PatchMahalanobis: one Gaussian over every training patch, all positions pooled.

The position-free counterpart of PaDiM (and the patch version of the image-level
Mahalanobis): scikit-learn's ``LedoitWolf`` (shrunk covariance, float64) fitted on the
bank of training patches, every one at ``coreset_ratio`` 1 (the default) or PatchCore's
greedy coreset of that ratio; a patch scores its Mahalanobis distance (the square root
of ``LedoitWolf.mahalanobis``), an image its largest patch score.

Shared path: the greedy order shared with PatchCore and PatchKNN when a ratio is below 1,
the same ``LedoitWolf`` fit per ratio, and the distances as float64 matrix products in
blocks of queries rather than scipy's per-row loop. The plain reference is
``LedoitWolf().fit(bank).mahalanobis(patches)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from stages.methods.base import DetectorConfig, Hyper, Scored
from stages.methods.patchcore import (
    CoresetRatio,
    PatchDetector,
    PatchFamily,
    as_patches,
    coreset_prefix,
    plain_bank,
    reserve_coreset,
    training_patches,
)
from stages.methods.unit import Needs, UnitData
from stages.patch.patchcore import coreset_size

BLOCK_BYTES = 1 << 27  # 128 MiB of float64 query patches per block


class PatchMahalanobisDetector(PatchDetector):
    """Plain PatchMahalanobis: ``LedoitWolf`` on the bank, its ``mahalanobis``, square root."""

    def __init__(self, coreset_ratio: float = 1.0, random_state: int = 0) -> None:
        self.coreset_ratio = coreset_ratio
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> PatchMahalanobisDetector:
        patches = as_patches(X)
        bank = plain_bank(patches.reshape(-1, patches.shape[2]), self.coreset_ratio,
                          self.random_state)  # fmt: skip
        self.model_ = LedoitWolf().fit(bank.astype(np.float64))
        return self

    def score_images(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        patches = as_patches(X)
        sq = self.model_.mahalanobis(patches.reshape(-1, patches.shape[2]).astype(np.float64))
        scores = np.sqrt(sq).reshape(patches.shape[:2])
        return scores.max(axis=1), scores.reshape(np.shape(X)[:3]).astype(np.float32)


def mahalanobis_blocks(
    x: np.ndarray, location: np.ndarray, precision: np.ndarray, block_bytes: int = BLOCK_BYTES
) -> np.ndarray:
    """``sqrt((x - location)^T precision (x - location))`` per row, float64, a block of
    rows at a time (what ``LedoitWolf.mahalanobis`` returns squared, as matrix products)."""
    out = np.empty(len(x))
    block = max(1, block_bytes // (8 * max(x.shape[1], 1)))
    for r in range(0, len(x), block):
        delta = x[r : r + block].astype(np.float64) - location
        out[r : r + block] = np.einsum("ij,ij->i", delta @ precision, delta)
    return np.sqrt(np.maximum(out, 0.0))


class PatchMahalanobisFamily(PatchFamily):
    class hyper(Hyper):
        coreset_ratio: CoresetRatio = 1.0

    name = "PatchMahalanobis"
    seeded = True  # the coreset below ratio 1
    detector = PatchMahalanobisDetector

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        reserve_coreset(needs, [self.hyperparams(c).coreset_ratio for c in configs])

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Scored | BaseException]:
        patches = training_patches(data, split)
        grids = data.patches(data.queries(split))
        flat = grids.reshape(-1, grids.shape[3])
        done: dict[float, Scored | BaseException] = {}
        out = []
        for config in configs:
            ratio = self.hyperparams(config).coreset_ratio
            if ratio not in done:
                done[ratio] = self._one(data, split, seed, patches, flat, ratio, grids.shape)
            out.append(done[ratio])
        return out

    @staticmethod
    def _one(data: UnitData, split: Hashable, seed: int, patches: np.ndarray,
             flat: np.ndarray, ratio: float, shape: tuple[int, ...]) -> Scored | BaseException:  # fmt: skip
        """One ratio: the bank in the plain reference's order (the fit is the same), its
        ``LedoitWolf``, every query patch's distance."""
        try:
            bank = patches
            if ratio < 1:
                bank = patches[coreset_prefix(data, split, seed, coreset_size(len(patches), ratio))]
            model = LedoitWolf().fit(bank.astype(np.float64))
            scores = mahalanobis_blocks(flat, model.location_, model.precision_)
        except Exception as exc:
            return exc
        scores = scores.reshape(shape[:3])
        return Scored(scores.max(axis=(1, 2)), scores.astype(np.float32))
