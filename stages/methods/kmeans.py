"""KMeansDistance: distance to the nearest of k centroids of the training images (seeded).

The course's Method 2. The plain reference is scikit-learn's ``KMeans`` on the training
rows. The shared path is the same algorithm written on the unit's Gram matrix (kernel
k-means with the linear kernel): a centroid is a weighted sum of training rows, so every
distance k-means++, Lloyd and the scoring need is a combination of dot products the Gram
already holds, and no step touches the features' hundreds of thousands of dimensions. It
follows scikit-learn 1.9's ``KMeans`` (k-means++ with 2 + log k local trials, Lloyd with
strict or ``tol`` convergence on the centroid shift, empty clusters moved to the farthest
points, the best of ``n_init`` runs by inertia) step by step, drawing the same random
numbers from the same seed, so in exact arithmetic it picks the same seeds and ends at
the same centroids; only rounding differs (float64 Gram against float32 features).
n_clusters is capped to the training set's size.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state

from stages.methods.base import DetectorConfig, Family, Hyper, PositiveInt, capped
from stages.methods.unit import Needs, UnitData


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


# --- the math: k-means on a centred Gram matrix -----------------------------------------------


def _plusplus(Kc: np.ndarray, n_clusters: int, rng: np.random.RandomState) -> np.ndarray:
    """k-means++ seeds (indices), as scikit-learn's ``_kmeans_plusplus`` with unit weights."""
    n = len(Kc)
    sq = np.diagonal(Kc)
    weights = np.ones(n)
    trials = 2 + int(np.log(n_clusters))
    seeds = np.full(n_clusters, -1, dtype=np.int64)
    seeds[0] = rng.choice(n, p=weights / weights.sum())
    closest = np.maximum(sq[seeds[0]] + sq - 2.0 * Kc[seeds[0]], 0.0)
    potential = closest @ weights
    for c in range(1, n_clusters):
        draws = rng.uniform(size=trials) * potential
        candidates = np.searchsorted(np.cumsum(weights * closest), draws)
        np.clip(candidates, None, n - 1, out=candidates)
        dist = np.maximum(sq[candidates, None] + sq[None, :] - 2.0 * Kc[candidates], 0.0)
        np.minimum(closest, dist, out=dist)
        potentials = dist @ weights
        best = int(np.argmin(potentials))
        potential, closest, seeds[c] = potentials[best], dist[best], candidates[best]
    return seeds


def _assign(Kc: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (nearest centroid, first on ties), ``x_i . c_j`` and ``||c_j||^2``."""
    KC = Kc @ C.T
    c_sq = np.einsum("jn,nj->j", C, KC)
    return np.argmin(c_sq[None, :] - 2.0 * KC, axis=1), KC, c_sq


def _update(
    Kc: np.ndarray, C: np.ndarray, labels: np.ndarray, KC: np.ndarray, c_sq: np.ndarray
) -> np.ndarray:
    """The next centroids: means of the clusters; an empty cluster takes the point farthest
    from its centroid, and one still empty copies the heaviest (scikit-learn's Lloyd step)."""
    k, n = C.shape
    C_new = np.zeros_like(C)
    C_new[labels, np.arange(n)] = 1.0
    weight = np.bincount(labels, minlength=k).astype(np.float64)
    empty = np.flatnonzero(weight == 0)
    if len(empty):
        own = np.arange(n)
        dist = np.diagonal(Kc) - 2.0 * KC[own, labels] + c_sq[labels]
        far = np.argpartition(dist, -len(empty))[: -len(empty) - 1 : -1]
        if np.max(dist) != 0:
            for new, f in zip(empty, far, strict=True):
                old = labels[f]
                C_new[old, f] -= 1.0
                C_new[new] = 0.0
                C_new[new, f] = 1.0
                weight[new] = 1.0
                weight[old] -= 1.0
    heaviest = int(np.argmax(weight))
    for j in range(k):  # in order, as scikit-learn's _average_centers
        if weight[j] > 0:
            C_new[j] /= weight[j]
        else:
            C_new[j] = C_new[heaviest]
    return C_new


def _lloyd(
    Kc: np.ndarray, seeds: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """One Lloyd run from the seeds: centroid weights (k, n), labels, inertia."""
    n = len(Kc)
    C = np.zeros((len(seeds), n))
    C[np.arange(len(seeds)), seeds] = 1.0
    labels_old = np.full(n, -1)
    for _ in range(max_iter):
        labels, KC, c_sq = _assign(Kc, C)
        C_new = _update(Kc, C, labels, KC, c_sq)
        delta = C_new - C
        shift_sq = np.maximum(np.einsum("jn,nj->j", delta, Kc @ delta.T), 0.0)
        C = C_new
        if np.array_equal(labels, labels_old) or shift_sq.sum() <= tol:
            break  # strict convergence, or the centroids moved less than tol
        labels_old = labels
    labels, KC, c_sq = _assign(Kc, C)  # the final centroids' labels (scikit-learn's last E-step)
    sq = np.diagonal(Kc)
    own = np.arange(n)
    inertia = float(np.maximum(sq - 2.0 * KC[own, labels] + c_sq[labels], 0.0).sum())
    return C, labels, inertia


def _same_clustering(a: np.ndarray, b: np.ndarray, k: int) -> bool:
    """One labelling is a relabelling of the other (scikit-learn's ``_is_same_clustering``)."""
    mapping = np.full(k, -1)
    for x, y in zip(a, b, strict=True):
        if mapping[x] == -1:
            mapping[x] = y
        elif mapping[x] != y:
            return False
    return True


def kmeans_gram(
    Kc: np.ndarray, n_clusters: int, *, n_init: int, max_iter: int, tol: float, seed: int
) -> np.ndarray:
    """scikit-learn's ``KMeans(init="k-means++", algorithm="lloyd")`` on rows given by their
    centred Gram ``Kc`` (n, n); ``tol`` already scaled (``_tolerance``). Returns the
    centroids as weights over the rows (k, n): ``centroid = weights @ (X - mean)``."""
    rng = check_random_state(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(n_init):
        C, labels, inertia = _lloyd(Kc, _plusplus(Kc, n_clusters, rng), max_iter, tol)
        if best is None or (
            inertia < best[2] and not _same_clustering(labels, best[1], n_clusters)
        ):
            best = (C, labels, inertia)
    assert best is not None
    return best[0]


# --- the family ---------------------------------------------------------------------------------


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

    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        """The ``KMeans`` the reference fits (same parameter names)."""
        return [(KMeans(**params, random_state=0), {})]

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        """Nothing beyond the Gram, which every unit has."""

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray | BaseException]:
        c = data.centred(split)
        Kc, Kc_q, q_sq = c.train, c.queries, c.queries_sq
        # scikit-learn's tolerance: tol x the mean per-feature variance of the training rows
        variance = max(float(np.trace(Kc)), 0.0) / (len(Kc) * data.n_features)
        out: list[np.ndarray | BaseException] = []
        for config in configs:
            p = self.hyperparams(config)
            try:
                k = capped(p.n_clusters, len(Kc))
                n_init = 1 if p.n_init == "auto" else p.n_init  # "auto" is 1 for k-means++
                C = kmeans_gram(Kc, k, n_init=n_init, max_iter=p.max_iter,
                                tol=p.tol * variance, seed=seed)  # fmt: skip
                c_sq = np.einsum("jn,nj->j", C, Kc @ C.T)
                dist = q_sq[:, None] - 2.0 * Kc_q @ C.T + c_sq[None, :]
                out.append(np.sqrt(np.maximum(dist, 0.0).min(axis=1)))
            except Exception as exc:
                out.append(exc)
        return out
