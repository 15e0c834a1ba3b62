"""PatchCore's math: coreset order, nearest-neighbour patch scores, image scores.

Coreset (Roth et al. 2022, sec. 3.2; patchcore-inspection's ApproximateGreedyCoresetSampler,
anomalib's KCenterGreedy): the memory bank is thinned by greedy k-center selection. The
features are first mapped by a seeded Gaussian random projection (Johnson-Lindenstrauss;
``PROJECTION_DIM`` columns), which is the "approximate" part: distances in the selection
are those of the projected features. Starting from a seeded random point, each step picks
the point farthest from the points picked so far. The result is the pick ORDER: the
coreset of any ratio is a prefix of it, so one greedy run serves a whole ratio grid (the
prefixes are nested, so the covering radius never grows with the ratio).

Scores: a patch's score is the Euclidean distance to its nearest bank patch (the coresets
of a ratio grid, nested prefixes of one order, are searched in one pass:
:func:`prefix_nearest`); an image's score is its largest patch score, or with
``n_neighbors > 1`` the paper's reweighting (eq. 7, as anomalib implements it):
``s = (1 - softmax(d)[0]) * s*``, where ``s*`` is the image's largest patch score, ``m*``
that patch's nearest bank patch, and ``d`` the distances from the patch to the
``n_neighbors`` bank patches nearest ``m*`` (``m*`` first).

Precision: features are float32; distances are float64 from centred coordinates
(``|q - s|^2 + |b - s|^2 - 2 (q - s).(b - s)``, ``s`` the bank mean), so a distance near 0
is not lost to cancellation. Memory is bounded by ``memory_bytes`` per block of queries
times block of bank rows; the bank is converted to float64 one block at a time. The coreset selection itself runs in float32 on the projection
(selection only: it needs the order, not accurate distances).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

PROJECTION_DIM = 128
DEFAULT_MEMORY_BYTES = 1 << 27  # 128 MiB of float64 distance block per step


def coreset_size(n: int, ratio: float) -> int:
    """Points kept from ``n`` at ``ratio`` (``int(n * ratio)``, at least 1, as anomalib);
    a ratio outside (0, 1] is a one-line ``ValueError``."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, int(n * ratio)))


def random_projection(features: np.ndarray, seed: int, dim: int = PROJECTION_DIM) -> np.ndarray:
    """``features @ G`` with ``G`` seeded Gaussian ``N(0, 1/dim)`` (float32); the features
    themselves when they have at most ``dim`` columns (nothing to reduce)."""
    x = np.asarray(features, dtype=np.float32)
    if x.shape[1] <= dim:
        return x
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((x.shape[1], dim)) / np.sqrt(dim)).astype(np.float32)
    return x @ g


def _blas_threads() -> int:
    """The BLAS thread limit in force: inside an evaluate work unit, the engine's
    ``threads_per_worker`` (``threadpool_limits``); elsewhere the library's default."""
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, min(counts)) if counts else 1


def greedy_coreset_order(
    features: np.ndarray,
    n_select: int | None = None,
    seed: int = 0,
    dim: int = PROJECTION_DIM,
    threads: int | None = None,
) -> np.ndarray:
    """The first ``n_select`` (default: all) indices of the greedy k-center order.

    The projection and the start point come from ``seed`` (:func:`random_projection`,
    then ``default_rng(seed + 1)``'s draw of the start). Ties in the farthest distance go
    to the lowest index; a point is never picked twice, even among duplicates. Each pick
    is one memory-bound pass over the projected bank (a float32 matrix-vector product,
    numpy's, on one BLAS thread: 2 BLAS threads were 3x slower, torch 20x). ``threads``
    (default: the BLAS limit in force, :func:`_blas_threads`) split the rows instead, each
    thread its own block's products, minima and farthest point: the same order bitwise
    (each row's distance is the same product), measured 1.5x faster with 2 on 163,856 x 128
    (7.5 s against 11.4 s for 1,638 picks on this 2-core machine).
    """
    x = np.asarray(features)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (n, d) matrix, got shape {x.shape}")
    n = len(x)
    m = n if n_select is None else min(int(n_select), n)
    if m < 1:
        raise ValueError(f"n_select must be at least 1, got {n_select}")
    z = np.ascontiguousarray(random_projection(x, seed, dim))
    sq = np.einsum("ij,ij->i", z, z)
    min_d = np.full(n, np.inf, dtype=np.float32)
    d2 = np.empty(n, dtype=np.float32)
    order = np.empty(m, dtype=np.int64)
    idx = int(np.random.default_rng(seed + 1).integers(n))
    k = max(1, min(threads or _blas_threads(), n // 4096 or 1))  # small banks: one thread
    cuts = np.linspace(0, n, k + 1).astype(np.int64)
    blocks = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))

    def farthest(block: tuple[int, int], centre: int) -> tuple[float, int]:
        lo, hi = block
        d, md = d2[lo:hi], min_d[lo:hi]
        np.matmul(z[lo:hi], z[centre], out=d)  # |a - c|^2 = |a|^2 - 2 a.c + |c|^2
        d *= -2.0
        d += sq[lo:hi]
        d += sq[centre]
        np.minimum(md, d, out=md)
        if lo <= centre < hi:
            md[centre - lo] = -np.inf  # picked: never the farthest again
        j = int(np.argmax(md))  # first maximum: ties to the lowest index
        return float(md[j]), lo + j

    with threadpool_limits(limits=1), ThreadPoolExecutor(k) as pool:
        for i in range(m):
            order[i] = idx
            if i == m - 1:
                break
            found = list(pool.map(farthest, blocks, [idx] * k)) if k > 1 else [
                farthest(blocks[0], idx)]  # fmt: skip
            # blocks in row order, max keeps the first of equals: ties to the lower index
            idx = max(found, key=lambda candidate: candidate[0])[1]
    return order


def nearest_bank(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int = 1,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest bank rows of every query: float64 distances and indices, both
    ``(n_queries, k)``, sorted by distance (ties: the lower index). See the module
    docstring for the precision; ``memory_bytes`` bounds each float64 distance block."""
    b = np.asarray(bank)
    return prefix_nearest(queries, b, [len(b) if b.ndim else 0], k, memory_bytes)[0]


def prefix_nearest(
    queries: np.ndarray,
    bank: np.ndarray,
    sizes: Sequence[int],
    k: int = 1,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`nearest_bank` against several nested banks at once, the prefixes
    ``bank[:m]`` for each ``m`` in ``sizes``: per size, the ``min(k, m)`` nearest rows'
    float64 distances and indices ``(n_queries, min(k, m))``, sorted (ties: the lower index).

    The coresets of a ratio grid are prefixes of one greedy order, so one pass over the
    largest serves them all: each block of squared distances is computed once and every
    prefix reduces its own columns of it (a pass over memory, against the block's
    ``d``-long dot products). Centred on the largest prefix's mean (module docstring).
    """
    q = np.asarray(queries)
    b = np.asarray(bank)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1] or len(b) == 0:
        raise ValueError(f"queries {q.shape} and a non-empty bank {b.shape} must be (n, d)")
    sizes = [int(m) for m in sizes]
    if not sizes or min(sizes) < 1 or max(sizes) > len(b):
        raise ValueError(f"prefix sizes must be in [1, {len(b)}], got {sizes}")
    if int(k) < 1:
        raise ValueError("k must be at least 1")
    top = max(sizes)
    b = b[:top]
    ks = [min(int(k), m) for m in sizes]
    shift = b.mean(axis=0, dtype=np.float64)
    cells = max(memory_bytes // 8, 1)
    bank_block = max(min(top, cells // max(min(len(q), 1024), 1)), max(ks))
    query_block = max(cells // bank_block, 1)
    out = [(np.empty((len(q), kk)), np.empty((len(q), kk), dtype=np.int64)) for kk in ks]
    for r in range(0, len(q), query_block):
        qc = q[r : r + query_block].astype(np.float64) - shift
        q_sq = np.einsum("ij,ij->i", qc, qc)
        none = (np.full((len(qc), 0), np.inf), np.empty((len(qc), 0), dtype=np.int64))
        best = [none] * len(sizes)
        for c in range(0, top, bank_block):
            # centred in float64 block by block: no float64 copy of the whole bank
            bc = b[c : c + bank_block].astype(np.float64) - shift
            b_sq = np.einsum("ij,ij->i", bc, bc)
            d2 = q_sq[:, None] + b_sq[None, :] - 2.0 * (qc @ bc.T)
            np.maximum(d2, 0.0, out=d2)
            for s, (m, kk) in enumerate(zip(sizes, ks, strict=True)):
                if m > c:  # this prefix's columns of the block
                    best[s] = _merge(best[s], d2[:, : m - c], c, kk)
        for (dist, index), (best_d, best_i) in zip(out, best, strict=True):
            dist[r : r + len(qc)] = np.sqrt(best_d)
            index[r : r + len(qc)] = best_i
    return out


def _merge(
    best: tuple[np.ndarray, np.ndarray], d2: np.ndarray, offset: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest of the running best and a block of squared distances whose
    first column is bank row ``offset``, by (distance, index)."""
    best_d, best_i = best
    if k == 1:  # one pass: the first minimum is the lowest index; a tie keeps the earlier
        j = np.argmin(d2, axis=1)[:, None]
        v = np.take_along_axis(d2, j, axis=1)
        if best_d.shape[1] == 0:
            return v, j + offset
        better = v < best_d
        return np.where(better, v, best_d), np.where(better, j + offset, best_i)
    kk = min(k, d2.shape[1])
    if kk < d2.shape[1]:
        part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(d2.shape[1]), d2.shape)
    best_d = np.concatenate([best_d, np.take_along_axis(d2, part, axis=1)], axis=1)
    best_i = np.concatenate([best_i, part + offset], axis=1)
    keep = np.lexsort((best_i, best_d), axis=1)[:, :k]  # the k best so far
    return np.take_along_axis(best_d, keep, axis=1), np.take_along_axis(best_i, keep, axis=1)


def patch_scores(
    patches: np.ndarray, bank: np.ndarray, memory_bytes: int = DEFAULT_MEMORY_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-bank distance and bank index of every patch: ``patches`` is
    ``(n_images, n_patches, d)``, both results ``(n_images, n_patches)``."""
    p = np.asarray(patches)
    if p.ndim != 3:
        raise ValueError(f"patches must be (n_images, n_patches, d), got shape {p.shape}")
    dist, index = nearest_bank(p.reshape(-1, p.shape[2]), bank, 1, memory_bytes)
    return dist[:, 0].reshape(p.shape[:2]), index[:, 0].reshape(p.shape[:2])


def image_scores(
    scores: np.ndarray,
    nearest: np.ndarray | None = None,
    patches: np.ndarray | None = None,
    bank: np.ndarray | None = None,
    n_neighbors: int = 1,
) -> np.ndarray:
    """Image scores from ``(n_images, n_patches)`` patch scores: the largest one, or with
    ``n_neighbors > 1`` the paper's reweighting (module docstring), which needs each
    patch's ``nearest`` bank index, the ``patches`` and the ``bank``."""
    scores = np.asarray(scores, dtype=np.float64)
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}")
    if n_neighbors == 1:
        return scores.max(axis=1)
    if nearest is None or patches is None or bank is None:
        raise ValueError("reweighting needs the nearest indices, the patches and the bank")
    rows = np.arange(len(scores))
    worst = np.argmax(scores, axis=1)  # m_test,*: the first largest patch score
    s_star = scores[rows, worst]
    m_star = np.asarray(nearest)[rows, worst]
    bank = np.asarray(bank)
    _, support = nearest_bank(bank[m_star], bank, min(n_neighbors, len(bank)))
    patch = np.asarray(patches)[rows, worst].astype(np.float64)
    d = np.sqrt(((patch[:, None, :] - bank[support].astype(np.float64)) ** 2).sum(axis=2))
    e = np.exp(d - d.max(axis=1, keepdims=True))
    weight = 1.0 - e[:, 0] / e.sum(axis=1)
    return weight * s_star
