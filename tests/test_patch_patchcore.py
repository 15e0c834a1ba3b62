"""PatchCore math (stages.patch.patchcore) against plain written-out references."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors

from stages.patch.patchcore import (
    coreset_size,
    greedy_coreset_order,
    image_scores,
    nearest_bank,
    patch_scores,
    random_projection,
)


def clustered(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    centres = rng.normal(scale=10.0, size=(8, d))
    return (centres[rng.integers(0, 8, n)] + rng.normal(size=(n, d))).astype(np.float32)


def covering_radius(x: np.ndarray, chosen: np.ndarray) -> float:
    return float(cdist(x, x[chosen]).min(axis=1).max())


def test_greedy_order_is_farthest_point_order_on_the_projection() -> None:
    rng = np.random.default_rng(0)
    x = clustered(rng, 300, 200)  # 200 > 128 columns: projected
    order = greedy_coreset_order(x, seed=3)
    assert sorted(order.tolist()) == list(range(len(x)))  # every point once
    z = random_projection(x, 3).astype(np.float64)
    assert order[0] == np.random.default_rng(4).integers(len(x))  # seeded start
    for i in range(1, 60):  # each pick is the farthest from the picks before it
        d = cdist(z, z[order[:i]]).min(axis=1)
        assert d[order[i]] == pytest.approx(d.max(), rel=1e-4)


def test_prefix_property_and_radius_non_increasing() -> None:
    rng = np.random.default_rng(1)
    x = clustered(rng, 400, 16)
    full = greedy_coreset_order(x, seed=0)
    radii = []
    for ratio in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        m = coreset_size(len(x), ratio)
        part = greedy_coreset_order(x, m, seed=0)
        np.testing.assert_array_equal(part, full[:m])
        radii.append(covering_radius(x, part))
    assert all(a >= b for a, b in pairwise(radii))
    assert radii[-1] == 0.0
    # greedy covers far better than a random subset of the same size (2-approximation)
    m = coreset_size(len(x), 0.05)
    random_radius = covering_radius(x, rng.choice(len(x), m, replace=False))
    assert covering_radius(x, full[:m]) < random_radius


def test_coreset_seeded_and_duplicates() -> None:
    rng = np.random.default_rng(2)
    x = clustered(rng, 100, 8)
    np.testing.assert_array_equal(greedy_coreset_order(x, 20, 5), greedy_coreset_order(x, 20, 5))
    dup = np.repeat(x[:3], 10, axis=0)  # 30 rows, 3 distinct
    order = greedy_coreset_order(dup)
    assert len(set(order.tolist())) == 30
    assert len({tuple(r) for r in dup[order[:3]]}) == 3


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="coreset ratio"):
        coreset_size(10, ratio)


@pytest.mark.parametrize(("k", "memory_bytes"), [(1, 1 << 27), (4, 1 << 27), (3, 4096)])
def test_nearest_bank_equals_sklearn(k: int, memory_bytes: int) -> None:
    rng = np.random.default_rng(3)
    bank = clustered(rng, 250, 24) + 100.0  # far from 0: centring keeps precision
    queries = clustered(rng, 90, 24) + 100.0
    queries[:5] = bank[[0, 7, 9, 100, 249]]  # exact hits: distance 0
    dist, idx = nearest_bank(queries, bank, k, memory_bytes)
    nn = NearestNeighbors(n_neighbors=k).fit(bank.astype(np.float64))
    want_d, want_i = nn.kneighbors(queries.astype(np.float64))
    np.testing.assert_allclose(dist, want_d, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(idx, want_i)
    assert np.all(dist[:5, 0] < 1e-5)


def test_patch_scores_grid_and_max() -> None:
    rng = np.random.default_rng(4)
    bank = clustered(rng, 120, 10)
    patches = clustered(rng, 6 * 49, 10).reshape(6, 49, 10)
    scores, nearest = patch_scores(patches, bank, memory_bytes=2048)
    d = cdist(patches.reshape(-1, 10).astype(np.float64), bank.astype(np.float64))
    np.testing.assert_allclose(scores.ravel(), d.min(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(nearest.ravel(), d.argmin(axis=1))
    np.testing.assert_array_equal(image_scores(scores), scores.max(axis=1))


@pytest.mark.parametrize("n_neighbors", [2, 9, 500])
def test_reweighting_matches_the_formula(n_neighbors: int) -> None:
    rng = np.random.default_rng(5)
    bank = clustered(rng, 200, 12)
    patches = clustered(rng, 5 * 30, 12).reshape(5, 30, 12)
    scores, nearest = patch_scores(patches, bank)
    got = image_scores(scores, nearest, patches, bank, n_neighbors)
    b = bank.astype(np.float64)
    for i in range(len(patches)):
        j = int(np.argmax(scores[i]))
        s_star = scores[i, j]
        m_star = int(np.argmin(((b - patches[i, j]) ** 2).sum(axis=1)))
        support = np.argsort(((b - b[m_star]) ** 2).sum(axis=1), kind="stable")
        support = support[: min(n_neighbors, len(b))]
        assert support[0] == m_star
        d = np.sqrt(((b[support] - patches[i, j].astype(np.float64)) ** 2).sum(axis=1))
        weight = 1.0 - np.exp(d[0]) / np.sum(np.exp(d))
        assert got[i] == pytest.approx(weight * s_star, rel=1e-9)


def test_greedy_order_is_the_same_on_any_number_of_threads() -> None:
    """Rows split over threads give bitwise the same order, ties (duplicates, equal
    farthest distances in two blocks) included: the lower index wins."""
    rng = np.random.default_rng(7)
    x = np.repeat(rng.normal(size=(60, 16)).astype(np.float32), 200, axis=0)  # 12,000 rows
    x = x[rng.permutation(len(x))]
    one = greedy_coreset_order(x, 400, seed=3, threads=1)
    assert len(set(one.tolist())) == 400
    for threads in (2, 3):
        assert np.array_equal(greedy_coreset_order(x, 400, seed=3, threads=threads), one)
