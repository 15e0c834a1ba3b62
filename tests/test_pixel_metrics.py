"""Pixel metrics (stages.pixel_metrics) against scikit-learn, a brute-force AUPRO written
out plainly here, and anomalib's ``AUPRO`` (skipped when anomalib is not importable)."""

from __future__ import annotations

import time
from collections import deque
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from stages.pixel_metrics import (
    aupro,
    oracle_pixel_f1,
    pixel_auroc,
    pixel_curve,
    pixel_f1,
    pixel_metrics,
    region_labels,
)


def blobs(rng: np.random.Generator, n: int, h: int, w: int, n_good: int) -> np.ndarray:
    """Masks with 1-4 rectangles and a diagonal chain (8- but not 4-connected) per
    defective image; the first ``n_good`` images have none."""
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n_good, n):
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            dy, dx = rng.integers(1, max(2, h // 3)), rng.integers(1, max(2, w // 3))
            masks[i, y : y + dy, x : x + dx] = rng.choice([1, 255])
        if rng.random() < 0.5:
            k = min(h, w) // 3
            y, x = rng.integers(0, h - k), rng.integers(0, w - k)
            masks[i, y + np.arange(k), x + np.arange(k)] = 1
    return masks


def scored(rng: np.random.Generator, masks: np.ndarray, decimals: int | None = None) -> np.ndarray:
    """Noisy maps that are higher on the defects; rounded to create ties when asked."""
    maps = rng.normal(size=masks.shape) + 1.5 * (masks != 0) * rng.random(masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(np.float32)


# --- a plain brute force: own flood fill, one pass over the pixels per threshold ---------


def flood_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of one boolean image, by breadth-first search."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            region, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                region.append((cy, cx))
                for ny in (cy - 1, cy, cy + 1):
                    for nx in (cx - 1, cx, cx + 1):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(region)
    return regions


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    regions = [
        [maps[i][tuple(np.array(r).T)] for r in flood_regions(masks[i] != 0)]
        for i in range(len(maps))
    ]
    regions = [r for per_image in regions for r in per_image]
    normal = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = float(np.mean(normal >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


# --- tests --------------------------------------------------------------------------------


def test_region_labels_are_8_connected_and_per_image() -> None:
    masks = np.zeros((2, 5, 5), dtype=np.uint8)
    masks[0, [0, 1, 2], [0, 1, 2]] = 1  # a diagonal: one region
    masks[0, 4, 4] = 1
    masks[1, 0, 0] = 1  # touches image 0's corner pixel in the stack, but not in-plane
    labels, n = region_labels(masks)
    assert n == 3
    assert len(set(labels[0, [0, 1, 2], [0, 1, 2]].tolist())) == 1
    assert labels[1, 0, 0] not in (0, labels[0, 0, 0])


@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_auroc_equals_sklearn(decimals: int | None) -> None:
    rng = np.random.default_rng(0)
    masks = blobs(rng, 12, 20, 17, n_good=4)
    maps = scored(rng, masks, decimals)
    want = roc_auc_score((masks != 0).ravel(), maps.ravel().astype(np.float64))
    assert pixel_auroc(maps, masks) == pytest.approx(want, abs=1e-12)


def test_pixel_auroc_undefined_with_one_class() -> None:
    assert pixel_auroc(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))) is None
    assert aupro(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))) is None


@pytest.mark.parametrize(
    ("seed", "decimals", "limit"), [(1, None, 0.3), (2, 1, 0.3), (3, 2, 1.0), (4, 0, 0.05)]
)
def test_aupro_equals_brute_force(seed: int, decimals: int | None, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = blobs(rng, 5, 13, 11, n_good=2)
    maps = scored(rng, masks, decimals)
    assert aupro(maps, masks, limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-12)


def test_aupro_extremes() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[1, 2:4, 2:4] = masks[2, 5:, 5:] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(-masks.astype(np.float32), masks) == pytest.approx(0.0)
    # a constant map: one threshold flags everything, the curve is the diagonal to (1, 1)
    assert aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15)


def test_f1_at_threshold_and_oracle() -> None:
    rng = np.random.default_rng(5)
    masks = blobs(rng, 6, 15, 15, n_good=2)
    maps = scored(rng, masks, decimals=1)
    y = (masks != 0).ravel()
    got = pixel_f1(maps, masks, 0.5)
    assert got["f1"] == pytest.approx(f1_score(y, maps.ravel() > 0.5))
    # the oracle is the best over every candidate threshold (the lowest among ties)
    candidates = [-np.inf, *np.unique(maps).tolist()]
    f1s = [f1_score(y, maps.ravel() > t) for t in candidates]
    best = oracle_pixel_f1(maps, masks)
    assert best["f1"] == pytest.approx(max(f1s))
    assert best["threshold"] == candidates[int(np.argmax(f1s))]
    again = pixel_f1(maps, masks, best["threshold"])
    assert {k: again[k] for k in ("tp", "fp", "tn", "fn")} == {
        k: best[k] for k in ("tp", "fp", "tn", "fn")
    }


def test_pixel_metrics_bundle_and_bad_input() -> None:
    rng = np.random.default_rng(6)
    masks = blobs(rng, 4, 10, 12, n_good=1)
    maps = scored(rng, masks)
    out = pixel_metrics(maps, masks, threshold=0.8)
    assert out["pixel_auroc"] == pixel_auroc(maps, masks)
    assert out["aupro"] == aupro(maps, masks)
    assert out["pixel_f1"] == pixel_f1(maps, masks, 0.8)["f1"]
    assert pixel_metrics(maps, masks)["pixel_f1"] is None
    with pytest.raises(ValueError, match="mask shape"):
        pixel_auroc(maps, masks[:, :-1])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        aupro(bad, masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, 0.0)


def test_full_size_stack_is_fast() -> None:
    """100 maps of 224 x 224 (5M pixels): one sort serves every metric."""
    rng = np.random.default_rng(7)
    masks = np.zeros((100, 224, 224), dtype=np.uint8)
    masks[50:, 40:90, 60:140] = 1
    masks[60:, 150:200, 10:30] = 1
    maps = (rng.normal(size=masks.shape) + 3.0 * masks).astype(np.float32)
    t0 = time.perf_counter()
    curve = pixel_curve(maps, masks)
    assert curve.n_regions == 50 + 40
    assert 0.5 < aupro(curve) < 1.0 and 0.5 < pixel_auroc(curve) < 1.0
    assert time.perf_counter() - t0 < 20  # about 1-2 s; generous for a loaded machine


# --- anomalib's AUPRO, the reference implementation named by the issue --------------------


def anomalib_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("anomalib.metrics")
    metric = metrics.AUPRO(fpr_limit=limit, fields=("anomaly_map", "gt_mask"))
    batch = SimpleNamespace(
        anomaly_map=torch.from_numpy(maps.astype(np.float32)),
        gt_mask=torch.from_numpy(masks != 0),
    )
    metric.update(batch)
    return float(metric.compute())


@pytest.mark.parametrize(
    ("seed", "decimals", "limit"), [(10, None, 0.3), (11, 1, 0.3), (12, 2, 0.1)]
)
def test_aupro_equals_anomalib(seed: int, decimals: int | None, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = blobs(rng, 10, 48, 40, n_good=4)
    maps = scored(rng, masks, decimals)
    want = anomalib_aupro(maps, masks, limit)
    assert aupro(maps, masks, limit) == pytest.approx(want, abs=1e-6)
