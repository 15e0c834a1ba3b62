"""PaDiM (Defard et al. 2021): a Gaussian per patch position on a random channel subset.

Each position of the training images' patch grids gets a mean and a regularised
covariance (``S + 0.01 I``) over ``n_channels`` channels drawn with the seed (capped at the
feature set's channels: then every channel); a patch scores its Mahalanobis distance to its
position's Gaussian, an image its largest patch score (:mod:`stages.patch.padim`).

Shared path: one batched, memory-bounded fit per distinct channel subset
(:func:`stages.patch.padim.padim_distances`), scoring the test and training rows at once;
configs whose ``n_channels`` both reach every channel share it. The plain reference is a
loop over positions with ``np.cov`` and an explicit inverse.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from stages.methods.base import DetectorConfig, Hyper, PositiveInt, Scored
from stages.methods.patchcore import PatchDetector, PatchFamily, as_patches
from stages.methods.unit import Needs, UnitData
from stages.patch.padim import REGULARISATION, channel_subset, padim_distances


class PaDiMDetector(PatchDetector):
    """Plain PaDiM: per position, ``np.cov`` (n - 1) + 0.01 I, its inverse, the distance."""

    def __init__(self, n_channels: int = 100, random_state: int = 0) -> None:
        self.n_channels = n_channels
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> PaDiMDetector:
        patches = as_patches(X)
        if len(patches) < 2:
            raise ValueError(f"PaDiM needs at least 2 training images, got {len(patches)}")
        self.channels_ = channel_subset(patches.shape[2], self.n_channels, self.random_state)
        x = patches[:, :, self.channels_].astype(np.float64)
        eye = REGULARISATION * np.eye(len(self.channels_))
        self.mean_ = x.mean(axis=0)  # (positions, d)
        self.precision_ = np.stack([
            np.linalg.inv(np.atleast_2d(np.cov(x[:, p], rowvar=False)) + eye)
            for p in range(x.shape[1])
        ])  # fmt: skip
        return self

    def score_images(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        delta = as_patches(X)[:, :, self.channels_].astype(np.float64) - self.mean_
        sq = np.stack([
            ((delta[:, p] @ self.precision_[p]) * delta[:, p]).sum(axis=1)
            for p in range(delta.shape[1])
        ], axis=1)  # fmt: skip
        scores = np.sqrt(np.maximum(sq, 0.0))
        return scores.max(axis=1), scores.reshape(np.shape(X)[:3]).astype(np.float32)


class PaDiMFamily(PatchFamily):
    class hyper(Hyper):
        n_channels: PositiveInt = 100

    name = "PaDiM"
    seeded = True  # the channel subset
    detector = PaDiMDetector

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        needs.reserve(raw=True)

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Scored | BaseException]:
        h, w, c = data.grid
        train = data.patches(data.train[split]).reshape(-1, h * w, c)
        queries = data.patches(data.queries(split)).reshape(-1, h * w, c)
        done: dict[tuple[int, ...], Scored | BaseException] = {}
        out = []
        for config in configs:
            channels = channel_subset(c, self.hyperparams(config).n_channels, seed)
            key = tuple(channels.tolist())
            if key not in done:
                done[key] = _scored(train, queries, channels, (h, w))
            out.append(done[key])
        return out


def _scored(
    train: np.ndarray, queries: np.ndarray, channels: np.ndarray, grid: tuple[int, int]
) -> Scored | BaseException:
    try:
        scores = padim_distances(train, queries, channels)
    except Exception as exc:
        return exc
    return Scored(scores.max(axis=1), scores.reshape(-1, *grid).astype(np.float32))
