"""Detector families and the hyperparameter grid of the evaluate stage.

A family is one small class: the scikit-learn estimator it builds, a strict pydantic model
of its hyperparameters (so a typo or a wrong type in params.yaml is a one-line error), and
``score_grid``, which scores *all* configs of one family on one train/test matrix. The
default ``score_grid`` fits one estimator per config; a family may override it to share
work between configs (one Gram matrix, one big forest) as long as it yields the same scores.

Scores are oriented so that higher means more anomalous: ``-estimator.score_samples(X)``.
The grids themselves are data (``evaluate.detectors`` in params.yaml); ``STUDY_DETECTORS``
is the study's Table 3 (71 configs) and the default.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.covariance import EllipticEnvelope
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.svm import OneClassSVM

from stages.errors import UserError
from stages.io import stable_hash

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class Hyper(BaseModel):
    """Hyperparameters of one family; strict, so ``n_neighbors: 2.5`` or ``"8"`` is an error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- estimators that are not a single scikit-learn class -----------------------------------


class PCAEllipticEnvelope(OutlierMixin, BaseEstimator):
    """PCA to ``min(n_components, n_samples, n_features)`` then EllipticEnvelope (the study's).

    The study reduced to 32/64/128/256 components and used fewer when the data had fewer,
    which a plain ``Pipeline(PCA(k), ...)`` cannot express since k depends on the data.
    """

    def __init__(self, n_components: int = 32, support_fraction: float | None = None,
                 random_state: int | None = None) -> None:  # fmt: skip
        self.n_components = n_components
        self.support_fraction = support_fraction
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> PCAEllipticEnvelope:
        k = min(self.n_components, X.shape[0], X.shape[1])
        self.pca_ = PCA(n_components=k, svd_solver="full", random_state=self.random_state)
        self.envelope_ = EllipticEnvelope(
            support_fraction=self.support_fraction, random_state=self.random_state
        )
        self.envelope_.fit(self.pca_.fit_transform(X))
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return self.envelope_.score_samples(self.pca_.transform(X))


class CrashDetector(OutlierMixin, BaseEstimator):
    """Test-only: kills its own process in ``fit`` (abort or segfault) to prove crash isolation."""

    def __init__(self, how: str = "abort") -> None:
        self.how = how

    def fit(self, X: np.ndarray, y: Any = None) -> CrashDetector:
        if self.how == "segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        os.abort()  # SIGABRT
        raise AssertionError("unreachable")

    def score_samples(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - never fitted
        raise AssertionError("unreachable")


class HangDetector(OutlierMixin, BaseEstimator):
    """Test-only: sleeps ``seconds`` in ``fit`` (None: forever), then scores by distance.

    ``seconds=None`` proves the per-experiment timeout; a finite value makes a slow but
    deterministic detector for the kill-and-resume test.
    """

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds

    def fit(self, X: np.ndarray, y: Any = None) -> HangDetector:
        deadline = None if self.seconds is None else time.monotonic() + self.seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(
                0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            )
        self.center_ = X.mean(axis=0)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -((X - self.center_) ** 2).sum(axis=1)


# --- families -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorConfig:
    """One detector config: a family and its (fixed + grid) hyperparameters."""

    family: str
    params: tuple[tuple[str, Any], ...]

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def name(self) -> str:
        """Readable label, e.g. ``OneClassSVM(degree=3,kernel=poly,max_iter=1000)``."""
        return f"{self.family}({','.join(f'{k}={v}' for k, v in self.params)})"

    @property
    def key(self) -> str:
        return stable_hash({"family": self.family, "params": self.kwargs})


@dataclass
class Outcome:
    """The result of one config on one matrix: test scores or the error that stopped it.

    ``train_scores``: the fitted model's scores of its own training rows (same orientation,
    higher = more anomalous), from which the evaluate stage sets a threshold without test
    labels. They are in-sample, so optimistic for memorising detectors: a KDE or LOF sees
    the point itself (its density includes its own kernel; a neighbour at distance 0), so
    training scores are lower than those of unseen good images and a quantile of them
    flags more test images than its nominal rate. ``None`` where they could not be
    computed; ``score_s`` times the test scores only.
    """

    scores: np.ndarray | None
    fit_s: float = 0.0
    score_s: float = 0.0
    error: str | None = None
    train_scores: np.ndarray | None = None


def error_text(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, short enough for a table column."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{''.join(traceback.format_exception_only(exc)).strip()}{where}"[:2000]


def train_scores(model: BaseEstimator, X_train: np.ndarray) -> np.ndarray | None:
    """In-sample scores of a fitted model (higher = more anomalous); ``None`` if it fails.

    A failure here leaves the test scores valid: only the honest threshold is then missing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return -np.asarray(model.score_samples(X_train), dtype=np.float64)
    except Exception:
        return None


class Family:
    """A detector family: which estimator to build and how to score a grid of its configs."""

    name: ClassVar[str]
    hyper: ClassVar[type[Hyper]]
    seeded: ClassVar[bool] = False  # passes ``random_state=seed``
    test_only: ClassVar[bool] = False

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        raise NotImplementedError

    def score_grid(
        self, X_train: np.ndarray, X_test: np.ndarray, configs: Sequence[DetectorConfig], seed: int
    ) -> Iterator[Outcome]:
        """Yield one ``Outcome`` per config, in the order given (callers time each step).

        Default: fit one estimator per config. Errors are caught per config so one bad
        config fails alone. An override should also fill ``Outcome.train_scores`` (the
        training rows' scores); left ``None``, the honest threshold metrics stay NULL.
        """
        for config in configs:
            yield self.score_one(X_train, X_test, config, seed)

    def score_one(
        self, X_train: np.ndarray, X_test: np.ndarray, config: DetectorConfig, seed: int
    ) -> Outcome:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # The study capped OneClassSVM at max_iter=1000; not converging is expected.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = self.estimator(config.kwargs, seed).fit(X_train)
                t1 = time.perf_counter()
                scores = -np.asarray(model.score_samples(X_test), dtype=np.float64)
                t2 = time.perf_counter()
        except Exception as exc:  # one config's failure is data, not a stage failure
            return Outcome(None, time.perf_counter() - t0, 0.0, error_text(exc))
        return Outcome(scores, t1 - t0, t2 - t1, train_scores=train_scores(model, X_train))


class SklearnFamily(Family):
    """A family that is one scikit-learn class called with the hyperparameters as kwargs."""

    estimator_class: ClassVar[type[BaseEstimator]]

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        seed_kw = {"random_state": seed} if self.seeded else {}
        return self.estimator_class(**params, **seed_kw)


class OneClassSVMFamily(SklearnFamily):
    """OneClassSVM; the study capped it at max_iter=1000 (set in the grid as fixed)."""

    class hyper(Hyper):
        kernel: Literal["linear", "rbf", "sigmoid", "poly"] = "rbf"
        degree: PositiveInt = 3
        gamma: Literal["scale", "auto"] | PositiveFloat = "scale"
        coef0: float = 0.0
        nu: Fraction = 0.5
        tol: PositiveFloat = 1e-3
        max_iter: int = -1

    name = "OneClassSVM"
    estimator_class = OneClassSVM


class IsolationForestFamily(SklearnFamily):
    class hyper(Hyper):
        n_estimators: PositiveInt = 100
        max_samples: Literal["auto"] | PositiveInt | Fraction = "auto"
        max_features: PositiveInt | Fraction = 1.0
        bootstrap: bool = False

    name = "IsolationForest"
    estimator_class = IsolationForest
    seeded = True


class KernelDensityFamily(SklearnFamily):
    class hyper(Hyper):
        bandwidth: Literal["scott", "silverman"] | PositiveFloat = 1.0
        kernel: Literal["gaussian", "tophat", "epanechnikov", "exponential", "linear", "cosine"] = (
            "gaussian"
        )
        metric: str = "euclidean"

    name = "KernelDensity"
    estimator_class = KernelDensity


class LocalOutlierFactorFamily(SklearnFamily):
    class hyper(Hyper):
        n_neighbors: PositiveInt = 20
        novelty: Literal[True] = True  # score_samples on new data needs novelty=True
        metric: str = "minkowski"
        p: PositiveFloat = 2.0

    name = "LocalOutlierFactor"

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        return LocalOutlierFactor(**{"novelty": True, **params})


class EllipticEnvelopeFamily(SklearnFamily):
    class hyper(Hyper):
        pca_components: PositiveInt = 32
        support_fraction: Fraction | None = None

    name = "EllipticEnvelope"
    seeded = True

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        params = dict(params)
        return PCAEllipticEnvelope(n_components=params.pop("pca_components", 32), **params,
                                   random_state=seed)  # fmt: skip


class CrashFamily(SklearnFamily):
    class hyper(Hyper):
        how: Literal["abort", "segfault"] = "abort"

    name = "crash"
    estimator_class = CrashDetector
    test_only = True


class HangFamily(SklearnFamily):
    class hyper(Hyper):
        seconds: PositiveFloat | None = None

    name = "hang"
    estimator_class = HangDetector
    test_only = True


FAMILIES: dict[str, Family] = {
    f.name: f()
    for f in (
        OneClassSVMFamily,
        IsolationForestFamily,
        KernelDensityFamily,
        LocalOutlierFactorFamily,
        EllipticEnvelopeFamily,
        CrashFamily,
        HangFamily,
    )
}

# --- the grid ------------------------------------------------------------------------------

GridValue = str | int | float | bool | None


class DetectorSpec(BaseModel):
    """One entry of ``evaluate.detectors``: every combination of ``grid`` plus ``fixed``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    grid: dict[str, Annotated[list[GridValue], Field(min_length=1)]] = {}
    fixed: dict[str, GridValue] = {}


STUDY_DETECTORS: list[dict[str, Any]] = [
    # OneClassSVM, study's max_iter=1000 cap, gamma='scale': 3 kernels + poly of 7 degrees.
    {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf", "sigmoid"]},
     "fixed": {"max_iter": 1000}},
    {"family": "OneClassSVM", "grid": {"kernel": ["poly"], "degree": [3, 5, 8, 13, 21, 34, 55]},
     "fixed": {"max_iter": 1000}},
    # IsolationForest: 10..100 step 10, 200..1000 step 100 (19).
    {"family": "IsolationForest",
     "grid": {"n_estimators": [*range(10, 101, 10), *range(200, 1001, 100)]}},
    # KernelDensity: 4 bandwidths x 6 kernels (24).
    {"family": "KernelDensity",
     "grid": {"bandwidth": [0.5, 1.0, "scott", "silverman"],
              "kernel": ["gaussian", "tophat", "epanechnikov", "exponential", "linear", "cosine"]}},
    # LocalOutlierFactor with novelty=True (14).
    {"family": "LocalOutlierFactor",
     "grid": {"n_neighbors": [2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]},
     "fixed": {"novelty": True}},
    # EllipticEnvelope after PCA (4; fewer components when the data has fewer).
    {"family": "EllipticEnvelope", "grid": {"pca_components": [32, 64, 128, 256]}},
]  # fmt: skip


def _check(family: Family, key: str, value: Any, where: str) -> None:
    try:
        family.hyper.model_validate({key: value})
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "extra_forbidden":
            known = ", ".join(family.hyper.model_fields)
            raise UserError(f"{where}: unknown hyperparameter of {family.name} "
                            f"(known: {known})") from None  # fmt: skip
        raise UserError(f"{where}: {err['msg']} (got {value!r})") from None


def expand_detectors(
    specs: Sequence[DetectorSpec | dict[str, Any]],
    allow_test_detectors: bool = False,
    section: str = "evaluate.detectors",
) -> list[DetectorConfig]:
    """All detector configs of the grid, validated per family; duplicates are an error."""
    configs: list[DetectorConfig] = []
    seen: dict[DetectorConfig, int] = {}
    for i, raw in enumerate(specs):
        spec = DetectorSpec.model_validate(raw) if isinstance(raw, dict) else raw
        where = f"{section}[{i}]"
        family = FAMILIES.get(spec.family)
        if family is None:
            known = ", ".join(n for n, f in FAMILIES.items() if not f.test_only)
            raise UserError(f"{where}.family: unknown detector family {spec.family!r} "
                            f"(known: {known})")  # fmt: skip
        if family.test_only and not allow_test_detectors:
            raise UserError(f"{where}.family: {spec.family!r} is a test-only detector; "
                            "set evaluate.allow_test_detectors: true to use it")  # fmt: skip
        both = sorted(set(spec.grid) & set(spec.fixed))
        if both:
            raise UserError(f"{where}: {both[0]!r} is in both grid and fixed")
        for key, values in spec.grid.items():
            for value in values:
                _check(family, key, value, f"{where}.grid.{key}")
        for key, value in spec.fixed.items():
            _check(family, key, value, f"{where}.fixed.{key}")
        names = sorted(spec.grid)
        for combo in itertools.product(*(spec.grid[n] for n in names)):
            params = tuple(sorted({**spec.fixed, **dict(zip(names, combo, strict=True))}.items()))
            config = DetectorConfig(spec.family, params)
            if config in seen:
                raise UserError(f"{where}: {config.name} is already in "
                                f"{section}[{seen[config]}]")  # fmt: skip
            seen[config] = i
            configs.append(config)
    return configs


def ranking_scores(scores: np.ndarray) -> np.ndarray:
    """Scores with non-finite values placed explicitly, for AUROC/AP.

    ``+inf`` (e.g. zero density under a compact KDE kernel) ranks above every finite score,
    ``-inf`` below; ``NaN`` (no information) ranks with the least anomalous. Ties among
    them stay ties. The study mapped all of them to 0; the counts are stored per experiment.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    out = scores.copy()
    out[np.isposinf(scores)] = hi + 1.0
    out[np.isneginf(scores) | np.isnan(scores)] = lo - 1.0
    return out
