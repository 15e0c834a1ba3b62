"""KernelDensity: every bandwidth and kernel from the unit's query-to-train distances.

The shared path is the exact float64 log-density over all training rows (scikit-learn's
tree-based estimate is inaccurate when the bandwidth is small against the distances, as
in every study layer), normalised as scikit-learn does, except the cosine kernel's norm,
which scikit-learn's series gets wrong from d ~ 9 (a constant per feature set: AUROC is
unaffected). The plain reference is scikit-learn's ``KernelDensity``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.neighbors import KernelDensity

from stages.methods.base import DetectorConfig, Hyper, PositiveFloat, SklearnFamily
from stages.methods.unit import UnitData

KDE_KERNELS = ("gaussian", "tophat", "epanechnikov", "exponential", "linear", "cosine")


class KernelDensityFamily(SklearnFamily):
    class hyper(Hyper):
        bandwidth: Literal["scott", "silverman"] | PositiveFloat = 1.0
        kernel: Literal["gaussian", "tophat", "epanechnikov", "exponential", "linear", "cosine"] = (
            "gaussian"
        )
        metric: str = "euclidean"

    name = "KernelDensity"
    probed = ("metric",)  # e.g. mahalanobis passes the check, never a fit (needs V)
    estimator_class = KernelDensity

    def shares(self, config: DetectorConfig) -> bool:
        return self.hyperparams(config).metric == "euclidean"

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[np.ndarray | BaseException]:
        kde = KdeDistances(data.sq_dists(split))
        n, d = len(data.train[split]), data.n_features
        out: list[np.ndarray | BaseException] = []
        for config in configs:
            p = self.hyperparams(config)
            try:
                out.append(-kde.log_density(kde_bandwidth(p.bandwidth, n, d), p.kernel, d))
            except Exception as exc:
                out.append(exc)
        return out


def kde_bandwidth(bandwidth: Any, n_train: int, n_features: int) -> float:
    """scikit-learn's bandwidth: a number, or its 'scott' / 'silverman' rule (no data scale)."""
    if bandwidth == "scott":
        return n_train ** (-1 / (n_features + 4))
    if bandwidth == "silverman":
        return (n_train * (n_features + 2) / 4) ** (-1 / (n_features + 4))
    return float(bandwidth)


def kde_log_norm(h: float, d: int, kernel: str) -> float:
    """scikit-learn's ``_log_kernel_norm(h, d, kernel)``, the cosine one computed stably."""
    log_pi, log_2pi = math.log(math.pi), math.log(2 * math.pi)

    def log_vn(n: int) -> float:
        return 0.5 * n * log_pi - math.lgamma(0.5 * n + 1)

    def log_sn(n: int) -> float:
        return log_2pi + log_vn(n - 1)

    if kernel == "gaussian":
        factor = 0.5 * d * log_2pi
    elif kernel == "tophat":
        factor = log_vn(d)
    elif kernel == "epanechnikov":
        factor = log_vn(d) + math.log(2.0 / (d + 2.0))
    elif kernel == "exponential":
        factor = log_sn(d - 1) + math.lgamma(d)
    elif kernel == "linear":
        factor = log_vn(d) - math.log(d + 1.0)
    elif kernel == "cosine":
        # int_0^1 r^(d-1) cos(pi r / 2) dr by quadrature. scikit-learn's alternating series
        # for it is exact for odd d < 9 only: wrong for even d, cancellation above, NaN from
        # d ~ 50 (every study layer). A constant per feature set: AUROC is unaffected.
        from scipy.integrate import quad

        peak = max(0.0, 1.0 - 8.0 / d)
        integral = sum(
            quad(lambda r: np.exp((d - 1) * np.log(r)) * np.cos(0.5 * np.pi * r), a, b,
                 epsabs=0.0, epsrel=1e-13, limit=200)[0]
            for a, b in ((0.0, peak), (peak, 1.0)) if b > a
        )  # fmt: skip
        factor = math.log(integral) + log_sn(d - 1)
    else:
        raise ValueError(f"unsupported KernelDensity kernel {kernel!r}")
    return -factor - d * math.log(h)


class KdeDistances:
    """Query-to-train distances prepared once for every KernelDensity config of a unit.

    Exact float64 log-densities, cheaper than a log-sum-exp per config: the gaussian and
    exponential kernels shift by each row's nearest distance once (then one ``exp`` pass per
    bandwidth); the compact kernels (tophat, epanechnikov, linear, cosine) sum only the
    train rows within the bandwidth, found in each row's sorted distances. In high
    dimensions the study's bandwidths reach few or no train rows, so those are nearly free.
    """

    def __init__(self, sq_dist: np.ndarray) -> None:
        sq = np.asarray(sq_dist, dtype=np.float64)
        self.n_train = sq.shape[1]
        self.nan_rows = np.isnan(sq).any(axis=1)
        self.sq = np.where(self.nan_rows[:, None], np.inf, np.maximum(sq, 0.0))
        self._dist: np.ndarray | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        self._shifted: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def dist(self) -> np.ndarray:
        if self._dist is None:
            self._dist = np.sqrt(self.sq)
        return self._dist

    def _shift(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(row minimum, values minus it) of squared distances or distances."""
        if kind not in self._shifted:
            values = self.sq if kind == "sq" else self.dist
            low = values.min(axis=1)
            self._shifted[kind] = low, values - low[:, None]
        return self._shifted[kind]

    def _log_sum_compact(self, h: float, kernel: str) -> np.ndarray:
        if self._sorted is None:  # sqrt is monotone: sorting squares sorts distances
            sorted_sq = np.sort(self.sq, axis=1)
            self._sorted = sorted_sq, np.sqrt(sorted_sq)
        sorted_sq, sorted_dist = self._sorted
        counts = (sorted_dist < h).sum(axis=1)
        width = int(counts.max(initial=0))
        inside = np.arange(width)[None, :] < counts[:, None]
        r = np.where(inside, sorted_dist[:, :width] / h, 1.0)
        if kernel == "tophat":
            k = inside.astype(np.float64)
        elif kernel == "epanechnikov":
            k = 1.0 - np.where(inside, sorted_sq[:, :width] / (h * h), 1.0)
        elif kernel == "linear":
            k = 1.0 - r
        else:  # cosine
            k = np.cos(0.5 * np.pi * r)
        with np.errstate(divide="ignore"):
            return np.log(np.where(inside, k, 0.0).sum(axis=1))

    def log_density(self, h: float, kernel: str, n_features: int) -> np.ndarray:
        """KernelDensity's ``score_samples`` at each query, normalised as scikit-learn does."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if kernel in ("gaussian", "exponential"):
                low, rest = self._shift("sq" if kernel == "gaussian" else "dist")
                scale = 0.5 / (h * h) if kernel == "gaussian" else 1.0 / h
                total = -scale * low + np.log(np.exp(-scale * rest).sum(axis=1))
            elif kernel in ("tophat", "epanechnikov", "linear", "cosine"):
                total = self._log_sum_compact(h, kernel)
            else:
                raise ValueError(f"unsupported KernelDensity kernel {kernel!r}")
        total = np.where(self.nan_rows, np.nan, total)
        return total + kde_log_norm(h, n_features, kernel) - np.log(self.n_train)


def kde_log_density(sq_dist: np.ndarray, h: float, kernel: str, n_features: int) -> np.ndarray:
    """Exact float64 log-density of KernelDensity at each query, over all train rows.

    ``sq_dist`` is (n_queries, n_train) squared distances; normalised as scikit-learn does.
    For many configs on the same distances, build one :class:`KdeDistances`.
    """
    return KdeDistances(sq_dist).log_density(h, kernel, n_features)
