"""Pixel-level metrics of anomaly maps against ground-truth masks, as pure functions.

Inputs: ``maps`` and ``masks`` of one shape ``(n_images, H, W)`` (one image may be given as
``(H, W)``); every pixel of every image is evaluated, a mask pixel is a defect pixel iff it
is non-zero, so a good image (all-zero mask) contributes negatives only. Maps must be
finite (a map with NaN/inf is a failed map, not a score).

* ``pixel_auroc``: ROC AUC over all pixels; ties count half (as ``roc_auc_score``).
* ``aupro``: MVTec AD's per-region overlap: defect regions are the 8-connected components
  of each image's mask; at a threshold ``t`` (pixels with score ``>= t`` flagged) the PRO
  is the mean over all regions of the region's flagged fraction and the FPR is the flagged
  fraction of all defect-free pixels. The curve over every distinct score, from (0, 0), is
  integrated with the trapezoid rule up to exactly ``fpr_limit`` (linear interpolation at
  the limit) and divided by the limit. Same definition as the MVTec AD evaluation code and
  anomalib 2.7's ``AUPRO`` (tested against it).
* ``pixel_f1``: counts and F1 at a given threshold (flagged iff ``score > threshold``,
  the rule of :mod:`stages.metrics`); ``oracle_pixel_f1``: the threshold with the best F1
  on the pixels themselves (ties: the lowest), an upper bound that uses the masks.

Ties: maps are float32 (float16 when stored); the image scores' tie rule
(:func:`stages.metrics.tie_safe_scores`, relative 1e-10) is far below float32 resolution,
so it would change nothing but exact ties, which are ties here anyway (one curve point
per distinct score). It is therefore not applied.

Memory: one stable sort of the flattened maps (int64 indices) and a few per-pixel
cumulative arrays; nothing per threshold x region. 100 float32 maps of 224 x 224 (5M
pixels): peak about 400 MB (tracemalloc) and 2-2.5 s for every metric on one loaded core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from stages.metrics import confusion_metrics

AUPRO_FPR_LIMIT = 0.3


def _as_stack(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, H, W)`` maps (a float dtype kept as is: no float64 copy of float32 maps) and
    boolean defect masks; one-line ``ValueError`` on a shape mismatch or non-finite map."""
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"mask shape {masks.shape} differs from map shape {maps.shape}")
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3:
        raise ValueError(f"maps must be (n_images, H, W) or (H, W), got shape {maps.shape}")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    n_bad = int(maps.size - np.count_nonzero(np.isfinite(maps)))
    if n_bad:
        raise ValueError(f"maps contain {n_bad} non-finite pixels")
    return maps, masks != 0


def region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected defect regions of every image, numbered 1..n over the whole stack
    (0: defect-free); regions never span two images."""
    masks = np.asarray(masks) != 0
    if masks.ndim == 2:
        masks = masks[None]
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 3x3 within an image, nothing across images
    labels, n = ndimage.label(masks, structure=structure)
    return labels, int(n)


@dataclass(frozen=True)
class PixelCurve:
    """Cumulative counts at every distinct score, from the highest down.

    Entry ``k`` flags the pixels with score ``>= scores[k]``: ``tp``/``fp`` defect and
    defect-free pixels flagged, ``pro`` the mean per-region overlap (NaN-free; 0 without
    regions). ``n_pos``/``n_neg``: defect and defect-free pixels, ``n_regions``: regions.
    """

    scores: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    pro: np.ndarray
    n_pos: int
    n_neg: int
    n_regions: int


def pixel_curve(maps: np.ndarray, masks: np.ndarray) -> PixelCurve:
    """The one sort every pixel metric reads (see :class:`PixelCurve`)."""
    maps, defect = _as_stack(maps, masks)
    labels, n_regions = region_labels(defect)
    flat = maps.ravel()
    order = np.argsort(flat, kind="stable")[::-1]  # descending
    s = flat[order]
    lab = labels.ravel()[order]
    del order
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # each tie group's last pixel
    tp = np.cumsum(lab > 0, dtype=np.int64)[last]
    fp = (last + 1) - tp
    if n_regions:
        sizes = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
        weight = np.zeros(n_regions + 1)
        weight[1:] = 1.0 / (sizes[1:] * n_regions)  # a region's pixels sum to 1/n_regions
        pro = np.cumsum(weight[lab])[last]
        np.minimum(pro, 1.0, out=pro)  # rounding must not lift it above 1
    else:
        pro = np.zeros(last.size)
    n_pos = int(tp[-1]) if tp.size else 0
    return PixelCurve(
        scores=s[last],
        tp=tp,
        fp=fp,
        pro=pro,
        n_pos=n_pos,
        n_neg=int(s.size - n_pos),
        n_regions=n_regions,
    )


def _curve(maps: np.ndarray | PixelCurve, masks: np.ndarray | None) -> PixelCurve:
    if isinstance(maps, PixelCurve):
        return maps
    if masks is None:
        raise ValueError("masks are required with maps")
    return pixel_curve(maps, masks)


def pixel_auroc(maps: np.ndarray | PixelCurve, masks: np.ndarray | None = None) -> float | None:
    """ROC AUC of all pixels (ties count half), exact in integer arithmetic; ``None``
    when the pixels are all defect-free or all defective. Takes maps and masks or a
    :class:`PixelCurve`."""
    c = _curve(maps, masks)
    if c.n_pos == 0 or c.n_neg == 0:
        return None
    tp = np.r_[0, c.tp]
    fp = np.r_[0, c.fp]
    # trapezoids in units of 1/(2 P N): sum of dfp * (tp_k + tp_{k-1}), exact in int64
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * c.n_pos * c.n_neg)


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` (``x`` non-decreasing, from its first point) up to
    exactly ``x_max``: the curve is interpolated linearly at ``x_max`` when ``x_max``
    falls between two points; it ends at the last point when ``x`` stops short."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    i = int(np.searchsorted(x, x_max, side="right")) - 1  # last point with x <= x_max
    if i < 0:
        return 0.0
    xs, ys = x[: i + 1], y[: i + 1]
    if xs[-1] < x_max and i + 1 < x.size:
        w = (x_max - x[i]) / (x[i + 1] - x[i])
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y[i] + w * (y[i + 1] - y[i])]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(
    maps: np.ndarray | PixelCurve,
    masks: np.ndarray | None = None,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (module docstring);
    ``None`` without a defect region or without a defect-free pixel."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    c = _curve(maps, masks)
    if c.n_regions == 0 or c.n_neg == 0:
        return None
    fpr = np.r_[0.0, c.fp / c.n_neg]
    pro = np.r_[0.0, c.pro]
    return trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def pixel_f1(maps: np.ndarray, masks: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Confusion counts, precision, recall, F1 and accuracy of ``map > threshold`` over
    all pixels (defects positive), as :func:`stages.metrics.confusion_metrics`."""
    maps, defect = _as_stack(maps, masks)
    return {"threshold": float(threshold), **confusion_metrics(defect, maps > threshold)}


def oracle_pixel_f1(
    maps: np.ndarray | PixelCurve, masks: np.ndarray | None = None
) -> dict[str, float | int]:
    """The best F1 over every threshold and the threshold reaching it (ties: the lowest).

    Candidates as :func:`stages.metrics.oracle_threshold`: each distinct score (flagging
    the pixels above it) and ``-inf`` (every pixel flagged). Uses the masks: an upper bound.
    """
    c = _curve(maps, masks)
    # candidate j flags tie groups 0..j-1: the threshold is group j's score (-inf past the end)
    tp = np.r_[0, c.tp]
    fp = np.r_[0, c.fp]
    thresholds = np.r_[c.scores.astype(np.float64), -np.inf]
    fn = c.n_pos - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.size), where=denominator > 0)
    best = np.flatnonzero(f1 == f1.max())[-1]  # the lowest threshold among the best
    n = c.n_pos + c.n_neg
    t_p, f_p = int(tp[best]), int(fp[best])
    f_n = c.n_pos - t_p
    return {
        "threshold": float(thresholds[best]),
        "tp": t_p,
        "fp": f_p,
        "tn": c.n_neg - f_p,
        "fn": f_n,
        "precision": t_p / (t_p + f_p) if t_p + f_p else 0.0,
        "recall": t_p / c.n_pos if c.n_pos else 0.0,
        "f1": float(f1[best]),
        "accuracy": (t_p + c.n_neg - f_p) / n if n else 0.0,
    }


def pixel_metrics(
    maps: np.ndarray,
    masks: np.ndarray,
    threshold: float | None = None,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> dict[str, float | int | None]:
    """``pixel_auroc``, ``aupro``, ``pixel_f1_oracle`` (+ its threshold) and, given a
    threshold (the honest one, from training maps), ``pixel_f1`` and its precision and
    recall, from one sort."""
    c = pixel_curve(maps, masks)
    oracle = oracle_pixel_f1(c)
    out: dict[str, float | int | None] = {
        "pixel_auroc": pixel_auroc(c),
        "aupro": aupro(c, fpr_limit=fpr_limit),
        "pixel_f1_oracle": oracle["f1"],
        "pixel_threshold_oracle": oracle["threshold"],
        "pixel_f1": None,
        "pixel_precision": None,
        "pixel_recall": None,
        "pixel_threshold": threshold,
    }
    if threshold is not None:
        honest = pixel_f1(maps, masks, threshold)
        out.update(
            pixel_f1=honest["f1"],
            pixel_precision=honest["precision"],
            pixel_recall=honest["recall"],
        )
    return out
