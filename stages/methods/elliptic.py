"""EllipticEnvelope after PCA (the study's): every n_components from one PCA basis.

The study reduced to 32/64/128/256 components (fewer when the data has fewer) and fitted
EllipticEnvelope on the projections. The shared path takes the unit's projections on the
top components (from the centred train Gram, one eigendecomposition for every family that
asks) and runs :class:`stages.mcd.FastEllipticEnvelope`, scikit-learn's FastMCD with one
Cholesky per covariance (same supports and scores), on one BLAS thread.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.covariance import EllipticEnvelope
from sklearn.decomposition import PCA

from stages.methods.base import DetectorConfig, Fraction, PCAFamily, capped
from stages.methods.unit import UnitData


class PCAEllipticEnvelope(OutlierMixin, BaseEstimator):
    """PCA to ``min(n_components, n_samples, n_features)`` then EllipticEnvelope (the study's).

    A plain ``Pipeline(PCA(k), ...)`` cannot express "fewer when the data has fewer".
    """

    def __init__(self, n_components: int = 32, support_fraction: float | None = None,
                 random_state: int | None = None) -> None:  # fmt: skip
        self.n_components = n_components
        self.support_fraction = support_fraction
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> PCAEllipticEnvelope:
        k = capped(self.n_components, *X.shape)
        self.pca_ = PCA(n_components=k, svd_solver="full", random_state=self.random_state)
        self.envelope_ = EllipticEnvelope(
            support_fraction=self.support_fraction, random_state=self.random_state
        )
        self.envelope_.fit(self.pca_.fit_transform(X))
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return self.envelope_.score_samples(self.pca_.transform(X))


class EllipticEnvelopeFamily(PCAFamily):
    """The shared PCA basis, capped as the study did (``min(k, n_train, n_features)``)."""

    class hyper(PCAFamily.hyper):
        support_fraction: Fraction | None = None

    name = "EllipticEnvelope"
    seeded = True

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        params = dict(params)
        return PCAEllipticEnvelope(n_components=params.pop("pca_components", 32), **params,
                                   random_state=seed)  # fmt: skip

    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        envelope = EllipticEnvelope(support_fraction=params.get("support_fraction"))
        return [*super().checked_estimators(params), (envelope, {})]

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray | BaseException]:
        pca = data.pca(split)
        n, d = len(data.train[split]), data.n_features
        done: dict[tuple, np.ndarray | BaseException] = {}  # equal (k, params) after capping
        out: list[np.ndarray | BaseException] = []
        for config in configs:
            p = self.hyperparams(config)
            k = capped(p.pca_components, n, d)
            key = (k, p.support_fraction)
            if key not in done:
                z_train = pca.z_train[:, :k].astype(data.dtype)
                z_queries = pca.z_queries[:, :k].astype(data.dtype)
                try:
                    done[key] = _elliptic_one(z_train, z_queries, seed, p.support_fraction)
                except Exception as exc:
                    done[key] = exc
            out.append(done[key])
        return out


def _elliptic_one(
    z_train: np.ndarray, z_queries: np.ndarray, seed: int, support_fraction: float | None
) -> np.ndarray:
    """One EllipticEnvelope fit on PCA projections, single-threaded.

    FastMCD factorises hundreds of small (<= 256 x 256) matrices; one BLAS thread is ~3x
    faster than two fighting over them (54 s vs 17 s for 1,254 x 256 on 2 cores).
    """
    from threadpoolctl import threadpool_limits

    from stages.mcd import FastEllipticEnvelope

    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = FastEllipticEnvelope(random_state=seed, support_fraction=support_fraction)
        model.fit(z_train)
    return -model.score_samples(z_queries)
