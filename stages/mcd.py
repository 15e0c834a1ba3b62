"""EllipticEnvelope with scikit-learn's FastMCD, minus its redundant and slow factorisations.

scikit-learn's ``fast_mcd`` spends ~80% of an EllipticEnvelope fit on ``pinvh`` (a full
eigendecomposition) and ``slogdet`` of the same covariance in every C-step (measured: 54 s
for 1,254 rows x 256 PCA components). One Cholesky factor gives both the log-determinant
and the Mahalanobis distances (through its inverse and one GEMM), ~40x cheaper at 256
dimensions. Everything else is kept as scikit-learn does it, draw for draw from the same
``RandomState``: the subsets, the 500 trials, the candidate selection, the convergence
tests, and the final consistency correction and reweighting (scikit-learn's own methods).
A covariance that is not positive definite (Cholesky fails), or one from fewer rows than
its dimension, takes scikit-learn's ``pinvh``/``slogdet`` path, the pseudo-inverse on
LAPACK's divide-and-conquer eigensolver (2.4x pinvh's QR-iteration one at 256 x 256).

Results equal ``EllipticEnvelope`` up to float rounding of the distances, except where
FastMCD's subsets have fewer rows than dimensions (the 1,254 augmented rows at 256 PCA
components): there every subset covariance is singular, its "determinant" is rounding
noise, and the chosen candidates follow that noise. scikit-learn itself picks a different
raw support there with 1 or 2 BLAS threads (2 of 3 seeds on the bottle features), so no
implementation can match it bit for bit; tests/test_mcd.py compares that case with
scikit-learn running on the same pseudo-inverse.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
from scipy import linalg
from sklearn.covariance import EllipticEnvelope
from sklearn.covariance import fast_mcd as sklearn_fast_mcd
from sklearn.utils import check_random_state
from sklearn.utils.extmath import fast_logdet
from sklearn.utils.validation import validate_data


def _covariance(rows: np.ndarray) -> np.ndarray:
    """``empirical_covariance`` of 2-D rows without its parameter validation (~0.3 ms a call)."""
    return np.cov(rows.T, bias=1)


def _pinvh(covariance: np.ndarray) -> np.ndarray:
    """``scipy.linalg.pinvh`` (same cutoff) on LAPACK's divide-and-conquer ``syevd``.

    pinvh calls the QR-iteration driver ``syev``, 2.4x slower here at 256 x 256; the
    pseudo-inverse is the same up to rounding.
    """
    s, u = linalg.eigh(covariance, check_finite=False, driver="evd")
    cutoff = np.max(np.abs(s), initial=0.0) * max(covariance.shape) * np.finfo(s.dtype).eps
    above = np.abs(s) > cutoff
    return (u[:, above] / s[above]) @ u[:, above].T


class _Factor:
    """log-determinant and Mahalanobis distances of one covariance, from one factorisation."""

    def __init__(self, covariance: np.ndarray, n_rows: int) -> None:
        self.covariance = covariance
        self.chol: np.ndarray | None = None
        if n_rows > covariance.shape[0]:  # else singular by construction: scikit-learn's path
            with contextlib.suppress(linalg.LinAlgError):  # not positive definite
                self.chol = linalg.cholesky(covariance, lower=True)
        if self.chol is not None:
            self.logdet = 2.0 * float(np.log(np.diag(self.chol)).sum())
        else:
            self.logdet = fast_logdet(covariance)
        self._precision: np.ndarray | None = None
        self._inverse: np.ndarray | None = None  # L^-1, at first use (C-steps call twice)

    def dist(self, centred: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances of the rows of ``centred``."""
        if self.chol is not None:  # L^-1 once, then one GEMM a call: 1.5x a triangular solve
            if self._inverse is None:
                (trtri,) = linalg.get_lapack_funcs(("trtri",), (self.chol,))
                self._inverse, info = trtri(self.chol, lower=1)
                if info:  # cannot happen: a Cholesky factor's diagonal is positive
                    raise linalg.LinAlgError(f"trtri failed (info {info})")
            y = centred @ self._inverse.T
            return np.einsum("ij,ij->i", y, y)
        if self._precision is None:
            self._precision = _pinvh(self.covariance)
        return (centred @ self._precision * centred).sum(axis=1)


def _c_step(
    X: np.ndarray,
    n_support: int,
    random_state: np.random.RandomState,
    remaining_iterations: int = 30,
    initial: tuple[np.ndarray, np.ndarray] | None = None,
    want_dist: bool = True,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray | None]:
    """scikit-learn's ``_c_step``, with one factorisation per covariance.

    ``want_dist=False`` skips the final distances (and the pseudo-inverse they may need)
    where the caller discards them: the subset stage of FastMCD.
    """
    n_samples = X.shape[0]
    dist: np.ndarray | float = np.inf
    if initial is None:
        support_indices = random_state.permutation(n_samples)[:n_support]
    else:
        # a start's covariance may come from fewer rows than its dimension: scikit-learn's pinvh
        dist = _Factor(initial[1], 0).dist(X - initial[0])
        support_indices = np.argpartition(dist, n_support - 1)[:n_support]
    X_support = X[support_indices]
    location = X_support.mean(0)
    factor = _Factor(_covariance(X_support), n_support)
    det = factor.logdet
    used = factor  # the factor whose precision gives the final distances, as in scikit-learn

    previous_det = np.inf
    previous: tuple = ()
    while det < previous_det and remaining_iterations > 0 and not np.isinf(det):
        previous = (location, factor.covariance, det, support_indices)
        previous_det = det
        used = factor
        dist = factor.dist(X - location)
        support_indices = np.argpartition(dist, n_support - 1)[:n_support]
        X_support = X[support_indices]
        location = X_support.mean(axis=0)
        factor = _Factor(_covariance(X_support), n_support)
        det = factor.logdet
        remaining_iterations -= 1

    previous_dist = dist
    dist = used.dist(X - location) if want_dist else None
    results = None
    if np.isinf(det):
        results = location, factor.covariance, det, support_indices, dist
    if np.allclose(det, previous_det):
        results = location, factor.covariance, det, support_indices, dist
    elif det > previous_det:
        results = (*previous, previous_dist)
    if remaining_iterations == 0:
        results = location, factor.covariance, det, support_indices, dist
    location, covariance, det, support_indices, dist = results
    support = np.bincount(support_indices, minlength=n_samples).astype(bool)
    return location, covariance, det, support, dist


def _select_candidates(
    X: np.ndarray,
    n_support: int,
    n_trials: int | tuple[np.ndarray, np.ndarray],
    select: int,
    random_state: np.random.RandomState,
    n_iter: int = 30,
    want_dist: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """scikit-learn's ``select_candidates``: the ``select`` lowest-determinant C-step results."""
    if isinstance(n_trials, tuple):
        starts = [(n_trials[0][j], n_trials[1][j]) for j in range(n_trials[0].shape[0])]
        runs = [_c_step(X, n_support, random_state, n_iter, s, want_dist) for s in starts]
    else:
        runs = [
            _c_step(X, n_support, random_state, n_iter, want_dist=want_dist)
            for _ in range(n_trials)
        ]
    locs, covs, dets, supports, dists = zip(*runs, strict=True)
    best = np.argsort(dets)[:select]
    return (
        np.asarray(locs)[best],
        np.asarray(covs)[best],
        np.asarray(supports)[best],
        np.asarray(dists)[best] if want_dist else None,
    )


def fast_mcd(
    X: np.ndarray, support_fraction: float | None = None, random_state: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw MCD estimates (location, covariance, support, distances), as scikit-learn's."""
    random_state = check_random_state(random_state)
    n_samples, n_features = X.shape
    if n_features == 1:  # scikit-learn's closed form; nothing to save
        return sklearn_fast_mcd(X, support_fraction=support_fraction, random_state=random_state)
    if support_fraction is None:
        n_support = min(int(np.ceil(0.5 * (n_samples + n_features + 1))), n_samples)
    else:
        n_support = int(support_fraction * n_samples)

    if n_samples > 500:
        n_subsets = n_samples // 300
        n_samples_subsets = n_samples // n_subsets
        samples_shuffle = random_state.permutation(n_samples)
        h_subset = int(np.ceil(n_samples_subsets * (n_support / float(n_samples))))
        n_best_sub = 10
        n_trials = max(10, 500 // n_subsets)
        n_best_tot = n_subsets * n_best_sub
        best_locations = np.zeros((n_best_tot, n_features))
        best_covariances = np.zeros((n_best_tot, n_features, n_features))
        for i in range(n_subsets):
            low = i * n_samples_subsets
            subset = X[samples_shuffle[low : low + n_samples_subsets]]
            locs, covs, _, _ = _select_candidates(
                subset, h_subset, n_trials, n_best_sub, random_state, n_iter=2, want_dist=False
            )
            rows = np.arange(i * n_best_sub, (i + 1) * n_best_sub)
            best_locations[rows], best_covariances[rows] = locs, covs
        n_samples_merged = min(1500, n_samples)
        h_merged = int(np.ceil(n_samples_merged * (n_support / float(n_samples))))
        n_best_merged = 10 if n_samples > 1500 else 1
        selection = random_state.permutation(n_samples)[:n_samples_merged]
        locs, covs, supports, d = _select_candidates(
            X[selection],
            h_merged,
            (best_locations, best_covariances),
            n_best_merged,
            random_state,
        )
        if n_samples < 1500:
            support = np.zeros(n_samples, dtype=bool)
            dist = np.zeros(n_samples)
            support[selection], dist[selection] = supports[0], d[0]
            return locs[0], covs[0], support, dist
        locs, covs, supports, d = _select_candidates(X, n_support, (locs, covs), 1, random_state)
        return locs[0], covs[0], supports[0], d[0]

    locs, covs, _, _ = _select_candidates(
        X, n_support, 30, 10, random_state, n_iter=2, want_dist=False
    )
    locs, covs, supports, d = _select_candidates(X, n_support, (locs, covs), 1, random_state)
    return locs[0], covs[0], supports[0], d[0]


class FastEllipticEnvelope(EllipticEnvelope):
    """``EllipticEnvelope`` whose MCD fit uses :func:`fast_mcd`; same params, same scores."""

    def fit(self, X: np.ndarray, y: Any = None) -> FastEllipticEnvelope:
        """Fit as ``EllipticEnvelope.fit``: raw MCD, consistency correction, reweighting."""
        if self.assume_centered:  # scikit-learn's path; the fast one mirrors only the default
            return super().fit(X, y)
        self._validate_params()
        X = validate_data(self, X, ensure_min_samples=2)
        if (linalg.svdvals(np.dot(X.T, X)) > 1e-8).sum() != X.shape[1]:
            warnings.warn(
                "The covariance matrix associated to your dataset is not full rank",
                stacklevel=2,
            )
        location, covariance, support, dist = fast_mcd(
            X, self.support_fraction, check_random_state(self.random_state)
        )
        self.raw_location_, self.raw_covariance_, self.raw_support_ = location, covariance, support
        self.location_, self.support_, self.dist_ = location, support, dist
        self.correct_covariance(X)
        self.reweight_covariance(X)
        self.offset_ = np.percentile(-self.dist_, 100.0 * self.contamination)
        return self
