"""A work unit's rows and the quantities its detector families share, each computed once.

Within one work unit (one feature set, both augmentation choices) the study fits 71
scikit-learn estimators on the raw features. Almost all of them are functions of a few
quantities over the unit's rows, and :class:`UnitData` hands those to the families, each
computed the first time a family asks and kept for the others:

- the raw feature rows (train first: both training sets are contiguous, so a family can fit
  on a view);
- the float64 Gram matrix ``K = X X^T`` over all rows (one streamed pass over the features);
- per training set (augmented or not): the squared query-to-train distances, the sorted kNN
  table up to the largest k any family reserved, and the PCA projections on the top
  principal components (from the eigendecomposition of the centred train Gram) up to the
  most components any family reserved.

The non-augmented training set is a subset of the augmented one, so one Gram serves both.
Queries are the test rows followed by the training rows: one call scores the test images
and, in-sample, the training images (the honest threshold). No family name appears here:
families declare what they need through :class:`Needs` and take what they use.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import linalg

Source = np.ndarray | Callable[[], Iterable[np.ndarray | pa.Table]]
ALL = sys.maxsize  # reserve every principal component


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


# ---------------------------------------------------------------------------------------- PCA
@dataclass(frozen=True)
class CentredGram:
    """A training set's Gram and the queries' dot products with its rows, both after
    subtracting the training mean, and each query's ``||x - mean||^2``."""

    train: np.ndarray  # (n_train, n_train)
    queries: np.ndarray  # (n_queries, n_train)
    queries_sq: np.ndarray  # (n_queries,)


def centred_gram(K: np.ndarray, train: np.ndarray, queries: np.ndarray) -> CentredGram:
    """Centre a sub-Gram on the training rows' mean, from dot products only."""
    K_tt = K[np.ix_(train, train)]
    col_mean = K_tt.mean(axis=0)
    total = col_mean.mean()
    K_qt = K[np.ix_(queries, train)]
    q_mean = K_qt.mean(axis=1)
    return CentredGram(
        K_tt - col_mean[:, None] - col_mean[None, :] + total,
        K_qt - q_mean[:, None] - col_mean[None, :] + total,
        np.diagonal(K)[queries] - 2.0 * q_mean + total,
    )


def pca_from_gram(
    K: np.ndarray, train: np.ndarray, test: np.ndarray, n_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test projections on the top principal components of the train rows.

    Equal, up to the sign of each component, to ``PCA(n_components, svd_solver='full')``'s
    ``fit_transform(X[train])`` and ``transform(X[test])``: the centred train Gram
    ``Kc = U S^2 U^T`` gives train projections ``U S`` and test projections
    ``Kc_test U / S``. Components with zero variance project to 0.
    """
    return pca_of(centred_gram(K, train, test), n_components)


def pca_of(c: CentredGram, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and query projections (``pca_from_gram``) from a centred Gram."""
    n = len(c.train)
    k = min(n_components, n)
    w, U = linalg.eigh(c.train, subset_by_index=[n - k, n - 1], driver="evr")
    w, U = w[::-1], U[:, ::-1]
    S = np.sqrt(np.maximum(w, 0.0))
    tol = S[0] * 1e-12 if len(S) else 0.0
    inv = np.divide(1.0, S, out=np.zeros_like(S), where=tol < S)
    return U * S, (c.queries @ U) * inv


@dataclass(frozen=True)
class Projection:
    """PCA of one training set: ``z_train`` (n_train, k) and ``z_queries`` (n_queries, k) on
    the top k components (strongest first; signs arbitrary), and each query's squared
    distance to the training mean, ``||x - mean||^2``, so that a family can get what lies
    outside the k components: ``centred_sq - (z ** 2).sum(1)``."""

    z_train: np.ndarray
    z_queries: np.ndarray
    centred_sq: np.ndarray


@dataclass(frozen=True)
class KnnTable:
    """Sorted nearest training rows (by distance, ties by lower index), float64 distances.

    ``fit_*`` (n_train, min(k, n_train - 1)): each training row's neighbours, itself
    excluded (what a fitted LOF stores); ``query_*`` (n_queries, min(k, n_train)): every
    query's, where a training row queried in-sample is its own neighbour at distance 0.
    Indices are positions in the training set.
    """

    fit_dist: np.ndarray
    fit_idx: np.ndarray
    query_dist: np.ndarray
    query_idx: np.ndarray


def _sorted_neighbours(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(d, axis=1, kind="stable")[:, :k]  # stable: ties by lower index
    return np.take_along_axis(d, order, axis=1), order


def image_groups(image_ids: Iterable[str]) -> np.ndarray:
    """The original image of each row: an augmented copy ``<id>@<transform>`` belongs to
    ``<id>``, so it shares its original's fold."""
    return np.array([str(i).split("@", 1)[0] for i in image_ids])


def fold_assignment(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray | None:
    """Fold index per row for a seeded k-fold over groups (a group's rows share a fold);
    ``min(n_folds, groups)`` folds of sizes within one group of each other; ``None`` when
    fewer than two groups. The same groups and seed give the same folds on every path."""
    labels, group_of = np.unique(np.asarray(groups), return_inverse=True)
    k = min(int(n_folds), len(labels))
    if k < 2:
        return None
    fold_of_group = np.empty(len(labels), dtype=np.int64)
    fold_of_group[np.random.default_rng(seed).permutation(len(labels))] = np.arange(len(labels)) % k
    return fold_of_group[group_of]


# ------------------------------------------------------------------------------ the unit data
@dataclass
class Needs:
    """What a unit's families will ask for, declared before anything is computed."""

    raw: bool = False  # the raw feature rows in memory (else the Gram streams from shards)
    knn: int = 0  # depth of the kNN table (0: none)
    pca: int = 0  # principal components (ALL: every one)
    coreset: float = 0.0  # largest coreset ratio of a patch bank (0: none)

    def reserve(
        self, *, raw: bool = False, knn: int = 0, pca: int = 0, coreset: float = 0.0
    ) -> None:
        self.raw = self.raw or raw
        self.knn = max(self.knn, int(knn))
        self.pca = max(self.pca, int(pca))
        self.coreset = max(self.coreset, float(coreset))


class UnitData:
    """One work unit's rows and its shared quantities, computed lazily and kept.

    ``test`` and ``train[augmented]`` are integer row indices. ``grid`` ``(h, w, c)``: a
    patch feature set's layout (each row is ``h x w`` positions of ``c`` channels), else
    ``None``. ``raw`` is the (rows,
    features) matrix, or ``None`` when no family needs it: then ``blocks`` (a callable
    returning a fresh iterable of row blocks, e.g. the shards) feeds the Gram. ``dtype`` is
    the features' dtype as scikit-learn would see them (float32 for the stage's shards),
    for families that reproduce its rounding. ``seconds`` holds each quantity's own compute
    time (nested quantities excluded); :meth:`take_used` says which ones a caller touched,
    so the stage can split their cost over the experiments that used them.
    """

    def __init__(
        self,
        test: np.ndarray,
        train: Mapping[bool, np.ndarray],
        needs: Needs | None = None,
        *,
        raw: np.ndarray | None = None,
        blocks: Callable[[], Iterable[np.ndarray | pa.Table]] | None = None,
        dtype: np.dtype | type | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> None:
        if raw is None and blocks is None:
            raise ValueError("UnitData needs the raw rows or a block source for the Gram")
        self.test = np.asarray(test, dtype=np.int64)
        # training rows per split key: ``augmented`` (bool), or a fold key (``add_folds``)
        self.train: dict[Hashable, np.ndarray] = {
            bool(a): np.asarray(r, dtype=np.int64) for a, r in train.items()
        }
        self._heldout: dict[Hashable, np.ndarray] = {}  # fold key -> its held-out rows
        self._folds: dict[tuple, list[tuple]] = {}  # (augmented, n_folds, seed) -> fold keys
        self.needs = needs or Needs()
        self._raw = raw
        self._blocks = blocks
        self._dtype = None if dtype is None else np.dtype(dtype)
        self.grid = None if grid is None else tuple(int(v) for v in grid)
        self._cache: dict[str, Any] = {}
        self._used: set[str] = set()
        self._deps: dict[str, frozenset[str]] = {}
        self._inner = 0.0
        self.seconds: dict[str, float] = {}

    # --- bookkeeping ---------------------------------------------------------------------
    def _cached(self, name: str, compute: Callable[[], Any]) -> Any:
        if name in self._cache:
            self._used |= {name, *self._deps[name]}
            return self._cache[name]
        t0, outer_seconds, outer_used = time.perf_counter(), self._inner, self._used
        self._inner, self._used = 0.0, set()
        try:
            value = compute()
        finally:
            elapsed = time.perf_counter() - t0
            self.seconds[name] = elapsed - self._inner
            self._deps[name] = frozenset(self._used)
            self._inner = outer_seconds + elapsed
            self._used = outer_used | self._used | {name}
        self._cache[name] = value
        return value

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """A family's own shared quantity (e.g. a coreset order per training set and seed),
        computed once under ``name``, timed and split like the built-in ones."""
        return self._cached(name, compute)

    def take_used(self) -> set[str]:
        """The quantities asked for since the last call, with those they were computed from
        (whether computed now or taken from the cache)."""
        used, self._used = self._used, set()
        return used

    # --- rows ----------------------------------------------------------------------------
    @property
    def raw(self) -> np.ndarray:
        if self._raw is None:
            raise RuntimeError("the raw rows were not reserved (Needs.raw) for this unit")
        return self._raw

    @property
    def dtype(self) -> np.dtype:
        if self._dtype is not None:
            return self._dtype
        return self._raw.dtype if self._raw is not None else self.gram.dtype

    @property
    def n_features(self) -> int:
        return self._raw.shape[1] if self._raw is not None else self.gram.n_features

    def patches(self, rows: np.ndarray) -> np.ndarray:
        """The raw rows of a patch feature set as ``(len(rows), h, w, c)`` (``grid``: the
        rows are stored positions x channels, C order); ``ValueError`` for other sets."""
        if self.grid is None:
            raise ValueError("not a patch feature set: this family needs representation patch")
        return self.raw[rows].reshape(len(rows), *self.grid)

    def queries(self, key: Hashable) -> np.ndarray:
        """Rows scored by one call. An augmentation choice: the test rows, then its training
        rows (in-sample); a fold: its held-out training rows only."""
        if key in self._heldout:
            return self._heldout[key]
        return np.concatenate([self.test, self.train[key]])

    def n_scored(self, key: Hashable) -> int:
        """How many leading queries are scored out of sample (the rest: in-sample)."""
        return len(self._heldout[key]) if key in self._heldout else len(self.test)

    def add_folds(
        self, augmented: bool, groups: np.ndarray, n_folds: int, seed: int
    ) -> list[tuple]:
        """Split one training set into ``n_folds`` folds, seeded; rows of one group (an
        original image and its augmented copies) stay in one fold. Returns the fold keys:
        each trains on the other folds and scores its own rows. Fewer folds when there
        are fewer groups; none with a single group. Every family of the unit asks for the
        same folds: they are split once and their keys (and cached quantities) reused."""
        asked = (bool(augmented), int(n_folds), int(seed))
        if asked in self._folds:
            return self._folds[asked]
        train = self.train[augmented]
        fold = fold_assignment(groups, n_folds, seed)
        keys: list[tuple] = []
        for i in range(0 if fold is None else int(fold.max()) + 1):
            key = ("fold", *asked, i)
            self.train[key] = train[fold != i]
            self._heldout[key] = train[fold == i]
            keys.append(key)
        self._folds[asked] = keys
        return keys

    def finite(self) -> np.ndarray:
        """Per row: all features finite (a NaN/inf feature makes the Gram's K_ii non-finite)."""

        def compute() -> np.ndarray:
            if self._raw is None or "gram" in self._cache:
                return np.isfinite(np.diagonal(self.gram.K))
            return np.isfinite(self._raw).all(axis=1)

        return self._cached("finite", compute)

    def n_nonfinite(self, augmented: Hashable) -> int:
        """How many of the call's query rows have a non-finite feature."""
        return int((~self.finite()[self.queries(augmented)]).sum())

    # --- shared quantities ---------------------------------------------------------------
    @property
    def gram(self) -> Gram:
        source: Source = self._raw if self._raw is not None else self._blocks  # type: ignore[assignment]
        return self._cached("gram", lambda: gram_blockwise(source))

    def sq_dists(self, augmented: Hashable) -> np.ndarray:
        """Squared distances (n_queries, n_train) from the Gram, clipped at 0."""
        return self._cached(
            f"sq_dists[{augmented}]",
            lambda: self.gram.sq_dists(self.queries(augmented), self.train[augmented]),
        )

    def knn(self, augmented: Hashable) -> KnnTable:
        """The sorted kNN table of one training set, ``Needs.knn`` deep (capped by its size)."""

        def compute() -> KnnTable:
            n = len(self.train[augmented])
            depth = max(1, self.needs.knn)
            dist = np.sqrt(self.sq_dists(augmented))
            if augmented in self._heldout:  # a fold's queries are not its training rows
                train = self.train[augmented]
                fit = np.sqrt(self.gram.sq_dists(train, train))
            else:
                fit = dist[len(self.test) :].copy()
            np.fill_diagonal(fit, np.inf)
            fit_dist, fit_idx = _sorted_neighbours(fit, min(depth, max(n - 1, 1)))
            query_dist, query_idx = _sorted_neighbours(dist, min(depth, n))
            return KnnTable(fit_dist, fit_idx, query_dist, query_idx)

        return self._cached(f"knn[{augmented}]", compute)

    def centred(self, augmented: Hashable) -> CentredGram:
        """The Gram of one call's training rows and queries, centred on the training mean
        (not cached: a sub-matrix copy, cheap against what families do with it)."""
        return centred_gram(self.gram.K, self.train[augmented], self.queries(augmented))

    def pca(self, augmented: Hashable) -> Projection:
        """Projections on the top ``Needs.pca`` principal components of one training set."""

        def compute() -> Projection:
            c = self.centred(augmented)
            k = min(max(1, self.needs.pca), len(c.train), self.gram.n_features)
            z_train, z_queries = pca_of(c, k)
            return Projection(z_train, z_queries, np.maximum(c.queries_sq, 0.0))

        return self._cached(f"pca[{augmented}]", compute)
