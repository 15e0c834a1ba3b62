"""Evaluate stage with ``evaluate.shared: true``: parity with plain scikit-learn per config.

``evaluate_unit`` runs here in-process (no Dask, no deadline) on one small feature set with
both augmentation choices and the demo's grid: the study's 71 configs and the course
baselines (every registered family but the test-only ones).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.special import logsumexp

from stages.evaluate import FeatureSetEntry, Unit, evaluate_unit, plan
from stages.features import MANIFEST, load_feature_set
from stages.methods import FAMILIES, DetectorConfig, Needs, UnitData, expand_detectors
from stages.metrics import THRESHOLD_FIELDS, ranking_metrics, threshold_metrics
from stages.results_db import ExperimentRow
from tests.eval_fixtures import grid_of, write_feature_set

SEED = 3
# the demo's image-level configs (the patch families run on patch feature sets only:
# tests/test_patch_methods.py; the image families on images: tests/test_anomalib_models.py)
DEMO = [c for c in expand_detectors(grid_of("params.yaml"))
        if not FAMILIES[c.family].patch and not FAMILIES[c.family].images]  # fmt: skip
TOLERANT = tuple(sorted({c.family for c in DEMO} - {"KernelDensity"}))
FALLBACK = DetectorConfig("KernelDensity", (("bandwidth", 1.0), ("metric", "manhattan")))


def _unit(folder: Path, notes: Path, detectors: list[DetectorConfig], shared: bool,
          folds: int = 0) -> Unit:  # fmt: skip
    """The unit's experiments; ``folds`` 0 (in-sample honest thresholds) unless a test is
    about the out-of-fold ones (the plain path fits every config once more per fold)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = FeatureSetEntry(category="bottle", backbone="resnet18", init="random",
                            layer="layer2", representation="flatten", folder=str(folder),
                            content_hash=manifest["content_hash"])  # fmt: skip
    ((fs, experiments),) = plan([entry], {"bottle": ["rot90"]}, detectors, [SEED])
    return Unit(fs, tuple(experiments), None, str(notes), 0.99, shared, folds)


def _kde_brute(X_train: np.ndarray, X_query: np.ndarray, params: dict) -> np.ndarray:
    """``-log density`` up to a per-config constant: exact float64 log-sum-exp."""
    a, b = X_query.astype(np.float64), X_train.astype(np.float64)
    dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    n, d = b.shape
    h = {"scott": n ** (-1 / (d + 4)), "silverman": (n * (d + 2) / 4) ** (-1 / (d + 4))}.get(
        params["bandwidth"], params["bandwidth"]
    )
    u = dist / h
    with np.errstate(divide="ignore"):
        log_k = {
            "gaussian": -0.5 * u**2,
            "exponential": -u,
            "tophat": np.where(u < 1, 0.0, -np.inf),
            "epanechnikov": np.where(u < 1, np.log(np.maximum(1 - u**2, 0)), -np.inf),
            "linear": np.where(u < 1, np.log(np.maximum(1 - u, 0)), -np.inf),
            "cosine": np.where(u < 1, np.log(np.maximum(np.cos(0.5 * math.pi * u), 0)), -np.inf),
        }[params["kernel"]]
    return -logsumexp(log_k, axis=1)


def _assert_equal_up_to_constant(got: np.ndarray, brute: np.ndarray) -> float:
    """Asserts; returns the constant (``got - brute``)."""
    assert np.array_equal(np.isposinf(got), np.isposinf(brute))
    finite = np.isfinite(brute)
    assert np.isfinite(got[finite]).all()
    if finite.any():
        offset = got[finite] - brute[finite]
        np.testing.assert_allclose(offset, offset[0], rtol=0, atol=1e-9 * (1 + abs(offset[0])))
        return float(np.median(offset))
    return 0.0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    folder = root / "features"
    write_feature_set(folder, n_train=40, n_test=24, dim=12, transforms=["rot90"], seed=7)
    detectors = [*DEMO, FALLBACK]
    shared = evaluate_unit(_unit(folder, root, detectors, shared=True))
    per_config = evaluate_unit(_unit(folder, root, detectors, shared=False))
    return folder, _unit(folder, root, detectors, True), shared, per_config


def _by_key(rows: list[ExperimentRow]) -> dict[str, ExperimentRow]:
    return {r.key: r for r in rows}


def test_every_config_matches_plain_sklearn_within_the_issue_tolerances(workspace):
    """AUROC and the honest threshold (from the in-sample training scores) vs per config.

    The stored per-config rows are scikit-learn on the float32 features, which keeps them
    in float32 for LOF, kNN, k-means and PCA (scores off by ~1e-7 relative, far above the
    tie rule's 1e-10): against those, the issue's yardstick. Against the same reference on
    a float64 copy of the features (the precision the shared path computes in), AUROC,
    average precision and the oracle threshold metrics are equal under the tie rule;
    OneClassSVM excepted (max_iter=1000: the stopping iterate depends on last bits)."""
    folder, unit, shared, per_config = workspace
    fs = load_feature_set(folder)
    test = fs.rows("test")
    X_test, y = fs.X[test], fs.is_anomaly[test]
    shared, plain = _by_key(shared), _by_key(per_config)  # per config = scikit-learn's
    assert len(shared) == 2 * (len(DEMO) + 1) and len(DEMO) > 71
    d_auroc: dict[str, list[float]] = {f: [] for f in TOLERANT}
    d_threshold: dict[str, list[float]] = {f: [] for f in TOLERANT}
    for exp in unit.experiments:
        row, ref = shared[exp.key], plain[exp.key]
        assert row.status == ref.status == "done", (exp.detector.name, row.error)
        assert (row.n_train, row.n_test, row.dim) == (40 * (1 + exp.augmented), 24, 12)
        got = np.asarray(row.scores, dtype=np.float64)
        X_train = fs.X[fs.rows("train", exp.augmented)]
        if exp.detector == FALLBACK:  # per config in both runs: the same computation
            np.testing.assert_array_equal(got, ref.scores)
            continue
        if exp.detector.family == "KernelDensity":  # exact log-sum-exp, not sklearn's tree
            brute = _kde_brute(X_train, X_test, exp.detector.kwargs)
            offset = _assert_equal_up_to_constant(got, brute)
            assert ranking_metrics(y, brute + offset) == ranking_metrics(y, got)
            continue
        if exp.detector.family != "OneClassSVM":
            f64 = FAMILIES[exp.detector.family].reference_one(
                X_train.astype(np.float64), X_test.astype(np.float64), exp.detector, SEED
            )
            stored = {"auroc": row.auroc, "average_precision": row.average_precision}
            assert ranking_metrics(y, f64.scores) == stored, exp.detector.name
            want = threshold_metrics(y, f64.scores, None, 0.99)
            for field in THRESHOLD_FIELDS[1:]:
                assert want[f"{field}_oracle"] == row.thresholds[f"{field}_oracle"], field
        d_auroc[exp.detector.family].append(abs(row.auroc - ref.auroc))
        want = ref.thresholds["threshold_honest"]
        diff = abs(row.thresholds["threshold_honest"] - want) / (1 + abs(want))
        d_threshold[exp.detector.family].append(diff)
    for family in TOLERANT:
        for what, diffs in (("AUROC", d_auroc[family]), ("threshold", d_threshold[family])):
            diffs = np.array(diffs)
            assert len(diffs) > 0
            assert (diffs <= 1e-6).mean() >= 0.99 and diffs.max() <= 0.005, (family, what, diffs)


def test_shared_train_scores_are_sklearns_in_sample_scores(workspace):
    """``Outcome.train_scores`` equal ``-score_samples(X_train)`` of the fitted estimator.

    LOF and KDE see the training point itself (a neighbour at distance 0; its own kernel),
    as scikit-learn's ``score_samples`` on the training rows does. Per experiment, the
    largest deviation relative to the scores' spread; KDE against the brute force.
    """
    folder, unit, _, _ = workspace
    fs = load_feature_set(folder)
    test = np.flatnonzero(fs.rows("test"))
    train = {a: np.flatnonzero(fs.rows("train", a)) for a in (False, True)}
    needs = Needs()
    for family in {e.detector.family for e in unit.experiments}:
        FAMILIES[family].reserve(needs, [e.detector for e in unit.experiments
                                         if e.detector.family == family])  # fmt: skip
    data = UnitData(test, train, needs, raw=fs.X)
    deviations: dict[str, list[float]] = {f: [] for f in TOLERANT}
    for augmented in (False, True):
        X_train = fs.X[train[augmented]]
        for family in FAMILIES:
            configs = [e.detector for e in unit.experiments if e.augmented == augmented
                       and e.detector.family == family and e.detector != FALLBACK]  # fmt: skip
            if family == "IsolationForest":
                configs = [c for c in configs if c.kwargs["n_estimators"] in (10, 30, 200)]
            if not configs:
                continue
            outcomes = FAMILIES[family].shared_outcomes(data, augmented, configs, SEED)
            for config, outcome in zip(configs, outcomes, strict=True):
                assert outcome.error is None and len(outcome.train_scores) == len(X_train)
                if family == "KernelDensity":
                    brute = _kde_brute(X_train, X_train, config.kwargs)
                    _assert_equal_up_to_constant(outcome.train_scores, brute)
                    continue
                want = FAMILIES[family].reference_one(X_train, X_train[:1], config, SEED)
                want = want.train_scores
                spread = np.ptp(want) + 1e-300
                deviations[family].append(np.max(np.abs(outcome.train_scores - want)) / spread)
    for family, dev in deviations.items():
        dev = np.array(dev)
        # float32 distance rounding (LOF) and libsvm's capped iterations (OneClassSVM, poly
        # degree 55) move a few scores by a small fraction of their spread; the honest
        # threshold itself is checked to the issue's tolerance above.
        assert np.median(dev) <= 1e-5 and dev.max() <= 0.005, (family, dev)


def test_shared_and_per_config_runs_give_the_same_rows(workspace):
    _, unit, shared, per_config = workspace
    shared, per_config = _by_key(shared), _by_key(per_config)
    assert shared.keys() == per_config.keys() == {e.key for e in unit.experiments}
    for key, a in shared.items():
        b = per_config[key]
        assert (a.status, a.n_train, a.n_test, a.dim) == (b.status, b.n_train, b.n_test, b.dim)
        assert len(a.scores) == len(b.scores) == len(a.image_ids) == 24
        assert a.image_ids == b.image_ids and a.thresholds.keys() == b.thresholds.keys()
        assert a.fit_s > 0 and a.score_s is not None
        assert b.group_size == 1 and b.group_s == b.fit_s + b.score_s  # a plain fit
    # one family call per (augmented, family): its configs share its measured seconds, and
    # each one's amortised fit_s adds the shared quantities to its share of them
    calls: dict[tuple, list[ExperimentRow]] = {}
    for exp in unit.experiments:
        if exp.detector != FALLBACK:
            calls.setdefault((exp.augmented, exp.detector.family), []).append(shared[exp.key])
    for members in calls.values():
        assert {(r.group_s, r.group_size) for r in members} == {(members[0].group_s, len(members))}
        assert all(r.fit_s >= r.group_s / r.group_size for r in members)


def shares(config: DetectorConfig) -> bool:
    return FAMILIES[config.family].shares(config)


def test_which_configs_have_a_shared_path_is_explicit():
    assert all(shares(c) for c in DEMO)
    assert not shares(FALLBACK)
    lof_l1 = DetectorConfig("LocalOutlierFactor", (("n_neighbors", 5), ("p", 1.0)))
    assert not shares(lof_l1)
    hang = expand_detectors([{"family": "hang"}], allow_test_detectors=True)[0]
    assert not shares(hang)
    # OneClassSVM's family default max_iter=-1 is what runs, not the study's cap.
    assert FAMILIES["OneClassSVM"].hyperparams(DetectorConfig("OneClassSVM", ())).max_iter == -1


def test_nonfinite_features_fail_like_sklearn(tmp_path):
    folder = tmp_path / "features"
    write_feature_set(folder, n_train=20, n_test=12, dim=6, shards=1)
    shard = folder / "part-00000.parquet"
    table = pq.read_table(shard)
    features = table.column("feature").to_pylist()
    features[0][2] = float("nan")  # one training row
    table = table.set_column(5, "feature", [features])
    pq.write_table(table.cast(pq.read_schema(shard)), shard)
    detectors = [
        # every family with its defaults (anomalib's need a model and images: not here)
        *expand_detectors(
            [
                {"family": f}
                for f in FAMILIES
                if not FAMILIES[f].test_only and not FAMILIES[f].images
            ]
        ),
        FALLBACK,
    ]
    shared = _by_key(evaluate_unit(_unit(folder, tmp_path, detectors, shared=True)))
    plain = _by_key(evaluate_unit(_unit(folder, tmp_path, detectors, shared=False)))
    assert {k: r.status for k, r in shared.items()} == {k: r.status for k, r in plain.items()}
    for row in shared.values():  # IsolationForest's trees route NaN: done in both
        if row.config["detector"] != "IsolationForest":
            assert row.status == "failed" and "NaN" in row.error


def test_out_of_fold_honest_thresholds_agree_between_paths(tmp_path):
    """5-fold out-of-fold training scores, shared path (the unit's Gram, each fold's kNN
    table and PCA basis) against one plain fit per fold: the honest thresholds agree as
    the test scores do, and for memorising detectors they sit above the in-sample ones."""
    folder = tmp_path / "features"
    write_feature_set(folder, n_train=40, n_test=24, dim=12, transforms=["rot90"], seed=7)
    picks = {"LocalOutlierFactor": 2, "KNNDistance": 0, "KernelDensity": 0, "OneClassSVM": 1,
             "IsolationForest": 0, "EllipticEnvelope": 0, "KMeansDistance": 2,
             "Mahalanobis": 0, "PCAReconstruction": 0}  # fmt: skip
    detectors = [[c for c in DEMO if c.family == f][i] for f, i in picks.items()]
    shared = _by_key(evaluate_unit(_unit(folder, tmp_path, detectors, True, folds=5)))
    plain = _by_key(evaluate_unit(_unit(folder, tmp_path, detectors, False, folds=5)))
    unit = _unit(folder, tmp_path, detectors, True, folds=5)
    for exp in unit.experiments:
        row, ref = shared[exp.key], plain[exp.key]
        name = exp.detector.name
        assert row.status == ref.status == "done", (name, row.error, ref.error)
        got, want = row.thresholds, ref.thresholds
        assert got["threshold_folds"] == want["threshold_folds"] == 5
        assert got["threshold_honest"] is not None, name
        if exp.detector.family == "KernelDensity":  # exact log-sum-exp vs sklearn's tree
            assert got["threshold_honest"] > got["threshold_insample"], name
            continue
        for kind in ("honest", "insample"):
            a, b = got[f"threshold_{kind}"], want[f"threshold_{kind}"]
            assert abs(a - b) <= 1e-6 * (1 + abs(b)), (name, kind, a, b)
            assert got[f"f1_{kind}"] == want[f"f1_{kind}"], (name, kind)
        if exp.detector.family in ("LocalOutlierFactor", "KNNDistance"):
            # a training image is its own neighbour in-sample, never out of fold
            assert got["threshold_honest"] > got["threshold_insample"], name
        assert ref.group_s > ref.fit_s + ref.score_s  # the plain path's fold fits are timed
