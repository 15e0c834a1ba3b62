"""The tie rule (stages.metrics.tie_safe_scores): stored metrics do not depend on rounding.

Scores equal in exact arithmetic (k >= n_train in LOF, duplicated images) come out of two
float computations a few ulps apart in either order; AUROC, average precision and the
honest and oracle threshold metrics must not move when they do.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stages.methods import FAMILIES, DetectorConfig, Needs, UnitData
from stages.metrics import (
    TIE_FLOOR,
    TIE_RTOL,
    predict,
    ranking_metrics,
    threshold_metrics,
    tie_safe_scores,
)
from tests.eval_fixtures import N_ORIG, N_TEST, gamma_rows


def stored_metrics(y: np.ndarray, scores: np.ndarray, train: np.ndarray) -> dict:
    """What the evaluate stage stores for one experiment (``_row``)."""
    return {**ranking_metrics(y, scores), **threshold_metrics(y, scores, train, 0.9)}


def nudged(scores: np.ndarray, rng: np.random.Generator, max_ulps: int = 3) -> np.ndarray:
    """Every score moved by 0 to ``max_ulps`` ulps up or down (np.nextafter), independently."""
    out = np.array(scores, dtype=np.float64)
    steps = rng.integers(-max_ulps, max_ulps + 1, size=out.shape)
    for _ in range(max_ulps):
        out = np.where(steps > 0, np.nextafter(out, np.inf), out)
        out = np.where(steps < 0, np.nextafter(out, -np.inf), out)
        steps = steps - np.sign(steps)
    return out


def assert_same_metrics(got: dict, want: dict) -> None:
    for name, value in want.items():
        if name.startswith("threshold_") and name != "threshold_quantile" and value is not None:
            # a threshold is a score (its tie group's largest): it moves with the scores,
            # by as many ulps as they were moved
            ulps = 3 * np.spacing(max(abs(value), abs(got[name])))
            assert got[name] == value or abs(got[name] - value) <= ulps, name
        else:
            assert got[name] == value, name


def one_family(rows: dict, config: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    needs = Needs()
    FAMILIES[config.family].reserve(needs, [config])
    data = UnitData(rows["test"], rows["train"], needs, raw=rows["X"])
    (outcome,) = FAMILIES[config.family].shared_outcomes(data, False, [config], 0)
    assert outcome.error is None
    return outcome.scores, outcome.train_scores


def duplicated_rows() -> dict:
    """30 training rows; 20 test rows: 10 copies of training rows (the first 5 of them
    labelled anomalous: a defect the features do not see) and 10 shifted rows."""
    rows = gamma_rows(3)
    X, test = rows["X"].copy(), rows["test"]
    X[test[:10]] = X[rows["train"][False][[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]]
    labels = np.r_[np.ones(5), np.zeros(5), np.zeros(5), np.ones(5)]
    return {**rows, "X": X, "labels": labels}


CASES = {
    # k >= n_train: clamped to 29 of the 30 training rows, so test images whose farthest
    # training row is the same share one neighbourhood and, in exact arithmetic, one score
    "lof_k_ge_n": (lambda: gamma_rows(7),
                   DetectorConfig("LocalOutlierFactor", (("n_neighbors", 64),))),
    "knn_duplicates": (duplicated_rows, DetectorConfig("KNNDistance", (("n_neighbors", 1),))),
    "lof_duplicates": (duplicated_rows,
                       DetectorConfig("LocalOutlierFactor", (("n_neighbors", 2),))),
    "kmeans_duplicates": (duplicated_rows,
                          DetectorConfig("KMeansDistance", (("n_clusters", 30),))),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_ulp_perturbations_change_no_stored_metric(case: str) -> None:
    make, config = CASES[case]
    rows = make()
    y = rows["labels"].astype(bool)
    scores, train = one_family(rows, config)
    assert len(scores) == N_TEST and len(train) == N_ORIG
    # the case has what it is about: a tie group holding both an anomaly and a good image
    groups = tie_safe_scores(scores)
    mixed = [v for v in np.unique(groups) if 0 < y[groups == v].sum() < (groups == v).sum()]
    assert mixed, case
    want = stored_metrics(y, scores, train)
    rng = np.random.default_rng(0)
    plain_aurocs = set()
    for _ in range(200):
        s, t = nudged(scores, rng), nudged(train, rng)
        assert_same_metrics(stored_metrics(y, s, t), want)
        plain_aurocs.add(roc_auc_score(y, s))
    # without the rule the ulps would decide (a distance of exactly 0 moved one ulp is a
    # denormal: the duplicates' order flips too)
    assert len(plain_aurocs) > 1, case


def test_ties_count_half_and_thresholds_agree_with_raw_scores() -> None:
    y = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    base = 0.99812194
    scores = np.array([0.5, base, np.nextafter(base, 2), np.nextafter(base, 0), 2.0, 0.1])
    # one tie group {1, 2, 3} (two anomalies, one good image): AUROC counts it half
    exact = np.array([0.5, 1.0, 1.0, 1.0, 2.0, 0.1])
    assert ranking_metrics(y, scores) == ranking_metrics(y, exact)
    assert ranking_metrics(y, scores)["auroc"] == pytest.approx(8 / 9)
    # each group is represented by its largest member, so `raw > threshold` gives the
    # stored counts (the query's submission compares raw scores with the stored threshold)
    train = np.array([0.2, 0.3, base])
    metrics = threshold_metrics(y, scores, train, 1.0)
    assert metrics["threshold_honest"] == np.nextafter(base, 2)
    flagged = predict(scores, metrics["threshold_honest"])
    assert flagged.sum() == metrics["tp_honest"] + metrics["fp_honest"] == 1


def test_chains_band_and_non_finite_scores() -> None:
    # a chain of gaps each within the tolerance is one group, whatever its span
    step = 0.6 * TIE_RTOL
    chain = 1.0 + step * np.arange(5)
    assert np.unique(tie_safe_scores(np.r_[chain, 2.0])).size == 2
    # genuinely different scores stay apart
    apart = 1.0 + 3 * TIE_RTOL * np.arange(5)
    np.testing.assert_array_equal(tie_safe_scores(apart), apart)
    # near 0 (relative to the set's scale) everything is one tie: a distance of 0 from a
    # Gram comes out as anything up to sqrt(eps) times the norms
    near_zero = np.array([0.0, 1e-9, 3e-8, -2e-8, 10.0])
    assert np.unique(tie_safe_scores(near_zero)[:4]).size == 1
    assert tie_safe_scores(near_zero)[0] == 3e-8
    assert tie_safe_scores(np.array([0.5 * TIE_FLOOR, 2 * TIE_FLOOR, 1.0]))[0] != 2 * TIE_FLOOR
    # non-finite scores are kept as they are (ranking_scores places them afterwards)
    odd = np.array([np.nan, np.inf, -np.inf, 1.0, 1.0 + 1e-15])
    out = tie_safe_scores(odd)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf
    assert out[3] == out[4] == 1.0 + 1e-15
    # +inf stays above a huge finite score
    y = np.array([0, 1], dtype=bool)
    assert ranking_metrics(y, np.array([1e20, np.inf]))["auroc"] == 1.0
