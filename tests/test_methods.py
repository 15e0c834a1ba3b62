"""The method registry (stages/methods): one module per family, shared quantities computed
once per work unit, the course baselines against plain scikit-learn, stable experiment keys."""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from stages.evaluate import FeatureSetEntry, experiment_key
from stages.methods import (
    FAMILIES,
    DetectorConfig,
    Family,
    Needs,
    Scored,
    UnitData,
    expand_detectors,
)
from stages.methods.pca_reconstruction import NOISE
from stages.methods.unit import fold_assignment, image_groups
from stages.metrics import ranking_metrics
from tests.eval_fixtures import (
    N_AUG,
    N_ORIG,
    N_TEST,
    gamma_rows,
    grid_of,
    study_detectors,
)

REPO = Path(__file__).resolve().parents[1]
COURSE = ("KMeansDistance", "KNNDistance", "Mahalanobis", "PCAReconstruction")


@pytest.fixture(scope="module")
def rows() -> dict:
    return gamma_rows(11)


def unit_data(rows: dict, configs: list[DetectorConfig]) -> UnitData:
    needs = Needs()
    for family in {c.family for c in configs}:
        FAMILIES[family].reserve(needs, [c for c in configs if c.family == family])
    return UnitData(rows["test"], rows["train"], needs, raw=rows["X"])


def plain(config: DetectorConfig, X_tr: np.ndarray, X_q: np.ndarray, seed: int) -> np.ndarray:
    """The course baselines written directly with scikit-learn (higher = more anomalous)."""
    p = config.kwargs
    if config.family == "KMeansDistance":
        k = min(p["n_clusters"], len(X_tr))
        return KMeans(n_clusters=k, random_state=seed).fit(X_tr).transform(X_q).min(axis=1)
    if config.family == "KNNDistance":
        k = min(p["n_neighbors"], len(X_tr))
        dist, _ = NearestNeighbors(n_neighbors=k).fit(X_tr).kneighbors(X_q)
        return dist[:, -1] if p["aggregate"] == "kth" else dist.mean(axis=1)
    k = min(p["pca_components"], len(X_tr) - 1, X_tr.shape[1])  # n centred rows: rank n - 1
    pca = PCA(n_components=k, svd_solver="full").fit(X_tr)
    if config.family == "Mahalanobis":
        return LedoitWolf().fit(pca.transform(X_tr)).mahalanobis(pca.transform(X_q))
    error = ((X_q - pca.inverse_transform(pca.transform(X_q))) ** 2).sum(axis=1)
    # an error below NOISE of the energy is rounding noise (k >= rank): 0, as the family says
    return np.where(error > NOISE * ((X_q - pca.mean_) ** 2).sum(axis=1), error, 0.0)


# --- the registry ----------------------------------------------------------------------------


def test_every_family_is_one_module_with_reference_and_shared_path():
    for name, family in FAMILIES.items():
        module = family.__class__.__module__
        assert module.startswith("stages.methods.") and module != "stages.methods.base", name
        config = DetectorConfig(name, ())
        family.hyperparams(config)  # every hyperparameter has a default
        if family.trains:  # trains a network per config: nothing to share between them
            assert not family.shares(config) and not family.test_only, name
            continue
        assert family.estimator(config.kwargs, 0) is not None
        # every real family has a shared path for its defaults; the test-only ones do not
        assert family.shares(config) is not family.test_only, name
    assert {"crash", "hang"} == {n for n, f in FAMILIES.items() if f.test_only}


def test_no_family_name_outside_the_methods_package():
    """The stage only plans and calls families (the issue's grep); the grid is data."""
    pattern = re.compile("|".join(n for n in FAMILIES if not FAMILIES[n].test_only))
    for path in ("evaluate.py", "report.py", "methods/unit.py", "methods/base.py"):
        text = (REPO / "stages" / path).read_text()
        assert not pattern.search(text), (path, pattern.search(text))


def test_the_study_grid_lives_in_params_only():
    study = expand_detectors(study_detectors())
    demo = expand_detectors(grid_of("params.yaml"))
    assert len(study) == 71 and set(study) <= set(demo)
    counts = {f: sum(c.family == f for c in demo) for f in COURSE}
    assert counts == {"KMeansDistance": 6, "KNNDistance": 12, "Mahalanobis": 4,
                      "PCAReconstruction": 6}  # fmt: skip
    for path in (REPO / "stages").rglob("*.py"):  # no copy of Table 3 in code
        assert '0.5, 1.0, "scott"' not in path.read_text() and "STUDY_DETECTORS" not in (
            path.read_text()
        ), path


# Computed with the code before stages/methods existed (stages/detectors.py's configs):
# experiments stored by older versions keep their keys.
PINNED_KEYS = [
    ('OneClassSVM(kernel=linear,max_iter=1000)', False, 0, '6bd6d728a0a6a02fa976841565a50296d67a475202421aaf08023c5d40ff1dca'),
    ('OneClassSVM(kernel=linear,max_iter=1000)', True, 1, 'c95693da44d38e94594faa9bdd08829a204155fda4fa8cdbe140c15ed0d3e3c8'),
    ('OneClassSVM(degree=55,kernel=poly,max_iter=1000)', False, 0, '0fb76db0d93508c0f233666a56cfc86a15d01bfc29196f40fd414d871cac6731'),
    ('OneClassSVM(degree=55,kernel=poly,max_iter=1000)', True, 1, '2b04b43dd7b5fe9b3082f994e6d7eb88a707bd3c8967446b25e7f05539f6455a'),
    ('IsolationForest(n_estimators=10)', False, 0, 'eec094258d07d794f3f89cd7eefb7a3b5cba996207e02bdb3337cc3190941218'),
    ('IsolationForest(n_estimators=10)', True, 1, '7faf3731b3043dc49885704caab488079cca993c7ec20a17c4d1d23dc6dbe465'),
    ('IsolationForest(n_estimators=1000)', False, 0, 'fd7b6ec84b9e14975837274e0258009396dde7d78092c225bf6a6f6abff0c126'),
    ('IsolationForest(n_estimators=1000)', True, 1, '1a7801bd587ec2f7cf9c1822d9943f5562d83a5fc9edfea8450d3f2c0e0ff85c'),
    ('KernelDensity(bandwidth=1.0,kernel=gaussian)', False, 0, '6476f5d79d52db75c3b43923512d193d80f91cbe8a5d24c368737c99ed20c9ad'),
    ('KernelDensity(bandwidth=1.0,kernel=gaussian)', True, 1, 'c0ad33853f546830e4de2be7c027f8c3d9d0e856ba0f620e545cb3d63162b62b'),
    ('KernelDensity(bandwidth=silverman,kernel=cosine)', False, 0, '28e3f0ccc5344a69957507ab50067cee10d1e847380732f358870f73e458eb2d'),
    ('KernelDensity(bandwidth=silverman,kernel=cosine)', True, 1, '908ee2a939866277656a204477a72705b60ca03f0a25ead9faa02c9234cb9e76'),
    ('LocalOutlierFactor(n_neighbors=64,novelty=True)', False, 0, 'beaf6354afa9f62bb589c7d0872ea81e35eb2e369c6546ee2d70ba3bdbfe6b19'),
    ('LocalOutlierFactor(n_neighbors=64,novelty=True)', True, 1, '4136212801b138101c29d7a2283dac530ad6e6ed8552a0bdbb82f32c4d57a74f'),
    ('EllipticEnvelope(pca_components=256)', False, 0, '7d5751633f2003a9d81274015cf13fbc5c71643c87f05b08508b2f7ca9d4b4b9'),
    ('EllipticEnvelope(pca_components=256)', True, 1, 'c4ffd97da6e6602ca3ee31253168341575b0120d9bdd4de08fcdf49d7ac46c0f'),
]  # fmt: skip


def test_experiment_keys_of_the_study_grid_do_not_change():
    fs = FeatureSetEntry(category="bottle", backbone="resnet18", init="random", layer="layer3",
                         representation="flatten", folder="/x",
                         content_hash="0123456789abcdef")  # fmt: skip
    by_name = {c.name: c for c in expand_detectors(study_detectors())}
    for name, augmented, seed, key in PINNED_KEYS:
        assert experiment_key(fs, augmented, by_name[name], seed) == key, name


# --- shared quantities -----------------------------------------------------------------------


def test_shared_quantities_are_computed_once_and_sized_for_every_family(rows: dict):
    configs = expand_detectors([
        {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 8]}},
        {"family": "KNNDistance", "grid": {"n_neighbors": [1, 40]}},
        {"family": "Mahalanobis", "grid": {"pca_components": [4, 16]}},
        {"family": "EllipticEnvelope", "grid": {"pca_components": [8]}},
    ])  # fmt: skip
    data = unit_data(rows, configs)
    assert (data.needs.knn, data.needs.pca, data.needs.raw) == (40, 16, False)
    for family in ("LocalOutlierFactor", "KNNDistance"):
        group = [c for c in configs if c.family == family]
        computed_before, t0 = dict(data.seconds), time.perf_counter()
        outcomes = FAMILIES[family].shared_outcomes(data, True, group, 0)
        wall = time.perf_counter() - t0
        assert all(o.error is None and o.group_size == len(group) for o in outcomes)
        # the call's own seconds exclude the shared quantities it computed (the stage
        # splits those over their users): no time is counted twice
        new = sum(s for name, s in data.seconds.items() if name not in computed_before)
        assert outcomes[0].group_s <= wall - new + 1e-6
        assert outcomes[0].fit_s == pytest.approx(outcomes[0].group_s / len(group))
        used = data.take_used()
        # the second family reads the cached table and is still charged for what it rests on
        assert {"knn[True]", "sq_dists[True]", "gram"} <= used
    table = data.knn(True)
    assert data.knn(True) is table and table.query_dist.shape == (N_TEST + N_ORIG + N_AUG, 40)
    assert table.fit_dist.shape == (N_ORIG + N_AUG, 40)
    assert np.all(table.query_dist[N_TEST:, 0] == 0)  # a training row is its own neighbour
    assert data.pca(False).z_train.shape == (N_ORIG, 16)
    assert set(data.seconds) >= {"gram", "sq_dists[True]", "knn[True]", "pca[False]"}
    # the kNN table equals brute force, ties by lower index
    X = rows["X"]
    train = X[rows["train"][True]]
    brute = np.sqrt(((X[data.queries(True), None] - train[None]) ** 2).sum(-1))
    np.testing.assert_allclose(table.query_dist, np.sort(brute, axis=1)[:, :40], atol=1e-9)


@pytest.mark.parametrize("augmented", [False, True])
def test_course_baselines_agree_with_plain_sklearn(rows: dict, augmented: bool):
    """Test and in-sample training scores of every course config against scikit-learn
    written directly; AUROCs equal under the tie rule (scores within rounding are ties)."""
    configs = [c for c in expand_detectors(grid_of("params.yaml")) if c.family in COURSE]
    data = unit_data(rows, configs)
    X, seed = rows["X"], 5
    X_tr, X_q = X[rows["train"][augmented]], X[data.queries(augmented)]
    floor = 1e-12 * (X_q**2).sum(axis=1).max()
    for family in COURSE:
        group = [c for c in configs if c.family == family]
        outcomes = FAMILIES[family].shared_outcomes(data, augmented, group, seed)
        for config, outcome in zip(group, outcomes, strict=True):
            assert outcome.error is None, (config.name, outcome.error)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = plain(config, X_tr, X_q, seed)
            ours = np.concatenate([outcome.scores, outcome.train_scores])
            # two float64 computations in different orders: relative agreement, and an
            # absolute floor: a squared distance from a Gram, ||a||^2 + ||b||^2 - 2 a.b, is
            # off by a few eps x ||x||^2 (1e-12 covers it); a distance by its square root
            atol = np.sqrt(floor) if family in ("KMeansDistance", "KNNDistance") else floor
            np.testing.assert_allclose(ours, theirs, rtol=1e-6,
                                       atol=atol, err_msg=config.name)  # fmt: skip
            y = rows["labels"]
            assert ranking_metrics(y, outcome.scores) == ranking_metrics(y, theirs[:N_TEST])
            # and the family's own plain reference (what evaluate.shared: false runs)
            ref = FAMILIES[family].reference_one(X_tr, X[rows["test"]], config, seed)
            np.testing.assert_allclose(outcome.scores, ref.scores, rtol=1e-6,
                                       atol=atol)  # fmt: skip


def test_pca_reconstruction_with_as_many_components_as_the_rank_is_all_ties(rows: dict):
    """Every error is rounding noise then: exact zeros, so AUROC is 0.5 on any CPU."""
    config = DetectorConfig("PCAReconstruction", (("pca_components", 256),))
    data = unit_data(rows, [config])
    (outcome,) = FAMILIES["PCAReconstruction"].shared_outcomes(data, False, [config], 0)
    assert np.all(outcome.train_scores == 0)  # 30 training rows span their own PCA space
    ref = FAMILIES["PCAReconstruction"].reference_one(
        rows["X"][rows["train"][False]], rows["X"][rows["train"][False]], config, 0
    )
    assert np.all(ref.scores == 0)


class _Patchy(Family):
    """A family that localises: a score map per image, its maximum as the image score."""

    name = "patchy"

    def shared(self, data, augmented, configs, seed):
        X = data.raw[data.queries(augmented), :49].reshape(-1, 7, 7)
        return [Scored(X.max(axis=(1, 2)), maps=X[: len(data.test)]) for _ in configs]


def test_a_family_may_return_one_score_map_per_test_image(rows: dict):
    """The interface carries maps; families without them are unchanged (maps None)."""
    config = DetectorConfig("patchy", ())
    data = UnitData(rows["test"], rows["train"], Needs(raw=True), raw=rows["X"])
    (outcome,) = _Patchy().shared_outcomes(data, True, [config], 0)
    assert outcome.maps.shape == (N_TEST, 7, 7) and len(outcome.train_scores) == N_ORIG + N_AUG
    np.testing.assert_array_equal(outcome.scores, outcome.maps.max(axis=(1, 2)))
    knn = DetectorConfig("KNNDistance", (("n_neighbors", 2),))
    (plain_outcome,) = FAMILIES["KNNDistance"].shared_outcomes(
        unit_data(rows, [knn]), True, [knn], 0
    )
    assert plain_outcome.maps is None


def test_folds_keep_an_original_with_its_copies_and_are_seeded():
    ids = [f"train/good/{i:03d}" for i in range(23)]
    ids += [f"{i}@{t}" for t in ("rot90", "hflip") for i in ids[:23]]
    groups = image_groups(ids)
    folds = fold_assignment(groups, 5, seed=3)
    for original in ids[:23]:  # every copy sits in its original's fold
        assert len({folds[j] for j, g in enumerate(groups) if g == original}) == 1
    sizes = np.bincount(folds[:23])
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1
    assert np.array_equal(folds, fold_assignment(groups, 5, seed=3))
    assert not np.array_equal(folds, fold_assignment(groups, 5, seed=4))
    assert fold_assignment(groups[:1], 5, seed=0) is None  # one image: nothing to hold out
    assert fold_assignment(groups[:3], 5, seed=0).max() == 2  # fewer images than folds


def test_a_fold_is_scored_by_a_model_that_did_not_see_it(rows: dict):
    """Fold keys of UnitData: the shared path on a fold equals the plain estimator fitted
    on the other folds and scoring the held-out rows."""
    config = DetectorConfig("KNNDistance", (("aggregate", "mean"), ("n_neighbors", 3)))
    data = unit_data(rows, [config])
    train = rows["train"][True]
    keys = data.add_folds(True, image_groups([str(i % N_ORIG) for i in range(len(train))]), 4, 0)
    assert len(keys) == 4
    seen = np.zeros(len(train), dtype=int)
    for key in keys:
        held, rest = data.queries(key), data.train[key]
        assert not set(held) & set(rest) and len(held) + len(rest) == len(train)
        seen[np.searchsorted(train, held)] += 1
        (outcome,) = FAMILIES["KNNDistance"].shared_outcomes(data, key, [config], 0)
        assert len(outcome.scores) == len(held) and len(outcome.train_scores) == 0
        X = rows["X"]
        ref = FAMILIES["KNNDistance"].reference_one(X[rest], X[held], config, 0)
        np.testing.assert_allclose(outcome.scores, ref.scores, rtol=1e-9)
    assert np.all(seen == 1)  # every training row held out exactly once


@pytest.mark.parametrize(("n_clusters", "n_init"), [(1, 1), (5, 1), (8, 3), (20, 2)])
def test_kmeans_on_the_gram_is_scikit_learns_kmeans(n_clusters, n_init):
    """Same k-means++ seeds (same random draws), same Lloyd steps, same best of n_init:
    the centroids of scikit-learn's KMeans on the rows, both in float64."""
    from stages.methods.kmeans import kmeans_gram

    rng = np.random.default_rng(n_clusters)
    X = rng.standard_normal((60, 7)) + 4 * rng.integers(0, 3, (60, 1))
    Xc = X - X.mean(axis=0)
    ref = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=11, tol=1e-4).fit(X)
    tol = 1e-4 * np.var(X, axis=0).mean()
    C = kmeans_gram(Xc @ Xc.T, n_clusters, n_init=n_init, max_iter=300, tol=tol, seed=11)
    np.testing.assert_allclose(C @ Xc + X.mean(axis=0), ref.cluster_centers_, atol=1e-9)


def test_kmeans_on_the_gram_relocates_empty_clusters_as_scikit_learn():
    """A repeated seed leaves a cluster empty: it takes the point farthest from its
    centroid (scikit-learn's Lloyd step), checked against KMeans started from the same rows."""
    from stages.methods.kmeans import _lloyd

    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 4)) + 5 * rng.integers(0, 2, (50, 1))
    Xc = X - X.mean(axis=0)
    seeds = np.array([3, 3, 3, 17, 40])
    ref = KMeans(n_clusters=5, init=X[seeds], n_init=1, tol=1e-4).fit(X)
    tol = 1e-4 * np.var(X, axis=0).mean()
    C, labels, inertia = _lloyd(Xc @ Xc.T, seeds, 300, tol)
    np.testing.assert_allclose(C @ Xc + X.mean(axis=0), ref.cluster_centers_, atol=1e-9)
    assert np.array_equal(labels, ref.labels_) and inertia == pytest.approx(ref.inertia_)
