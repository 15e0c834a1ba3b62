"""The patch families (PatchCore, PaDiM, PatchKNN, PatchMahalanobis): shared path against
plain reference, against independent computations, the shared coreset, folds, validation.

Tolerances. Where the two paths compute the same thing the same way the test is exact;
otherwise the bound comes from the float64 rounding of the computation that differs:

- nearest-neighbour distances (PatchCore, PatchKNN): each path forms a squared distance
  as ``|q - s|^2 + |b - s|^2 - 2 (q - s).(b - s)`` for some shift ``s`` (the largest bank's
  mean, the config's own bank mean, or 0 in scikit-learn), in its own summation order.
  Dot products of length ``c`` (and the two additions) err by at most ``gamma =
  (c + 2) u`` of ``(|q - s| + |b - s|)^2 <= R^2``, so the paths' squared distances differ
  by at most ``2 gamma R^2`` and their distances (``|sqrt a - sqrt b| <= sqrt |a - b|``) by
  ``sqrt(2 gamma) R`` (:func:`distance_atol`). PatchCore's reweighting multiplies the
  largest patch score by the same weight in ``[0, 1)`` on both paths (same bank, same
  nearest patch), so its image scores stay within that bound;
- Mahalanobis quadratic forms ``delta^T P delta`` with the same ``P`` (PatchMahalanobis:
  the same ``LedoitWolf`` fit on both paths): each path errs by at most ``2 gamma_c
  |delta|^T |P| |delta|`` (:func:`quadratic_atol`), per patch;
- PaDiM's per-position covariances (``x^T x / (n - 1)`` against ``np.cov``) and inverses:
  a relative perturbation ``eps`` of ``S`` moves ``S^-1`` by ``kappa eps`` relative to
  ``||S^-1||``, and the quadratic form by ``kappa^2 eps`` relative to its value (it is at
  least ``|delta|^2 / ||S||``); ``eps <= c (n + c) u`` for the sums of ``n`` products and the
  inversion's backward error (:func:`padim_rtol`);
- the maps are float32: rounding each side adds at most ``2^-24`` of its value.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

import stages.methods.patchcore as patchcore_module
from stages.errors import UserError
from stages.methods import FAMILIES, DetectorConfig, Needs, Outcome, UnitData, expand_detectors
from stages.methods.patchcore import PatchCoreDetector, plain_bank, shared_bank
from stages.methods.unit import image_groups
from stages.patch.padim import REGULARISATION, channel_subset
from stages.patch.patchcore import coreset_size

U = 2.0**-53  # float64 unit roundoff
U32 = 2.0**-24  # float32's
H, W, C = 6, 7, 16  # a non-square grid
N_TRAIN, N_TEST = 12, 8
SEED = 3

GRIDS = {
    "PatchCore": {"coreset_ratio": [0.1, 0.25, 1.0], "n_neighbors": [1, 3, 9]},
    "PatchKNN": {"n_neighbors": [1, 4], "aggregate": ["kth", "mean"], "coreset_ratio": [0.25, 1.0]},
    "PaDiM": {"n_channels": [5, 16, 100]},
    "PatchMahalanobis": {"coreset_ratio": [0.5, 1.0]},
}


@pytest.fixture(scope="module")
def rows() -> dict:
    """Training images of correlated Gaussian patches; their augmented copies are mirror
    images (the same patches elsewhere: exact duplicates in the augmented bank); test
    images are fresh draws, two with a shifted patch and one holding training patches."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(C, C)) / np.sqrt(C)
    train = (rng.normal(size=(N_TRAIN, H, W, C)) @ mix + 1.0).astype(np.float32)
    aug = train[:, :, ::-1]
    test = (rng.normal(size=(N_TEST, H, W, C)) @ mix + 1.0).astype(np.float32)
    test[0, 2, 3] += 4.0
    test[1, 5, 0] -= 4.0
    test[2, :3] = train[4, 3:]  # exact copies of training patches: distance 0
    X = np.concatenate([test, train, aug]).reshape(-1, H * W * C)
    idx = np.arange(len(X))
    return {
        "X": X,
        "test": idx[:N_TEST],
        "train": {False: idx[N_TEST : N_TEST + N_TRAIN], True: idx[N_TEST:]},
        "ids": [f"{i}" for i in range(N_TRAIN)] + [f"{i}@hflip" for i in range(N_TRAIN)],
    }


def configs_of(family: str, grid: dict | None = None) -> list[DetectorConfig]:
    return expand_detectors([{"family": family, "grid": grid or GRIDS[family]}])


def unit(rows: dict, configs: list[DetectorConfig]) -> UnitData:
    needs = Needs()
    for family in {c.family for c in configs}:
        FAMILIES[family].reserve(needs, [c for c in configs if c.family == family])
    return UnitData(rows["test"], rows["train"], needs, raw=rows["X"], grid=(H, W, C))


def grids(rows: dict, index: np.ndarray) -> np.ndarray:
    return rows["X"][index].reshape(-1, H, W, C)


def distance_atol(*arrays: np.ndarray) -> float:
    """``sqrt(2 gamma) R`` (module docstring): ``|q - s| + |b - s| <= R`` for a shift ``s``
    at 0 or inside the patches' hull (a bank mean): ``R = 2 max(max |x|, diameter)``,
    the diameter at most twice the largest distance to the mean."""
    x = np.concatenate([a.reshape(-1, C) for a in arrays]).astype(np.float64)
    radius = np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1)).max()
    big = 2.0 * max(np.sqrt((x**2).sum(axis=1)).max(), 2.0 * radius)
    return float(np.sqrt(2.0 * (C + 2) * U) * big)


def assert_maps_close(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    """float32 grids of values within ``atol``: plus each side's float32 rounding."""
    assert got.dtype == np.float32 and want.dtype == np.float32 and got.shape == want.shape
    bound = atol + U32 * (np.abs(got.astype(np.float64)) + np.abs(want.astype(np.float64)))
    assert np.all(np.abs(got.astype(np.float64) - want) <= bound)


def assert_outcomes_close(got: Outcome, want: Outcome, atol: float) -> None:
    assert got.error is None and want.error is None, (got.error, want.error)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=atol)
    np.testing.assert_allclose(got.train_scores, want.train_scores, rtol=0, atol=atol)
    assert_maps_close(got.maps, want.maps, atol)
    assert_maps_close(got.train_maps, want.train_maps, atol)


# --- every family: shared path = plain reference -----------------------------------------------


@pytest.mark.parametrize("augmented", [False, True])
@pytest.mark.parametrize("family", ["PatchCore", "PatchKNN"])
def test_nearest_patch_families_shared_equals_reference(rows: dict, family: str, augmented: bool):
    configs = configs_of(family)
    data = unit(rows, configs)
    outcomes = FAMILIES[family].shared_outcomes(data, augmented, configs, SEED)
    X_train, X_test = grids(rows, rows["train"][augmented]), grids(rows, rows["test"])
    atol = distance_atol(X_train, X_test)
    for config, got in zip(configs, outcomes, strict=True):
        want = FAMILIES[family].reference_one(X_train, X_test, config, SEED)
        assert got.maps.shape == (N_TEST, H, W) and len(got.train_scores) == len(X_train)
        assert_outcomes_close(got, want, atol)
    assert atol < 1e-5  # far below the distances here (about 1 to 10)


def test_padim_shared_equals_per_position_loop(rows: dict):
    configs = configs_of("PaDiM")
    data = unit(rows, configs)
    outcomes = FAMILIES["PaDiM"].shared_outcomes(data, True, configs, SEED)
    X_train, X_test = grids(rows, rows["train"][True]), grids(rows, rows["test"])
    for config, got in zip(configs, outcomes, strict=True):
        want = FAMILIES["PaDiM"].reference_one(X_train, X_test, config, SEED)
        channels = channel_subset(C, config.kwargs["n_channels"], SEED)
        rtol = padim_rtol(X_train[..., channels])
        assert rtol < 1e-7
        scale = np.abs(np.concatenate([want.scores, want.train_scores])).max()
        assert_outcomes_close(got, want, rtol * scale)
    # n_channels 16 and 100 both mean every channel: one fit, identical results
    np.testing.assert_array_equal(outcomes[1].scores, outcomes[2].scores)


def padim_rtol(train: np.ndarray) -> float:
    """``kappa^2 c (n + c) u`` of the distances' squares (module docstring), with ``kappa``
    the largest condition number of the positions' regularised covariances; half of it
    for the distances, but kept whole."""
    n, c = len(train), train.shape[-1]
    x = train.reshape(n, -1, c).astype(np.float64)
    kappa = max(np.linalg.cond(np.cov(x[:, p], rowvar=False) + REGULARISATION * np.eye(c))
                for p in range(x.shape[1]))  # fmt: skip
    return float(kappa**2 * c * (n + c) * U)


def quadratic_atol(patches: np.ndarray, model: LedoitWolf) -> np.ndarray:
    """Per patch, ``4 gamma_c |delta|^T |P| |delta|`` (the two paths' errors), plus the
    reference's square root, square and square root (a few ``u`` of the square)."""
    delta = np.abs(patches.reshape(-1, C).astype(np.float64) - model.location_)
    q = model.mahalanobis(patches.reshape(-1, C).astype(np.float64))
    return 4 * (C + 2) * U * ((delta @ np.abs(model.precision_)) * delta).sum(axis=1) + 8 * U * q


def assert_mahalanobis_close(
    got: Outcome, want: Outcome, X_train: np.ndarray, X_queries: np.ndarray, ratio: float
) -> None:
    """:func:`assert_mahalanobis_maps_close` of the test, then of the training images."""
    X_test, n = X_queries[: len(want.scores)], len(want.scores)
    assert_mahalanobis_maps_close(
        got.maps, want.maps, got.scores, want.scores, X_train, X_test, ratio
    )
    if len(got.train_scores) == 0:  # a fold: no in-sample scores
        return
    assert_mahalanobis_maps_close(got.train_maps, want.train_maps, got.train_scores,
                                  want.train_scores, X_train, X_queries[n:], ratio)  # fmt: skip


def assert_mahalanobis_maps_close(
    got_maps: np.ndarray,
    want_maps: np.ndarray,
    scores: np.ndarray,
    ref: np.ndarray,
    X_train: np.ndarray,
    X_queries: np.ndarray,
    ratio: float,
) -> None:
    """Per patch within :func:`quadratic_atol` of the square, so ``|d1 - d2| <= |d1^2 -
    d2^2| / (d1 + d2)``; an image's largest within the largest bound over its distances."""
    bank = plain_bank(X_train.reshape(-1, C), ratio, SEED)
    model = LedoitWolf().fit(bank.astype(np.float64))  # the fit both paths make
    bound_sq = quadratic_atol(X_queries, model)
    exact = np.sqrt(model.mahalanobis(X_queries.reshape(-1, C).astype(np.float64)))
    got_d = got_maps.reshape(-1).astype(np.float64)
    want_d = want_maps.reshape(-1).astype(np.float64)
    np.testing.assert_array_equal(want_d, exact.astype(np.float32))  # the plain formula
    assert np.all(np.abs(got_d - want_d) <= bound_sq / (got_d + want_d) + U32 * (got_d + want_d))
    np.testing.assert_array_equal(ref, exact.reshape(len(X_queries), -1).max(axis=1))
    # the larger of two maxima is some patch's distance, at least the smaller image score
    assert np.all(np.abs(scores - ref) <= bound_sq.max() / np.minimum(scores, ref))


def test_patch_mahalanobis_shared_equals_ledoit_wolf(rows: dict):
    configs = configs_of("PatchMahalanobis")
    data = unit(rows, configs)
    outcomes = FAMILIES["PatchMahalanobis"].shared_outcomes(data, True, configs, SEED)
    X_train, X_test = grids(rows, rows["train"][True]), grids(rows, rows["test"])
    for config, got in zip(configs, outcomes, strict=True):
        assert got.error is None
        want = FAMILIES["PatchMahalanobis"].reference_one(X_train, X_test, config, SEED)
        queries = np.concatenate([X_test, X_train])
        assert_mahalanobis_close(got, want, X_train, queries, config.kwargs["coreset_ratio"])


# --- PatchCore against independent computations ----------------------------------------------


def test_patchcore_full_bank_is_nearest_training_patch(rows: dict):
    """Ratio 1, n_neighbors 1: the distance to the nearest training patch (scikit-learn),
    0 for a test patch that is a training patch; the image score is the largest."""
    (config,) = configs_of("PatchCore", {"coreset_ratio": [1.0], "n_neighbors": [1]})
    data = unit(rows, [config])
    (got,) = FAMILIES["PatchCore"].shared_outcomes(data, False, [config], SEED)
    X_train, X_test = grids(rows, rows["train"][False]), grids(rows, rows["test"])
    nn = NearestNeighbors(n_neighbors=1).fit(X_train.reshape(-1, C).astype(np.float64))
    dist = nn.kneighbors(X_test.reshape(-1, C).astype(np.float64))[0].reshape(N_TEST, H, W)
    atol = distance_atol(X_train, X_test)
    assert_maps_close(got.maps, dist.astype(np.float32), atol)
    np.testing.assert_allclose(got.scores, dist.max(axis=(1, 2)), rtol=0, atol=atol)
    assert np.all(got.maps[2, :3] <= atol)  # the copied training patches
    assert np.all(got.train_maps <= atol)  # every training patch is in the bank
    worst = np.unravel_index(np.argmax(got.maps[0]), (H, W))
    assert worst == (2, 3) and np.argmax(got.scores) in (0, 1)  # the shifted patches


def test_patchcore_reweighting_is_the_formula_on_the_shared_bank(rows: dict):
    """n_neighbors 9 on a coreset: eq. 7 written out on the reference's own bank."""
    (config,) = configs_of("PatchCore", {"coreset_ratio": [0.25], "n_neighbors": [9]})
    data = unit(rows, [config])
    (got,) = FAMILIES["PatchCore"].shared_outcomes(data, False, [config], SEED)
    X_train, X_test = grids(rows, rows["train"][False]), grids(rows, rows["test"])
    bank = PatchCoreDetector(0.25, 9, SEED).fit(X_train).bank_.astype(np.float64)
    for i, image in enumerate(X_test.reshape(N_TEST, -1, C).astype(np.float64)):
        d = np.sqrt(((image[:, None] - bank[None]) ** 2).sum(axis=2))  # patches x bank
        j = int(np.argmax(d.min(axis=1)))
        m_star = int(np.argmin(d[j]))
        support = np.argsort(((bank - bank[m_star]) ** 2).sum(axis=1), kind="stable")[:9]
        weight = 1.0 - np.exp(d[j, support[0]]) / np.exp(d[j, support]).sum()
        assert got.scores[i] == pytest.approx(weight * d[j].min(), abs=distance_atol(X_train))


def test_one_greedy_run_gives_every_ratios_bank(rows: dict):
    """The prefix property the shared path rests on: the greedy order computed once for
    0.5 holds the 0.25 coreset as its prefix, bank for bank equal to separate runs."""
    configs = configs_of("PatchCore", {"coreset_ratio": [0.25, 0.5, 1.0]})
    data = unit(rows, configs)
    assert data.needs.coreset == 0.5  # ratio 1 selects nothing: no greedy run for it
    bank, sizes = shared_bank(data, True, SEED, [0.25, 0.5, 1.0])
    X_train = grids(rows, rows["train"][True])
    patches = X_train.reshape(-1, C)
    assert sizes == [coreset_size(len(patches), 0.25), coreset_size(len(patches), 0.5),
                     len(patches)]  # fmt: skip
    for ratio, m in zip([0.25, 0.5], sizes, strict=False):
        np.testing.assert_array_equal(bank[:m], plain_bank(patches, ratio, SEED))
        np.testing.assert_array_equal(
            bank[:m], PatchCoreDetector(ratio, 1, SEED).fit(X_train).bank_
        )
    # ratio 1: every patch once (the rest after the greedy prefix)
    order = np.lexsort(bank.T[::-1])
    np.testing.assert_array_equal(bank[order], patches[np.lexsort(patches.T[::-1])])


def test_the_coreset_is_computed_once_for_every_patch_family(rows: dict, monkeypatch):
    calls = []
    greedy = patchcore_module.greedy_coreset_order

    def counted(*args, **kwargs):
        calls.append(args[1])
        return greedy(*args, **kwargs)

    monkeypatch.setattr(patchcore_module, "greedy_coreset_order", counted)
    configs = {
        "PatchCore": configs_of("PatchCore", {"coreset_ratio": [0.1, 0.25]}),
        "PatchKNN": configs_of("PatchKNN", {"coreset_ratio": [0.5]}),
        "PatchMahalanobis": configs_of("PatchMahalanobis", {"coreset_ratio": [0.25]}),
    }
    data = unit(rows, [c for group in configs.values() for c in group])
    for family, group in configs.items():
        outcomes = FAMILIES[family].shared_outcomes(data, False, group, SEED)
        assert all(o.error is None for o in outcomes)
        assert f"coreset[False][{SEED}]" in data.take_used()  # its share of the cost
    n_patches = N_TRAIN * H * W
    assert calls == [coreset_size(n_patches, 0.5)]  # one run, as long as the largest ratio
    assert [k for k in data.seconds if k.startswith("coreset")] == [f"coreset[False][{SEED}]"]


# --- PaDiM on a known Gaussian ----------------------------------------------------------------


def test_padim_ranks_shifted_patches_above_the_training_distribution():
    """Channels N(0, I) at every position: in-distribution patches score about
    ``sqrt(chi2_c)``, a patch shifted by 6 in every channel far more; every image holding
    one outranks every normal image, and its map peaks there."""
    rng = np.random.default_rng(1)
    h, w, c = 4, 5, 6
    train = rng.normal(size=(200, h, w, c)).astype(np.float32)
    test = rng.normal(size=(10, h, w, c)).astype(np.float32)
    test[5:, 1, 2] += 6.0
    (config,) = configs_of("PaDiM", {"n_channels": [100]})
    out = FAMILIES["PaDiM"].reference_one(train, test, config, 0)
    normal = np.delete(out.maps.reshape(10, -1), 1 * w + 2, axis=1)
    assert out.maps[5:, 1, 2].min() > max(normal.max(), out.maps[:5].max())
    assert out.scores[5:].min() > out.scores[:5].max()
    # the fitted Gaussian is close to N(0, I): squared distances of fresh patches are about
    # chi2 with c degrees of freedom (mean c; the mean of 100 within 0.35 of it, 1 sigma)
    assert abs((out.maps[:5].astype(np.float64) ** 2).mean() - c) < 1.5
    X = np.concatenate([test, train]).reshape(210, -1)
    data = UnitData(np.arange(10), {False: np.arange(10, 210)}, Needs(raw=True), raw=X,
                    grid=(h, w, c))  # fmt: skip
    (shared,) = FAMILIES["PaDiM"].shared_outcomes(data, False, [config], 0)
    rtol = padim_rtol(train)
    np.testing.assert_allclose(shared.scores, out.scores, rtol=rtol)


# --- folds, validation, failures ---------------------------------------------------------------


@pytest.mark.parametrize("family", list(GRIDS))
def test_a_fold_scores_only_its_held_out_rows(rows: dict, family: str):
    configs = configs_of(family)
    data = unit(rows, configs)
    keys = data.add_folds(True, image_groups(rows["ids"]), 3, SEED)
    assert len(keys) == 3
    for key in keys:
        held, rest = data.queries(key), data.train[key]
        outcomes = FAMILIES[family].shared_outcomes(data, key, configs, SEED)
        X_rest, X_held = grids(rows, rest), grids(rows, held)
        atol = distance_atol(X_rest, X_held)
        for config, got in zip(configs, outcomes, strict=True):
            assert got.error is None and got.maps.shape == (len(held), H, W)
            assert len(got.train_scores) == 0 and got.train_maps.shape == (0, H, W)
            want = FAMILIES[family].reference_one(X_rest, X_held, config, SEED)
            if family == "PatchMahalanobis":
                ratio = config.kwargs["coreset_ratio"]
                assert_mahalanobis_close(got, want, X_rest, X_held, ratio)
                continue
            if family == "PaDiM":
                channels = channel_subset(C, config.kwargs["n_channels"], SEED)
                atol = padim_rtol(X_rest[..., channels]) * np.abs(want.scores).max()
            np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=atol)
            assert_maps_close(got.maps, want.maps, atol)
    if family != "PaDiM":  # each fold's own greedy order
        assert [k for k in data.seconds if k.startswith("coreset")] == [
            f"coreset[{key}][{SEED}]" for key in keys
        ]


@pytest.mark.parametrize("family", ["PatchCore", "PatchKNN", "PatchMahalanobis"])
@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.1])
def test_coreset_ratio_outside_0_1_is_rejected(family: str, ratio: float):
    with pytest.raises(UserError, match=r"coreset_ratio: .*\(0, 1\]"):
        expand_detectors([{"family": family, "grid": {"coreset_ratio": [ratio]}}])


@pytest.mark.parametrize(
    ("family", "key", "value"),
    [("PatchCore", "n_neighbors", 0), ("PatchKNN", "aggregate", "median"),
     ("PaDiM", "n_channels", 0), ("PatchCore", "n_neighbors", 2.5),
     ("PatchCore", "k", 3)],
)  # fmt: skip
def test_other_bad_hyperparameters_are_rejected(family: str, key: str, value: object):
    with pytest.raises(UserError, match=key):
        expand_detectors([{"family": family, "grid": {key: [value]}}])


def test_defaults_and_registry():
    for name, defaults in {
        "PatchCore": {"coreset_ratio": 0.1, "n_neighbors": 9},
        "PaDiM": {"n_channels": 100},
        "PatchKNN": {"n_neighbors": 1, "aggregate": "kth", "coreset_ratio": 0.1},
        "PatchMahalanobis": {"coreset_ratio": 1.0},
    }.items():
        family = FAMILIES[name]
        assert family.patch and family.seeded
        assert family.hyperparams(DetectorConfig(name, ())).model_dump() == defaults
        assert expand_detectors([{"family": name, "grid": {}}])  # plan-time validation
    config = expand_detectors([{"family": "PatchCore", "fixed": {"coreset_ratio": 1}}])[0]
    assert FAMILIES["PatchCore"].hyperparams(config).coreset_ratio == 1.0  # an int is a ratio


def test_a_failing_config_is_data(rows: dict):
    """One training image: PaDiM cannot fit a covariance, on either path; PatchCore can."""
    padim = configs_of("PaDiM", {"n_channels": [4]})
    core = configs_of("PatchCore", {"coreset_ratio": [0.5], "n_neighbors": [3]})
    data = UnitData(rows["test"], {False: rows["train"][False][:1]}, raw=rows["X"],
                    needs=unit(rows, padim + core).needs, grid=(H, W, C))  # fmt: skip
    (got,) = FAMILIES["PaDiM"].shared_outcomes(data, False, padim, SEED)
    assert got.scores is None and "at least 2 training images" in got.error
    X_one, X_test = grids(rows, rows["train"][False][:1]), grids(rows, rows["test"])
    want = FAMILIES["PaDiM"].reference_one(X_one, X_test, padim[0], SEED)
    assert want.scores is None and "at least 2 training images" in want.error
    (got,) = FAMILIES["PatchCore"].shared_outcomes(data, False, core, SEED)
    assert got.error is None and got.maps.shape == (N_TEST, H, W)
    bad = X_test.copy()
    bad[0, 0, 0, 0] = np.nan
    assert "NaN" in FAMILIES["PatchCore"].reference_one(X_one, bad, core[0], SEED).error


def test_a_coreset_not_reserved_is_an_error_not_a_long_greedy_run(rows: dict):
    (config,) = configs_of("PatchCore", {"coreset_ratio": [0.5]})
    data = UnitData(rows["test"], rows["train"], Needs(raw=True), raw=rows["X"], grid=(H, W, C))
    (got,) = FAMILIES["PatchCore"].shared_outcomes(data, False, [config], SEED)
    assert "was not reserved" in got.error and not data.seconds.keys() - {"finite"}
