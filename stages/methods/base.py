"""What every detector family (method) has: hyperparameters, a plain reference, a shared path.

A family is one class in one module of ``stages.methods``:

- ``hyper``: a strict pydantic model of its hyperparameters, so a typo or a wrong type in
  params.yaml is a one-line error;
- ``estimator`` / ``reference``: the plain path, one scikit-learn estimator per config fitted
  on the raw features (the study's way, and the reference every shared path is tested
  against; ``evaluate.shared: false`` runs it);
- ``shares`` / ``reserve`` / ``shared``: the shared path, every config of the family at once
  from the work unit's shared quantities (:class:`stages.methods.unit.UnitData`: Gram, kNN
  table, PCA basis, raw rows), each computed once per unit whatever the number of families
  asking for it.

Scores are oriented so that higher means more anomalous.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
import warnings
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError

from stages.errors import UserError
from stages.hyper import Fraction, Hyper, PositiveFloat, PositiveInt  # noqa: F401 (re-exported)
from stages.io import stable_hash
from stages.patch.maps import SIGMA

if TYPE_CHECKING:
    from stages.methods.unit import Needs, UnitData


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
        """Readable label: ``Family(key=value,...)``, keys sorted (``model``, which names
        what a wrapper family runs, first)."""
        params = sorted(self.params, key=lambda kv: kv[0] != "model")
        return f"{self.family}({','.join(f'{k}={v}' for k, v in params)})"

    @property
    def key(self) -> str:
        return stable_hash({"family": self.family, "params": self.kwargs})


@dataclass
class Outcome:
    """The result of one config on one work unit: test scores or the error that stopped it.

    ``train_scores``: the fitted model's scores of its own training rows (same orientation),
    from which the evaluate stage sets a threshold without test labels. They are in-sample,
    so optimistic for memorising detectors (a KDE or LOF sees the point itself). ``None``
    where they could not be computed. ``maps``: optionally one 2-D score map per test image
    (n_test, h, w: a patch-score grid) from families that localise (``Family.patch``), and
    ``train_maps``/``oof_maps`` those of the training rows (in-sample / out-of-fold: the
    honest pixel threshold); ``None`` for image-level families.
    ``group_s``/``group_size``: the family call that served the config, its own measured
    seconds and how many configs it served (``None``: a per-config fit, ``fit_s + score_s``).
    ``oof_scores``: every training row scored by the model of the fold that held it out
    (k-fold, ``evaluate.threshold_folds``): the honest threshold's input.
    """

    scores: np.ndarray | None
    fit_s: float = 0.0
    score_s: float = 0.0
    error: str | None = None
    train_scores: np.ndarray | None = None
    maps: np.ndarray | None = None
    group_s: float | None = None
    group_size: int | None = None
    oof_scores: np.ndarray | None = None  # training rows scored by models that did not see them
    train_maps: np.ndarray | None = None  # (n_train, h, w) in-sample, with ``maps``
    oof_maps: np.ndarray | None = None  # (n_train, h, w) out-of-fold, with ``oof_scores``
    # A family that trains a network: one entry per finished epoch (``epoch``,
    # ``train_loss``, ``val_loss`` on the held-out good images, ``seconds``), stored in the
    # ``epochs`` table; and, per test image, the model's input and its reconstruction
    # ((n_test, 3, h, w) uint8) for the report's figure (the stage keeps a few).
    curve: list[dict[str, float | int | None]] | None = None
    # A classifier's decision threshold on its scores, fixed without the evaluation labels
    # (e.g. probability 0.5): the honest threshold metrics use it instead of a quantile.
    threshold: float | None = None
    # Per test image, the model's embedding (n_test, d) (a labelled family's penultimate
    # features), stored beside the maps for the report's t-SNE.
    embeddings: np.ndarray | None = None
    inputs: np.ndarray | None = None
    reconstructions: np.ndarray | None = None


@dataclass
class Scored:
    """A shared path's result for one config: scores of the unit's queries (test rows, then
    training rows, as ``UnitData.queries`` orders them) and, from a patch family, one
    patch-score grid per query (n_queries, h, w), in the same order."""

    scores: np.ndarray
    maps: np.ndarray | None = None


@dataclass(frozen=True)
class Setting:
    """What a family may read besides its rows (the families that train or need images of
    their own: anomalib's models): the image index (absolute), the folder its relative
    paths start from, the evaluate stage's scratch folder (shared with workers), the
    extraction's geometry (``crop``); at run time also the experiment's category and key
    (``run_setting``), e.g. to name its training checkpoints, and the device it trains on."""

    index: str = ""
    workdir: str = "."
    scratch: str = ""
    crop: bool = True
    category: str = ""
    key: str = ""
    part: str = ""  # the model being fitted: "" (the experiment's), or a fold ("fold0")
    # A ``holdout`` family's queries end with this many held-out good training images
    # (after the test images): the validation slice a training loop may report a loss on.
    held: int = 0
    # Where a family that trains runs its network (``evaluate.device`` as the stage
    # resolved it: cpu, cuda or cuda:N; ``stages.methods.epochs.run_device``).
    device: str = "cpu"


def training_dir(scratch: str | Path, key: str) -> Path:
    """Where the training checkpoints of experiment ``key`` live (one subfolder per model:
    the experiment's and its folds'); the stage removes it once the experiment is done."""
    return Path(scratch) / "training" / key


def checkpoint_dir(setting: Setting | None) -> Path | None:
    """The folder of the current model's training checkpoints (``training_dir`` of the
    experiment, then ``part`` or ``model``); ``None`` outside an experiment (no scratch
    folder or key: a plain call, which then trains without checkpoints)."""
    if setting is None or not setting.scratch or not setting.key:
        return None
    return training_dir(setting.scratch, setting.key) / (setting.part or "model")


def say(message: str) -> None:
    """One line on the process's stderr: the stage's output, also from a Dask worker (whose
    logging the engine silences), e.g. from which epoch or step a training resumes."""
    print(f"evaluate: {message}", file=sys.__stderr__, flush=True)


_RUN: ContextVar[Setting | None] = ContextVar("run_setting", default=None)


@contextmanager
def run_setting(setting: Setting) -> Iterator[None]:
    """Make ``setting`` the experiment's setting for the block (:func:`current_setting`)."""
    token = _RUN.set(setting)
    try:
        yield
    finally:
        _RUN.reset(token)


def current_setting() -> Setting | None:
    """The setting of the experiment being run (``None`` outside the evaluate stage)."""
    return _RUN.get()


def error_text(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, short enough for a table column."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{''.join(traceback.format_exception_only(exc)).strip()}{where}"[:2000]


def in_sample_scores(model: BaseEstimator, X_train: np.ndarray) -> np.ndarray | None:
    """In-sample scores of a fitted model (higher = more anomalous); ``None`` if it fails.

    A failure here leaves the test scores valid: only the honest threshold is then missing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return -np.asarray(model.score_samples(X_train), dtype=np.float64)
    except Exception:
        return None


class HyperparameterError(ValueError):
    """A hyperparameter value the family's estimator rejects whatever the data: ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _sorted_sets(text: str) -> str:
    """scikit-learn lists allowed values as a Python set (no fixed order): sort them."""

    def order(match: re.Match[str]) -> str:
        items = sorted(item.strip() for item in match.group(1).split(","))
        return "{" + ", ".join(items) + "}"

    return re.sub(r"\{([^{}]*)\}", order, " ".join(text.split()))


# Rows a probe fit runs on: a few generic vectors (what a probed hyperparameter must work on).
_PROBE_X = np.random.default_rng(0).normal(size=(12, 4))


def nonfinite_error(n_bad: int) -> str:
    return (f"ValueError: Input contains NaN or infinity: {n_bad} of the train/test rows "
            "have non-finite features (shared computation)")  # fmt: skip


class Family:
    """A detector family: its hyperparameters, its plain reference and its shared path."""

    name: ClassVar[str]
    hyper: ClassVar[type[Hyper]]
    seeded: ClassVar[bool] = False  # passes ``random_state=seed``
    test_only: ClassVar[bool] = False
    # Scores patches of a patch feature set (representation ``patch``) and returns a
    # patch-score grid per image; the evaluate stage pairs patch families with patch
    # feature sets only, and the image-level families with the others. Its plain
    # reference receives the rows as (n, h, w, c) arrays.
    patch: ClassVar[bool] = False
    # Trains on the images themselves (representation ``image``: the pixels backbone's
    # ``rgbS`` rows as (n, 3, h, w)) and returns an anomaly map per image; paired with the
    # image feature sets only (anomalib's models).
    images: ClassVar[bool] = False
    # The Gaussian blur (sigma in map pixels) that turns the family's grids into anomaly
    # maps after the bilinear resize to the model's input (stages.patch.maps); 0: the
    # family's maps are final already (anomalib blurs its own where its model does).
    map_sigma: ClassVar[float] = SIGMA
    # A family that trains a network holds out the first of the ``threshold_folds`` folds
    # instead of refitting once per fold: its one model trains on the other rows and
    # scores the test rows and the held-out ones (the honest threshold's input), as
    # anomalib splits a validation set off the training images.
    holdout: ClassVar[bool] = False
    # Learns from labelled test images (the few-labels protocol, stages.few_labels): its
    # config carries the protocol's hyperparameters; the stage trains it on the good
    # training images and the labelled pool images (``fit_labelled``) and evaluates it on
    # the held-out part of the test images only (scores, maps: its Grad-CAM, embeddings).
    labelled: ClassVar[bool] = False
    # The shared path fails the whole group, as scikit-learn's input check does, when a
    # query row has a non-finite feature (a family whose estimator accepts NaN sets False).
    needs_finite: ClassVar[bool] = True
    # Hyperparameters that scikit-learn's parameter validation accepts but a fit may still
    # reject whatever the data (a distance metric that needs extra arguments): checked at
    # plan time by fitting the estimator with only these set on a few generic vectors.
    probed: ClassVar[tuple[str, ...]] = ()

    # --- validation at plan time -----------------------------------------------------------
    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        """The scikit-learn estimators a config builds, each with a map from its parameter
        names to the family's hyperparameter names where they differ; their own parameter
        validation (``_validate_params``) must accept the config. By default the family's
        estimator itself."""
        return [(self.estimator(params, 0), {})]

    def validate(self, config: DetectorConfig) -> None:
        """Raise ``HyperparameterError`` naming the key when scikit-learn rejects a value of
        ``config`` (its own parameter validation, then a probe fit of ``probed`` keys):
        what would fail every experiment of the config fails the plan instead."""
        params = self.hyperparams(config).model_dump()
        for estimator, names in self.checked_estimators(params):
            if getattr(type(estimator), "_parameter_constraints", None) is None:
                continue  # not a scikit-learn estimator: the pydantic model checked it
            try:
                estimator._validate_params()
            except InvalidParameterError as exc:
                found = re.match(r"The '(\w+)' parameter", str(exc))
                name = found.group(1) if found else ""
                raise HyperparameterError(
                    names.get(name, name),
                    f"scikit-learn's {type(estimator).__name__} rejects it: {_sorted_sets(str(exc))}",
                ) from None
        probe = {k: v for k, v in config.kwargs.items() if k in self.probed}
        if probe:
            _probe(self, tuple(sorted(probe.items())))

    # --- data-dependent configs (families that need more than their rows) ------------------
    def resolve(self, config: DetectorConfig, setting: Setting) -> DetectorConfig:
        """The config as the experiment records it, once the stage knows the data: e.g. a
        teacher network's origin and content hash added to its hyperparameters, so rows
        of different teachers never share a key. By default the config itself."""
        return config

    def prepare(self, configs: Sequence[DetectorConfig], setting: Setting) -> None:
        """Build what ``configs`` share before their work units run (in the stage, once):
        e.g. a distilled teacher. By default nothing."""

    @property
    def maps(self) -> bool:
        """Whether its done experiments store anomaly maps (patch and image families:
        residuals, patch distances, a classifier's Grad-CAM)."""
        return self.patch or self.images

    @property
    def trains(self) -> bool:
        """Whether each config trains a model of its own per experiment (a work unit of its
        own: ``holdout`` and ``labelled`` families)."""
        return self.holdout or self.labelled

    def fit_labelled(self, X_good: np.ndarray, X_labelled: np.ndarray, y_labelled: np.ndarray,
                     X_eval: np.ndarray, config: DetectorConfig, seed: int) -> Outcome:  # fmt: skip
        """A ``labelled`` family: train on the good training images ``X_good`` and the
        labelled test images (``y_labelled``: True = anomalous), then score ``X_eval``
        (higher = more anomalous); ``Outcome.threshold``: its own decision threshold."""
        raise NotImplementedError

    # --- the plain reference: one estimator per config ----------------------------------
    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        """The scikit-learn estimator of one config (``fit`` then ``score_samples``)."""
        raise NotImplementedError

    def hyperparams(self, config: DetectorConfig) -> Hyper:
        """The config's hyperparameters with the family's defaults filled in."""
        return self.hyper.model_validate(config.kwargs)

    def reference(
        self, X_train: np.ndarray, X_test: np.ndarray, configs: Sequence[DetectorConfig], seed: int
    ) -> Iterator[Outcome]:
        """Yield one ``Outcome`` per config, in order (callers time and bound each step)."""
        for config in configs:
            yield self.reference_one(X_train, X_test, config, seed)

    def reference_one(
        self, X_train: np.ndarray, X_test: np.ndarray, config: DetectorConfig, seed: int
    ) -> Outcome:
        """Fit one estimator; a config's failure is data (its error), not a stage failure."""
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # The study capped its SVMs at max_iter=1000: not converging is expected.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = self.estimator(config.kwargs, seed).fit(X_train)
                t1 = time.perf_counter()
                scores = -np.asarray(model.score_samples(X_test), dtype=np.float64)
                t2 = time.perf_counter()
        except Exception as exc:
            return Outcome(None, time.perf_counter() - t0, 0.0, error_text(exc))
        return Outcome(scores, t1 - t0, t2 - t1, train_scores=in_sample_scores(model, X_train))

    # --- the shared path: every config of a group from the unit's shared quantities -----
    def shares(self, config: DetectorConfig) -> bool:
        """Whether the shared path covers ``config`` (else it runs per config); by default,
        every config of a family that has a shared path."""
        return type(self).shared is not Family.shared

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        """Declare, before anything is computed, what the configs will ask the unit for
        (the kNN depth, the PCA components, the raw rows), so each is computed once."""

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Scored | np.ndarray | BaseException]:
        """Scores of ``data.queries(split)`` for every config, or the exception of a
        config that failed (the others stand). ``split`` names the training set: an
        augmentation choice, or a fold of one (``UnitData.add_folds``); everything is
        read through it (``data.train[split]``, ``data.knn(split)``, ...)."""
        raise NotImplementedError(f"{self.name} has no shared path")

    def shared_outcomes(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Outcome]:
        """One ``Outcome`` per config: the out-of-sample scores (``scores``: the test rows, or
        a fold's held-out rows) and the in-sample training scores, from one call.

        The call's own seconds (less the shared quantities it was first to compute: the
        caller splits those over every experiment that used them) are ``group_s``, and
        ``fit_s`` is their even share per config; ``score_s`` is 0 (fit and score are one
        computation).
        """
        t0, before = time.perf_counter(), set(data.seconds)
        n_test = data.n_scored(split)
        n_bad = data.n_nonfinite(split) if self.needs_finite else 0
        if n_bad:
            results: list[Any] = [ValueError(nonfinite_error(n_bad))] * len(configs)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    results = list(self.shared(data, split, configs, seed))
                except UserError:  # an input problem (an unreadable shard): stops the stage
                    raise
                except Exception as exc:  # the whole group failed: each config records why
                    results = [exc] * len(configs)
        own = time.perf_counter() - t0
        own = max(own - sum(s for name, s in data.seconds.items() if name not in before), 0.0)
        share = own / max(len(configs), 1)
        outcomes = []
        for result in results:
            if isinstance(result, BaseException):
                text = str(result) if n_bad else error_text(result)
                outcomes.append(Outcome(None, share, 0.0, text, group_s=own,
                                        group_size=len(configs)))  # fmt: skip
                continue
            scored = result if isinstance(result, Scored) else Scored(result)
            s = np.asarray(scored.scores, dtype=np.float64)
            m = scored.maps
            outcomes.append(Outcome(s[:n_test], share, 0.0, train_scores=s[n_test:],
                                    maps=None if m is None else m[:n_test],
                                    train_maps=None if m is None else m[n_test:],
                                    group_s=own, group_size=len(configs)))  # fmt: skip
        return outcomes


def _probe_fit(family: Family, params: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = family.estimator(params, 0).fit(_PROBE_X)
        model.score_samples(_PROBE_X[:2])


_probed: dict[tuple[str, tuple], str | None] = {}


def _probe(family: Family, items: tuple[tuple[str, Any], ...]) -> None:
    """A fit with only the probed keys set; cached (one fit per distinct value set)."""
    cache_key = (family.name, items)
    if cache_key not in _probed:
        try:
            _probe_fit(family, dict(items))
            _probed[cache_key] = None
        except Exception as exc:
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            _probed[cache_key] = text[:300]
    error = _probed[cache_key]
    if error is not None:
        shown = ", ".join(f"{k}={v!r}" for k, v in items)
        raise HyperparameterError(items[0][0], f"scikit-learn's {family.name} cannot fit with "
                                  f"{shown} (tried on a few generic feature vectors): "
                                  f"{error}")  # fmt: skip


class SklearnFamily(Family):
    """A family whose reference is one scikit-learn class called with the hyperparameters."""

    estimator_class: ClassVar[type[BaseEstimator]]

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        seed_kw = {"random_state": seed} if self.seeded else {}
        return self.estimator_class(**params, **seed_kw)


def capped(n: int, *limits: int) -> int:
    """``min(n, *limits)``, at least 1: a size the data allows ("fewer when it has fewer")."""
    return max(1, min(n, *limits))


class PCADetector(OutlierMixin, BaseEstimator):
    """Base of plain references that start with PCA to ``min(n_components, n - 1, d)``.

    n centred rows span at most n - 1 dimensions: a further component would be an
    arbitrary direction of zero training variance (whatever the SVD returns), which
    changes the scores of test rows without carrying anything learnt. In float64, the
    precision of the shared path. A subclass scores the projections, the same function
    on both paths: :meth:`score_projected`.
    """

    def __init__(self, n_components: int = 32) -> None:
        self.n_components = n_components

    def fit(self, X: np.ndarray, y: Any = None) -> PCADetector:
        X = np.asarray(X, dtype=np.float64)
        k = capped(self.n_components, len(X) - 1, X.shape[1])
        self.pca_ = PCA(n_components=k, svd_solver="full").fit(X)
        self.z_train_ = self.pca_.transform(X)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        centred_sq = ((X - self.pca_.mean_) ** 2).sum(axis=1)
        return -self.score_projected(self.z_train_, self.pca_.transform(X), centred_sq)

    @staticmethod
    def score_projected(
        z_train: np.ndarray, z_queries: np.ndarray, centred_sq: np.ndarray
    ) -> np.ndarray:
        """Scores (higher = more anomalous) of queries from their projections on the top k
        components, given the training projections and each query's ``||x - mean||^2``."""
        raise NotImplementedError


class PCAFamily(Family):
    """A family on the unit's shared PCA basis: ``pca_components`` (capped to
    ``min(n_train - 1, n_features)``, see :class:`PCADetector`) and its detector's
    :meth:`PCADetector.score_projected` on the projections."""

    class hyper(Hyper):
        pca_components: PositiveInt = 32

    detector: ClassVar[type[PCADetector]]

    def estimator(self, params: dict[str, Any], seed: int) -> BaseEstimator:
        return self.detector(n_components=params.get("pca_components", 32))

    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        pca = PCA(n_components=params.get("pca_components", 32), svd_solver="full")
        return [(pca, {"n_components": "pca_components"})]

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        needs.reserve(pca=max(self.hyperparams(c).pca_components for c in configs))

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Scored | np.ndarray | BaseException]:
        pca = data.pca(split)
        n, d = len(data.train[split]), data.n_features
        out: list[Scored | np.ndarray | BaseException] = []
        for config in configs:
            k = capped(self.hyperparams(config).pca_components, n - 1, d)
            try:
                z_train, z_queries = pca.z_train[:, :k], pca.z_queries[:, :k]
                out.append(self.detector.score_projected(z_train, z_queries, pca.centred_sq))
            except Exception as exc:
                out.append(exc)
        return out
