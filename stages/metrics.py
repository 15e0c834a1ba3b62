"""Threshold metrics and honest (leave-one-category-out) config selection, as pure functions.

Thresholds: an image is predicted anomalous iff its score is strictly greater than the
threshold. Non-finite scores follow :func:`ranking_scores`: ``+inf`` is the most
anomalous, ``-inf`` and ``NaN`` (no information) the least, so they are never predicted
anomalous. Two thresholds per experiment:

* honest: the ``q`` quantile (``inverted_cdf``: an actual training score) of the training
  images' in-sample scores, NaN counted as ``-inf``; at most a fraction ``1 - q`` of the
  training images lie above it. No test label is used.
* oracle: the threshold that maximises F1 on the test set itself (ties: the lowest such
  threshold). It uses the test labels, so it is an upper bound, labelled as such.

Ties: scores equal within their numerical error are ties (:func:`tie_safe_scores`) for
AUROC, average precision and both thresholds, so the stored metrics do not depend on
rounding noise (summation order, CPU, BLAS build) where scores tie in exact arithmetic.

Selection: the study reports per category the best AUROC over thousands of configs, chosen
by that very test AUROC. ``loco_selection`` chooses a config for each category from the
other categories only (best mean rank), so its AUROC on the held-out category is honest.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

# honest: out-of-fold training scores (evaluate.threshold_folds); insample: the fitted
# model's scores of its own training rows (the old honest, kept for comparison)
THRESHOLD_KINDS = ("honest", "oracle", "insample")
THRESHOLD_FIELDS = ("threshold", "f1", "precision", "recall", "accuracy", "tp", "fp", "tn", "fn")

# What identifies a config across categories: every config field but the category and the
# feature set's content hash.
CONFIG_FIELDS = (
    "augmented",
    "backbone",
    "init",
    "layer",
    "representation",
    "detector",
    "hyperparams",
    "seed",
)


# The tie rule (measured: ``benchmarks/tie_tolerance.py``, README "Ties"): two scores are
# one tie when they differ by at most TIE_RTOL relative to the larger magnitude, or when
# both are within TIE_FLOOR x the score set's scale (its largest finite magnitude) of 0.
TIE_RTOL = 1e-10
TIE_FLOOR = 1e-6


def ranking_scores(scores: np.ndarray) -> np.ndarray:
    """Scores with non-finite values placed explicitly, for AUROC/AP.

    ``+inf`` (e.g. zero density under a compact KDE kernel) ranks above every finite score,
    ``-inf`` below; ``NaN`` (no information) ranks with the least anomalous. Ties among
    them stay ties. The study mapped all of them to 0; the counts are stored per experiment.
    The margin grows with the magnitude, so ``+inf`` never ties a finite score of 1e20.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    out = scores.copy()
    out[np.isposinf(scores)] = hi + 1.0 + abs(hi)
    out[np.isneginf(scores) | np.isnan(scores)] = lo - 1.0 - abs(lo)
    return out


def tie_safe_scores(
    scores: np.ndarray, rtol: float = TIE_RTOL, floor: float = TIE_FLOOR
) -> np.ndarray:
    """Scores with every tie group replaced by its largest member; non-finite ones kept.

    Two float computations of the same scores (the shared path and scikit-learn, or one
    code on two CPUs) agree only to their rounding error, so scores equal in exact
    arithmetic (every test image with the same neighbourhood when k >= n_train, duplicated
    images, a kernel covering all or no training points) would otherwise be ordered by
    rounding noise. Sorted finite scores whose consecutive gap is at most
    ``rtol * max(|a|, |b|)``, or which both lie within ``floor * scale`` of 0 (``scale``: the
    largest finite ``|score|``), form one group: single linkage, so a chain of small gaps is
    one group even where it spans more than ``rtol``. That is deliberate: scores tied in
    exact arithmetic and each off by up to ``e`` lie within ``2e`` of each other in any
    order, and only a rule that merges chains depends on the gaps alone (not on where a
    group starts). Measured (README "Ties"): float64 reorderings differ by <= 2e-12 and
    rounding-split ties by <= 1e-11, distinct scores come no closer than 1.3e-10, so
    chains of distinct scores do not form. The band around 0 is for scores that are 0 in
    exact arithmetic: a distance of 0 from a Gram, ``sqrt(|a|^2 + |b|^2 - 2 a.b)``, comes
    out anywhere up to ``sqrt(eps) * |a|`` (measured 1.3e-7 of the scale), far above
    ``rtol`` of itself; scores that small are 0 to the score set's precision.

    Each group's largest member represents it, so for a threshold ``t`` taken from these
    scores ``raw > t`` and ``tie_safe > t`` agree: the stored threshold stays an actual
    score and comparing raw scores with it gives the stored counts. Ranks (AUROC, AP) only
    see the groups. ``NaN`` and ``±inf`` are left as they are (:func:`ranking_scores` places
    them, after this).
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = scores.copy()
    finite = np.isfinite(scores)
    values = scores[finite]
    if values.size < 2:
        return out
    order = np.argsort(values, kind="stable")
    s = values[order]
    scale = max(abs(s[0]), abs(s[-1]))
    larger = np.maximum(np.abs(s[1:]), np.abs(s[:-1]))
    new_group = (np.diff(s) > rtol * larger) & (larger > floor * scale)
    group = np.concatenate([[0], np.cumsum(new_group)])
    last = np.flatnonzero(np.r_[new_group, True])  # each group's largest member
    merged = np.empty_like(values)
    merged[order] = s[last][group]
    out[finite] = merged
    return out


def ranking_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """``auroc`` and ``average_precision`` of tie-safe scores (ties count half), non-finite
    scores placed by :func:`ranking_scores`; ``None`` when the test set has one class."""
    y = np.asarray(y, dtype=bool)
    if not 0 < y.sum() < y.size:
        return {"auroc": None, "average_precision": None}
    ranked = ranking_scores(tie_safe_scores(scores))
    return {
        "auroc": float(roc_auc_score(y, ranked)),
        "average_precision": float(average_precision_score(y, ranked)),
    }


def predict(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``score > threshold`` with NaN predicted normal (the least anomalous)."""
    scores = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(scores), False, scores > threshold)


def confusion_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float | int]:
    """Counts and rates with anomalies as the positive class (0 where undefined)."""
    y = np.asarray(y, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    tp = int((predicted & y).sum())
    fp = int((predicted & ~y).sum())
    fn = int((~predicted & y).sum())
    tn = int((~predicted & ~y).sum())
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "accuracy": (tp + tn) / y.size if y.size else 0.0,
    }


def honest_threshold(train_scores: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the training scores (an actual score; NaN counts as ``-inf``)."""
    scores = np.asarray(train_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no training scores")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    return float(np.quantile(scores, quantile, method="inverted_cdf"))


def oracle_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the best test F1 (ties: the lowest); ``-inf`` = all finite flagged.

    Candidates are ``-inf`` and every distinct finite score; a cumulative count over the
    sorted scores keeps it O(n log n).
    """
    y = np.asarray(y, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    flaggable = ~np.isnan(scores) & ~np.isneginf(scores)
    values, labels = scores[flaggable], y[flaggable]
    order = np.argsort(values, kind="stable")
    values, labels = values[order], labels[order]
    # tp_from[i]: anomalies among values[i:], i.e. the true positives when those are flagged.
    tp_from = np.concatenate([np.cumsum(labels[::-1])[::-1], [0]])
    candidates = np.concatenate([[-np.inf], np.unique(values[np.isfinite(values)])])
    first_flagged = np.searchsorted(values, candidates, side="right")
    tp = tp_from[first_flagged]
    fp = (values.size - first_flagged) - tp
    fn = int(y.sum()) - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(len(candidates)), where=denominator > 0)
    return float(candidates[int(np.argmax(f1))])


def threshold_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    train_scores: np.ndarray | None,
    quantile: float,
    threshold: float | None = None,
) -> dict[str, float | int | None]:
    """``<field>_honest`` and ``<field>_oracle`` for every field of ``THRESHOLD_FIELDS``.

    The honest ones are ``None`` without training scores, unless ``threshold`` gives the
    honest threshold itself (a classifier's own, fixed without test labels). Test and training scores are
    made tie-safe together (:func:`tie_safe_scores`), so a test score tied with the honest
    threshold is not above it, and each threshold is the largest score of its tie group.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if train_scores is not None and len(train_scores):
        both = tie_safe_scores(np.concatenate([scores, np.asarray(train_scores, np.float64)]))
        scores, train_scores = both[: len(scores)], both[len(scores) :]
    else:
        scores = tie_safe_scores(scores)
    out: dict[str, float | int | None] = {}
    thresholds = {"oracle": oracle_threshold(y, scores)}
    if threshold is not None:
        thresholds["honest"] = float(threshold)
    elif train_scores is not None and len(train_scores):
        thresholds["honest"] = honest_threshold(train_scores, quantile)
    for kind in THRESHOLD_KINDS:
        t = thresholds.get(kind)
        values: Mapping[str, float | int | None] = (
            {"threshold": t, **confusion_metrics(y, predict(scores, t))}
            if t is not None
            else dict.fromkeys(THRESHOLD_FIELDS)
        )
        out.update({f"{name}_{kind}": values[name] for name in THRESHOLD_FIELDS})
    return out


# --- honest selection --------------------------------------------------------------------


def config_id(row: Mapping[str, Any]) -> str:
    """A config's identity across categories (``CONFIG_FIELDS`` as canonical JSON)."""
    return json.dumps([row[f] for f in CONFIG_FIELDS], default=str)


@dataclass(frozen=True)
class LocoChoice:
    """The config chosen for ``category`` from the other categories, and its AUROC there.

    ``config`` is ``None`` when no config is done in every other category (or there is no
    other category); ``auroc`` is ``None`` when the chosen config is not done here.
    """

    category: str
    config: str | None
    mean_rank: float | None
    auroc: float | None
    key: str | None
    candidates: int
    # The configs tied with the chosen one on the mean rank (itself included) and their
    # AUROCs on ``category`` (those done there): how lucky the tie-break was.
    tied: int = 0
    tied_aurocs: tuple[float, ...] = ()

    def spread(self) -> tuple[float, float, float] | None:
        """(min, median, max) AUROC here over the tied configs, or None."""
        if not self.tied_aurocs:
            return None
        a = np.asarray(self.tied_aurocs)
        return float(a.min()), float(np.median(a)), float(a.max())


def category_ranks(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``category -> config_id -> rank`` by AUROC within the category (1 = best; ties share
    their average rank). Only done experiments with an AUROC count."""
    by_category: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["status"] == "done" and row["auroc"] is not None:
            by_category[row["category"]][config_id(row)] = float(row["auroc"])
    ranks = {}
    for category, aurocs in by_category.items():
        ids = list(aurocs)
        r = rankdata([-aurocs[i] for i in ids], method="average")
        ranks[category] = dict(zip(ids, (float(x) for x in r), strict=True))
    return ranks


def _mean_over(done: Mapping[tuple[str, str], Mapping[str, Any]], categories: Sequence[str],
               cid: str, field: str) -> float:  # fmt: skip
    """Mean of a config's ``field`` over ``categories`` (``-inf`` when it has none there)."""
    values = [done[(c, cid)].get(field) for c in categories if (c, cid) in done]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else -np.inf


def loco_selection(
    rows: Sequence[Mapping[str, Any]], categories: Sequence[str] | None = None
) -> dict[str, LocoChoice]:
    """Leave-one-category-out choice for every category.

    For category c: rank the configs by AUROC in every other category; the candidates are
    the configs done (with an AUROC) in *all* other categories, so every mean is over the
    same categories; the chosen one has the best mean rank. Ties on it (common with few
    categories: every config at AUROC 1.000 on the one other category) are broken by the
    higher mean AUROC over the other categories, then the higher mean average precision
    there, then the higher mean honest F1 there, then the first config id in sort order:
    no test label of c is used, and the choice is deterministic. The AUROCs on c of all
    tied configs are kept (``tied_aurocs``), so a report can say how lucky the choice
    was. Only configs that were run on c (any
    status: which experiments exist uses no test label) are candidates, so a category
    without augmentation is never handed an augmented config. Its AUROC on c is reported,
    ``None`` when it is not done there. Needs at least two categories.
    """
    ranks = category_ranks(rows)
    done = {
        (r["category"], config_id(r)): r
        for r in rows
        if r["status"] == "done" and r["auroc"] is not None
    }
    categories = list(categories) if categories is not None else sorted(ranks)
    choices = {}
    for category in categories:
        others = [c for c in ranks if c != category]
        if not others:
            choices[category] = LocoChoice(category, None, None, None, None, 0)
            continue
        run_here = {config_id(r) for r in rows if r["category"] == category}
        candidates = set.intersection(run_here, *(set(ranks[c]) for c in others))
        if not candidates:
            choices[category] = LocoChoice(category, None, None, None, None, 0)
            continue
        mean_rank = {cid: float(np.mean([ranks[c][cid] for c in others])) for cid in candidates}
        top = min(mean_rank.values())
        tied = sorted(cid for cid in candidates if mean_rank[cid] <= top + 1e-9)

        best = min(tied, key=lambda cid: (-_mean_over(done, others, cid, "auroc"),
                                          -_mean_over(done, others, cid, "average_precision"),
                                          -_mean_over(done, others, cid, "f1_honest"), cid))  # fmt: skip
        row = done.get((category, best))
        here = tuple(float(done[(category, cid)]["auroc"]) for cid in tied
                     if (category, cid) in done)  # fmt: skip
        choices[category] = LocoChoice(
            category,
            best,
            mean_rank[best],
            None if row is None else float(row["auroc"]),
            None if row is None else row["key"],
            len(candidates),
            len(tied),
            here,
        )
    return choices


def describe_config(config: str) -> str:
    """A config id as a readable one-liner."""
    values = dict(zip(CONFIG_FIELDS, json.loads(config), strict=True))
    hyper = json.loads(values["hyperparams"]) if values["hyperparams"] else {}
    args = ",".join(f"{k}={v}" for k, v in hyper.items())
    aug = "aug" if values["augmented"] else "no-aug"
    return (
        f"{values['backbone']}-{values['init']} {values['layer']} {values['representation']} "
        f"{aug} {values['detector']}({args}) seed {values['seed']}"
    )
