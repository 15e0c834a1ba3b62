"""Shared computation: every detector config of one feature set from a few shared quantities.

Within one work unit (one feature set) the study fits 71 scikit-learn estimators on the raw
features. Almost all of them are functions of the linear Gram matrix ``K = X X^T`` over the
unit's rows, which costs one pass over the features:

- OneClassSVM: every kernel of the grid from ``K`` (``kernel='precomputed'``), with
  ``gamma='scale'`` exactly as scikit-learn computes it;
- LocalOutlierFactor: one sorted kNN table (k = max n_neighbors) serves all configs, with
  scikit-learn's formula reproduced (reachability distance, lrd with its 1e-10);
- KernelDensity: an exact float64 log-sum-exp over all training points (scikit-learn's
  tree-based estimate is inaccurate when the bandwidth is small against the distances);
- EllipticEnvelope after PCA: exact principal components from the eigendecomposition of the
  centred train Gram, one decomposition for every n_components;
- IsolationForest: a forest of n trees with ``random_state=s`` is the n-tree prefix of the
  forest of N > n trees with the same ``random_state`` (scikit-learn draws the per-tree seeds
  up front, ``RandomState(s).randint(MAX_INT, size=N)``), so one fit scores every size.

The non-augmented experiments use the sub-matrices of the original rows: one Gram serves
both augmentation choices (call :func:`shared_scores` once per train index set).
Scores are "higher = more anomalous". Non-finite inputs give non-finite scores, and a config
whose estimator fails gives NaN scores and an entry in ``errors``: the caller counts them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import linalg

FAMILIES = (
    "OneClassSVM",
    "IsolationForest",
    "KernelDensity",
    "LocalOutlierFactor",
    "EllipticEnvelope",
)
KDE_KERNELS = ("gaussian", "tophat", "epanechnikov", "exponential", "linear", "cosine")
OCSVM_MAX_ITER = 1000  # the study's cap

Source = np.ndarray | Callable[[], Iterable[np.ndarray | pa.Table]]


# ----------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Config:
    """One detector config: family name and its (sorted, hashable) parameters."""

    family: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, family: str, **params: Any) -> Config:
        if family not in FAMILIES:
            raise ValueError(f"unknown detector family {family!r}; expected one of {FAMILIES}")
        return cls(family, tuple(sorted(params.items())))

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def __str__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.family}({inner})"


def study_configs() -> list[Config]:
    """The study's 71 configs (its Table 3)."""
    ocsvm = [Config.of("OneClassSVM", kernel=k) for k in ("linear", "rbf", "sigmoid")]
    ocsvm += [Config.of("OneClassSVM", kernel="poly", degree=d) for d in (3, 5, 8, 13, 21, 34, 55)]
    iforest = [
        Config.of("IsolationForest", n_estimators=n)
        for n in (*range(10, 101, 10), *range(200, 1001, 100))
    ]
    kde = [
        Config.of("KernelDensity", bandwidth=b, kernel=k)
        for b in (0.5, 1.0, "scott", "silverman")
        for k in KDE_KERNELS
    ]
    lof = [
        Config.of("LocalOutlierFactor", n_neighbors=k)
        for k in (2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    ]
    elliptic = [Config.of("EllipticEnvelope", n_components=k) for k in (32, 64, 128, 256)]
    return ocsvm + iforest + kde + lof + elliptic


# -------------------------------------------------------------------------------------- Gram
@dataclass(frozen=True)
class Gram:
    """The float64 Gram matrix of all rows of a unit, plus what ``X[rows].var()`` needs.

    ``shifted_sums``/``shifted_sq_sums`` are per-row sums of ``x - shift`` and
    ``(x - shift)^2`` (float64), with ``shift`` the mean of the first row block, so the
    variance of any row subset is free of cancellation.
    """

    K: np.ndarray
    n_features: int
    shift: float
    shifted_sums: np.ndarray
    shifted_sq_sums: np.ndarray
    dtype: np.dtype

    @property
    def n_rows(self) -> int:
        return self.K.shape[0]

    @property
    def sq_norms(self) -> np.ndarray:
        return np.diagonal(self.K).copy()

    def var(self, rows: np.ndarray) -> float:
        """``X[rows].var()`` (over all entries), as numpy computes it, to ~1e-15 relative."""
        count = len(np.arange(self.n_rows)[rows]) * self.n_features
        mean = float(np.sum(self.shifted_sums[rows])) / count
        return max(float(np.sum(self.shifted_sq_sums[rows])) / count - mean * mean, 0.0)

    def sq_dists(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances ``||x_r||^2 + ||x_c||^2 - 2 <x_r, x_c>``, clipped at 0."""
        sq = np.diagonal(self.K)
        d2 = sq[rows, None] + sq[None, cols] - 2.0 * self.K[np.ix_(rows, cols)]
        return np.maximum(d2, 0.0, out=d2)


def _as_matrix(block: np.ndarray | pa.Table) -> np.ndarray:
    if isinstance(block, pa.Table):
        from stages.features import feature_matrix

        value_type = block.schema.field("feature").type.value_type
        wide = pa.types.is_float64(value_type)
        return feature_matrix(block, np.float64 if wide else np.float32)
    block = np.asarray(block)
    if block.ndim != 2:
        raise ValueError(f"row blocks must be 2-D, got shape {block.shape}")
    return block


def _cross(a: np.ndarray, b: np.ndarray, col_block: int) -> np.ndarray:
    """``a @ b.T`` accumulated in float64 over column blocks (bounded temporaries)."""
    out = np.zeros((a.shape[0], b.shape[0]))
    for c in range(0, a.shape[1], col_block):
        ac = a[:, c : c + col_block].astype(np.float64)
        bc = ac if b is a else b[:, c : c + col_block].astype(np.float64)
        out += ac @ bc.T
    return out


def gram_blockwise(source: Source, *, col_block: int = 8192, memory_bytes: int = 1 << 30) -> Gram:
    """The float64 Gram matrix of all rows of ``source``, streamed in bounded memory.

    ``source`` is a 2-D array (a memmap works) or a callable returning a fresh iterable of
    row blocks (arrays, or shard tables with a ``feature`` column, e.g.
    ``lambda: iter_shard_tables(folder, columns=["feature"])``). Rows of up to
    ``memory_bytes`` are held as a panel while every later block streams past it, and
    products are accumulated over ``col_block`` columns in float64, so memory is
    O(n^2 + memory_bytes + one block) whatever the dimension; a source larger than the
    budget is read ``ceil(size / memory_bytes)`` times.
    """
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D feature matrix, got shape {array.shape}")
        step = max(1, min(len(array), (64 << 20) // max(1, array.shape[1] * array.itemsize)))

        def source() -> Iterable[np.ndarray]:
            return (array[i : i + step] for i in range(0, len(array), step))

    pieces: list[tuple[int, int, int, int, np.ndarray]] = []
    sums: list[np.ndarray] = []
    sq_sums: list[np.ndarray] = []
    shift = 0.0
    n_features = -1
    dtype: np.dtype = np.dtype(np.float32)
    panel_start, n_rows, first_pass = 0, None, True
    while n_rows is None or panel_start < n_rows:
        panel: list[tuple[int, np.ndarray]] = []
        panel_bytes, panel_full, offset = 0, False, 0
        for raw in source():
            block = _as_matrix(raw)
            r = len(block)
            if first_pass:
                if n_features < 0:
                    n_features, dtype = block.shape[1], block.dtype
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore", RuntimeWarning)
                        finite = block[np.isfinite(block)]
                        shift = float(np.mean(finite, dtype=np.float64)) if finite.size else 0.0
                elif block.shape[1] != n_features:
                    raise ValueError(
                        f"row blocks differ in width: {block.shape[1]} != {n_features}"
                    )
                s = np.zeros(r)
                q = np.zeros(r)
                for c in range(0, n_features, col_block):
                    y = block[:, c : c + col_block].astype(np.float64) - shift
                    s += y.sum(axis=1)
                    q += np.einsum("ij,ij->i", y, y)
                sums.append(s)
                sq_sums.append(q)
            if offset < panel_start or r == 0:
                offset += r
                continue
            if not panel_full and (not panel or panel_bytes + block.nbytes <= memory_bytes):
                panel.append((offset, block))
                panel_bytes += block.nbytes
                for p_off, p_block in panel:
                    other = block if p_block is block else p_block
                    pieces.append((p_off, offset, len(other), r, _cross(other, block, col_block)))
            else:
                panel_full = True
                for p_off, p_block in panel:
                    pieces.append(
                        (p_off, offset, len(p_block), r, _cross(p_block, block, col_block))
                    )
            offset += r
        if first_pass:
            n_rows, first_pass = offset, False
        panel_start += sum(len(b) for _, b in panel)
        if not panel:
            break
    K = np.zeros((n_rows or 0, n_rows or 0))
    for r0, c0, nr, nc, piece in pieces:
        K[r0 : r0 + nr, c0 : c0 + nc] = piece
        K[c0 : c0 + nc, r0 : r0 + nr] = piece.T
    return Gram(
        K=K,
        n_features=max(n_features, 0),
        shift=shift,
        shifted_sums=np.concatenate(sums) if sums else np.zeros(0),
        shifted_sq_sums=np.concatenate(sq_sums) if sq_sums else np.zeros(0),
        dtype=dtype,
    )


# ------------------------------------------------------------------------------- OneClassSVM
def _powi(base: np.ndarray, times: int) -> np.ndarray:
    """libsvm's ``powi`` (square-and-multiply), so poly kernels match it bit for bit."""
    tmp, ret = base.copy(), np.ones_like(base)
    t = times
    while t > 0:
        if t % 2 == 1:
            ret *= tmp
        tmp = tmp * tmp
        t //= 2
    return ret


def ocsvm_kernel(
    dot: np.ndarray,
    sq_rows: np.ndarray,
    sq_cols: np.ndarray,
    kernel: str,
    gamma: float,
    degree: int = 3,
    coef0: float = 0.0,
) -> np.ndarray:
    """A libsvm kernel matrix from linear dot products, with libsvm's operation order."""
    with np.errstate(over="ignore", invalid="ignore"):
        if kernel == "linear":
            return dot.copy()
        if kernel == "rbf":
            return np.exp(-gamma * (sq_rows[:, None] + sq_cols[None, :] - 2.0 * dot))
        if kernel == "poly":
            return _powi(gamma * dot + coef0, int(degree))
        if kernel == "sigmoid":
            return np.tanh(gamma * dot + coef0)
    raise ValueError(f"unsupported OneClassSVM kernel {kernel!r}")


def ocsvm_gamma(gamma: Any, n_features: int, x_var: float) -> float:
    """scikit-learn's gamma: 'scale' = 1 / (n_features * X.var()), 'auto' = 1 / n_features."""
    if gamma == "scale":
        return 1.0 / (n_features * x_var) if x_var != 0 else 1.0
    if gamma == "auto":
        return 1.0 / n_features
    return float(gamma)


def ocsvm_scores(
    K_train: np.ndarray,
    K_test: np.ndarray,
    sq_train: np.ndarray,
    sq_test: np.ndarray,
    n_features: int,
    x_var: float,
    params: dict[str, Any],
) -> np.ndarray:
    """``-score_samples`` of OneClassSVM(**params) from linear Gram blocks (precomputed)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import OneClassSVM

    params = dict(params)
    kernel = params.pop("kernel", "rbf")
    gamma = ocsvm_gamma(params.pop("gamma", "scale"), n_features, x_var)
    degree = params.pop("degree", 3)
    coef0 = params.pop("coef0", 0.0)
    params.setdefault("max_iter", OCSVM_MAX_ITER)
    k_train = ocsvm_kernel(K_train, sq_train, sq_train, kernel, gamma, degree, coef0)
    k_test = ocsvm_kernel(K_test, sq_test, sq_train, kernel, gamma, degree, coef0)
    if kernel == "rbf":  # libsvm predicts rbf from direct differences: never above 1
        np.minimum(k_test, 1.0, out=k_test)
    if not (np.isfinite(k_train).all() and np.isfinite(k_test).all()):
        return np.full(len(K_test), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = OneClassSVM(kernel="precomputed", **params).fit(k_train)
    return -model.score_samples(k_test)


# ------------------------------------------------------------------------ LocalOutlierFactor
def lof_scores(
    dist_train: np.ndarray,
    dist_test: np.ndarray,
    n_neighbors: Sequence[int],
    dtype: np.dtype | type = np.float64,
) -> dict[int, np.ndarray]:
    """``-score_samples`` of LocalOutlierFactor(novelty=True, n_neighbors=k) for every k.

    ``dist_train`` is the (n, n) train distance matrix, ``dist_test`` (m, n). One sorted kNN
    table with the largest k serves every k; neighbours of a train point exclude itself, k
    is capped to n - 1 as scikit-learn does, and with float32 features the distances are
    rounded to float32 as scikit-learn does before its arithmetic.
    """
    n = dist_train.shape[0]
    caps = {k: max(1, min(int(k), n - 1)) for k in n_neighbors}
    kmax = max(caps.values())
    d_tr = np.array(dist_train, dtype=np.float64)
    np.fill_diagonal(d_tr, np.inf)

    def knn(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = np.argpartition(d, kmax - 1, axis=1)[:, :kmax] if kmax < d.shape[1] else None
        idx = part if part is not None else np.broadcast_to(np.arange(d.shape[1]), d.shape)
        vals = np.take_along_axis(d, idx, axis=1)
        order = np.lexsort((idx, vals), axis=1)  # by distance, ties by lower index
        return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)

    dist_fit, ind_fit = knn(d_tr)
    dist_q, ind_q = knn(np.asarray(dist_test, dtype=np.float64))
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        dist_fit, dist_q = dist_fit.astype(np.float32), dist_q.astype(np.float32)
    out: dict[int, np.ndarray] = {}
    for k_req, k in caps.items():
        dfit, ifit = dist_fit[:, :k], ind_fit[:, :k]
        dq, iq = dist_q[:, :k], ind_q[:, :k]
        dist_k = dfit[:, k - 1]
        lrd = 1.0 / (np.mean(np.maximum(dfit, dist_k[ifit]), axis=1) + 1e-10)
        lrd_q = 1.0 / (np.mean(np.maximum(dq, dist_k[iq]), axis=1) + 1e-10)
        out[k_req] = np.mean(lrd[iq] / lrd_q[:, np.newaxis], axis=1)
    return out


# ----------------------------------------------------------------------------- KernelDensity
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


# ------------------------------------------------------------------------- EllipticEnvelope
def pca_from_gram(
    K: np.ndarray, train: np.ndarray, test: np.ndarray, n_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test projections on the top principal components of the train rows.

    Equal, up to the sign of each component, to ``PCA(n_components, svd_solver='full')``'s
    ``fit_transform(X[train])`` and ``transform(X[test])``: the centred train Gram
    ``Kc = U S^2 U^T`` gives train projections ``U S`` and test projections
    ``Kc_test U / S``. Components with zero variance project to 0.
    """
    n = len(np.arange(K.shape[0])[train])
    k = min(n_components, n)
    K_tt = K[np.ix_(train, train)]
    col_mean = K_tt.mean(axis=0)
    total = col_mean.mean()
    Kc = K_tt - col_mean[:, None] - col_mean[None, :] + total
    w, U = linalg.eigh(Kc, subset_by_index=[n - k, n - 1], driver="evr")
    w, U = w[::-1], U[:, ::-1]
    S = np.sqrt(np.maximum(w, 0.0))
    tol = S[0] * 1e-12 if len(S) else 0.0
    inv = np.divide(1.0, S, out=np.zeros_like(S), where=tol < S)
    K_et = K[np.ix_(test, train)]
    Kc_test = K_et - K_et.mean(axis=1)[:, None] - col_mean[None, :] + total
    return U * S, (Kc_test @ U) * inv


def _elliptic_one(z_train: np.ndarray, z_test: np.ndarray, seed: int, params: dict) -> np.ndarray:
    """One EllipticEnvelope fit on PCA projections, single-threaded.

    FastMCD factorises hundreds of small (<= 256 x 256) matrices; one BLAS thread is ~3x
    faster than two fighting over them (54 s vs 17 s for 1,254 x 256 on 2 cores), and the
    fits of a unit run in parallel processes instead (``n_jobs``).
    """
    from threadpoolctl import threadpool_limits

    from stages.mcd import FastEllipticEnvelope

    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = FastEllipticEnvelope(random_state=seed, **params).fit(z_train)
    return -model.score_samples(z_test)


# --------------------------------------------------------------------------- IsolationForest
def _average_path_length(n_samples_leaf: np.ndarray) -> np.ndarray:
    """Average path length of an unsuccessful BST search (scikit-learn's formula)."""
    n = np.asarray(n_samples_leaf, dtype=np.float64)
    out = np.zeros(n.shape)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _rows(X: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``X[rows]``, as a view when ``rows`` is a contiguous ascending range (no copy)."""
    if rows is None:
        return X
    rows = np.asarray(rows)
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return X[rows[0] : rows[0] + len(rows)]
    return X[rows]


def iforest_scores(
    X_train: np.ndarray,
    X_test: np.ndarray,
    n_estimators: Sequence[int],
    seed: int,
    *,
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
    chunk_bytes: int = 1 << 28,
    **params: Any,
) -> dict[int, np.ndarray]:
    """``-score_samples`` of IsolationForest(n_estimators=n, random_state=seed) for every n.

    One forest of max(n) trees is fitted; scikit-learn draws all per-tree seeds up front
    from ``RandomState(seed)``, so the forest of n trees is exactly its first n trees.
    Path lengths are accumulated tree by tree in scikit-learn's order, so each prefix's
    score is bit-identical to the smaller forest's. With ``train_rows``/``test_rows`` the
    arrays are the unit's feature rows and are indexed here: the training rows are a view
    when contiguous, and the test rows are scored ``chunk_bytes`` at a time, so memory stays
    near one copy of the features even for the study's 802,816-dim layers.
    """
    from sklearn.ensemble import IsolationForest

    sizes = sorted({int(n) for n in n_estimators})
    forest = IsolationForest(n_estimators=sizes[-1], random_state=seed, **params)
    forest.fit(np.asarray(_rows(X_train, train_rows), dtype=np.float32))
    denom_unit = _average_path_length(np.array([forest.max_samples_]))
    n_features = X_test.shape[1]
    all_features = getattr(forest, "_max_features", n_features) == n_features
    trees = [
        (
            tree,
            features,
            tree.tree_.compute_node_depths()
            + _average_path_length(tree.tree_.n_node_samples)
            - 1.0,
        )
        for tree, features in zip(forest.estimators_, forest.estimators_features_, strict=True)
    ]
    rows = np.arange(len(X_test)) if test_rows is None else np.asarray(test_rows)
    m = len(rows)
    wanted = set(sizes)
    prefix = {n: np.zeros(m) for n in sizes}
    step = max(1, int(chunk_bytes // max(4 * n_features, 1)))
    for start in range(0, m, step):
        X = np.ascontiguousarray(_rows(X_test, rows[start : start + step]), dtype=np.float32)
        depths = np.zeros(len(X), order="f")
        for i, (tree, features, leaf_value) in enumerate(trees, start=1):
            leaves = tree.apply(X if all_features else X[:, features], check_input=False)
            depths += leaf_value[leaves]
            if i in wanted:
                prefix[i][start : start + len(X)] = depths
    out = {}
    for n in sizes:
        denominator = n * denom_unit
        out[n] = 2 ** (-np.divide(prefix[n], denominator, out=np.ones(m), where=denominator != 0))
    return {int(n): out[int(n)] for n in n_estimators}


# ------------------------------------------------------------------------------ the evaluator
def _failed(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def shared_scores(
    gram: Gram,
    train: np.ndarray,
    test: np.ndarray,
    configs: Iterable[Config],
    *,
    seed: int = 0,
    raw: np.ndarray | None = None,
    feature_dtype: np.dtype | type | None = None,
    n_jobs: int = 1,
    errors: dict[Config, str] | None = None,
) -> dict[Config, np.ndarray]:
    """Test scores (higher = more anomalous) of every config, from one Gram over all rows.

    ``train``/``test`` index ``gram``'s rows (call once per augmentation choice with its
    train rows). ``raw`` (rows x features, a memmap works) is needed only for
    IsolationForest. ``feature_dtype`` (default: the Gram's source dtype) reproduces
    scikit-learn's float32 rounding of LOF distances and of PCA projections. EllipticEnvelope
    fits run in ``n_jobs`` processes. A config whose estimator raises gets NaN scores and
    its message in ``errors``.
    """
    train = np.arange(gram.n_rows)[train]
    test = np.arange(gram.n_rows)[test]
    dtype = np.dtype(feature_dtype or gram.dtype)
    d = gram.n_features
    by_family: dict[str, list[Config]] = {}
    for config in configs:
        by_family.setdefault(config.family, []).append(config)
    out: dict[Config, np.ndarray] = {}
    errors = {} if errors is None else errors
    m = len(test)

    def fail(config: Config, exc: BaseException) -> None:
        errors[config] = f"{type(exc).__name__}: {exc}"
        out[config] = _failed(m)

    sq = np.diagonal(gram.K)
    if "OneClassSVM" in by_family:
        K_tr, K_te = gram.K[np.ix_(train, train)], gram.K[np.ix_(test, train)]
        x_var = gram.var(train)
        for config in by_family["OneClassSVM"]:
            try:
                out[config] = ocsvm_scores(
                    K_tr, K_te, sq[train], sq[test], d, x_var, dict(config.params)
                )
            except Exception as exc:
                fail(config, exc)

    needs_dist = {"LocalOutlierFactor", "KernelDensity"} & by_family.keys()
    if needs_dist:
        d2_test = gram.sq_dists(test, train)
    if "LocalOutlierFactor" in by_family:
        configs_lof = by_family["LocalOutlierFactor"]
        unsupported = [c for c in configs_lof if set(dict(c.params)) - {"n_neighbors", "novelty"}]
        for config in unsupported:
            fail(config, ValueError("only n_neighbors (euclidean, novelty) is shared"))
        rest = [c for c in configs_lof if c not in unsupported]
        if rest:
            ks = [int(c.get("n_neighbors", 20)) for c in rest]
            lof = lof_scores(
                np.sqrt(gram.sq_dists(train, train)), np.sqrt(d2_test), ks, dtype=dtype
            )
            for config, k in zip(rest, ks, strict=True):
                out[config] = lof[k]
    if "KernelDensity" in by_family:
        kde = KdeDistances(d2_test)
        for config in by_family["KernelDensity"]:
            try:
                h = kde_bandwidth(config.get("bandwidth", 1.0), len(train), d)
                kernel = config.get("kernel", "gaussian")
                out[config] = -kde.log_density(h, kernel, d)
            except Exception as exc:
                fail(config, exc)

    if "EllipticEnvelope" in by_family:
        from joblib import Parallel, delayed

        configs_ee = by_family["EllipticEnvelope"]

        def n_comp(c: Config) -> int:
            k = int(c.get("n_components", c.get("pca_components", 32)))
            return min(k, len(train), d)

        def extra(c: Config) -> dict[str, Any]:
            return {k: v for k, v in c.params if k not in ("n_components", "pca_components")}

        if np.isfinite(gram.K[np.ix_(train, train)]).all():
            z_train, z_test = pca_from_gram(gram.K, train, test, max(n_comp(c) for c in configs_ee))
            z_train, z_test = z_train.astype(dtype), z_test.astype(dtype)
            # identical (k, params) after capping share one fit: an exact saving
            jobs = {(n_comp(c), tuple(sorted(extra(c).items()))) for c in configs_ee}
            keys = sorted(jobs, key=lambda j: -j[0])  # biggest first: better load balance

            def run(key: tuple) -> np.ndarray | BaseException:
                k, params = key
                try:
                    return _elliptic_one(z_train[:, :k], z_test[:, :k], seed, dict(params))
                except Exception as exc:
                    return exc

            results = Parallel(n_jobs=n_jobs)(delayed(run)(key) for key in keys)
            done = dict(zip(keys, results, strict=True))
            for config in configs_ee:
                result = done[(n_comp(config), tuple(sorted(extra(config).items())))]
                if isinstance(result, BaseException):
                    fail(config, result)
                else:
                    out[config] = result
        else:
            for config in configs_ee:
                fail(config, ValueError("non-finite features"))

    if "IsolationForest" in by_family:
        configs_if = by_family["IsolationForest"]
        if raw is None:
            raise ValueError("IsolationForest needs the raw feature rows (raw=...)")
        groups: dict[tuple, list[Config]] = {}
        for config in configs_if:
            key = tuple((k, v) for k, v in config.params if k != "n_estimators")
            groups.setdefault(key, []).append(config)
        for key, group in groups.items():
            sizes = [int(c.get("n_estimators", 100)) for c in group]
            try:
                scores = iforest_scores(
                    raw, raw, sizes, seed, train_rows=train, test_rows=test, **dict(key)
                )
                for config, n in zip(group, sizes, strict=True):
                    out[config] = scores[n]
            except Exception as exc:
                for config in group:
                    fail(config, exc)
    return out
