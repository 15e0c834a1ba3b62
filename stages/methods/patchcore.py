"""PatchCore (Roth et al. 2022): distance of each patch to a coreset of training patches.

The memory bank is every patch of the training images (their augmented copies included
when the split is augmented), thinned to ``coreset_ratio`` by the greedy k-center order on
a seeded random projection (:mod:`stages.patch.patchcore`); ratio 1 keeps every patch (no
selection to make). A patch scores its distance to the nearest bank patch, an image its
largest patch score, reweighted by the paper's eq. 7 when ``n_neighbors`` > 1 (9, the
paper's and anomalib's; 1: the plain maximum).

Shared path: one greedy order per training set and seed (:func:`coreset_prefix`, also
PatchKNN's and PatchMahalanobis'), as long as the largest ratio the unit's families
reserved: a smaller ratio's coreset is a prefix of it. The distances to the largest bank
are computed once, block by block, and every ratio takes the minimum over its own prefix
of columns (:func:`stages.patch.patchcore.prefix_nearest`). The plain reference runs its
own greedy selection and nearest-bank search per config.

This module also holds what the patch families share: the ratio's validation, the
coreset bank of either path, and the plain reference's driver (:class:`PatchFamily`).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError
from sklearn.base import BaseEstimator

from stages.methods.base import (
    DetectorConfig,
    Family,
    Hyper,
    Outcome,
    PositiveInt,
    Scored,
    error_text,
)
from stages.methods.unit import Needs, UnitData
from stages.patch.patchcore import (
    coreset_size,
    greedy_coreset_order,
    image_scores,
    patch_scores,
    prefix_nearest,
)


def _check_ratio(value: float) -> float:
    if not 0 < value <= 1:  # NaN too
        raise PydanticCustomError("coreset_ratio", "Input should be in (0, 1]")
    return value


# The share of the training patches kept in the bank: (0, 1], a one-line error otherwise.
CoresetRatio = Annotated[float, AfterValidator(_check_ratio)]


# --- the coreset bank, on both paths ---------------------------------------------------------
def reserve_coreset(needs: Needs, ratios: Sequence[float]) -> None:
    """Reserve the raw rows and the greedy order for the largest ratio below 1 (ratio 1
    selects nothing: every patch)."""
    needs.reserve(raw=True, coreset=max((r for r in ratios if r < 1), default=0.0))


def training_patches(data: UnitData, split: Hashable) -> np.ndarray:
    """Every patch of the split's training rows, ``(n_rows * h * w, c)``, row-major."""
    return data.patches(data.train[split]).reshape(-1, data.grid[2])


def coreset_prefix(data: UnitData, split: Hashable, seed: int, size: int) -> np.ndarray:
    """The first ``size`` indices of the greedy order of the split's training patches.

    The order is computed once per training set and seed, ``coreset_size(n,
    data.needs.coreset)`` long, whichever patch family asks first (one cache name); each
    ratio's coreset is a prefix of it."""
    n = len(data.train[split]) * data.grid[0] * data.grid[1]
    reserved = coreset_size(n, data.needs.coreset) if data.needs.coreset > 0 else 0
    if size > reserved:
        raise RuntimeError(f"a coreset of {size} of {n} patches was not reserved "
                           f"(Needs.coreset {data.needs.coreset}: {reserved})")  # fmt: skip

    def compute() -> np.ndarray:
        return greedy_coreset_order(training_patches(data, split), reserved, seed)

    return data.cached(f"coreset[{split}][{seed}]", compute)[:size]


def shared_bank(
    data: UnitData, split: Hashable, seed: int, ratios: Sequence[float]
) -> tuple[np.ndarray, list[int]]:
    """The bank of the largest ratio and each ratio's size (its prefix of the bank):
    the shared greedy order's patches, then, when a ratio is 1, the other patches in
    their natural order (ratio 1 is every patch: their order only breaks exact ties)."""
    patches = training_patches(data, split)
    n = len(patches)
    sizes = [coreset_size(n, r) for r in ratios]
    below = [m for r, m in zip(ratios, sizes, strict=True) if r < 1]
    if not below:
        return patches, sizes
    order = coreset_prefix(data, split, seed, max(below))
    if max(ratios) >= 1:
        order = np.concatenate([order, np.setdiff1d(np.arange(n), order)])
    return patches[order], sizes


def plain_bank(patches: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """The plain reference's bank: its own greedy selection for its ratio (all at 1)."""
    if ratio >= 1:
        return patches
    return patches[greedy_coreset_order(patches, coreset_size(len(patches), ratio), seed)]


def as_patches(X: np.ndarray) -> np.ndarray:
    """``(n, h, w, c)`` rows as ``(n, h * w, c)``, rejecting non-finite features as
    scikit-learn's input check does."""
    X = np.asarray(X)
    if X.ndim != 4:
        raise ValueError(f"a patch family needs (n, h, w, c) rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("Input contains NaN or infinity.")
    return X.reshape(len(X), -1, X.shape[3])


# --- the plain reference's driver ------------------------------------------------------------
class PatchDetector(BaseEstimator):
    """A plain patch detector: ``fit`` on ``(n, h, w, c)`` training rows, then
    :meth:`score_images`; ``score_samples`` is scikit-learn's orientation."""

    def fit(self, X: np.ndarray, y: Any = None) -> PatchDetector:
        raise NotImplementedError

    def score_images(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores ``(n,)`` float64 and patch-score grids ``(n, h, w)`` float32."""
        raise NotImplementedError

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -self.score_images(X)[0]


class PatchFamily(Family):
    """A family of patch detectors: rows are ``(n, h, w, c)`` patch grids (``patch``);
    ``detector`` is its plain reference, built with the defaults filled in."""

    patch = True
    detector: ClassVar[type[PatchDetector]]

    def estimator(self, params: dict[str, Any], seed: int) -> PatchDetector:
        seed_kw = {"random_state": seed} if self.seeded else {}
        return self.detector(**self.hyper.model_validate(params).model_dump(), **seed_kw)

    def checked_estimators(
        self, params: dict[str, Any]
    ) -> list[tuple[BaseEstimator, dict[str, str]]]:
        """None: the pydantic model checks every hyperparameter."""
        return []

    def reference_one(
        self, X_train: np.ndarray, X_test: np.ndarray, config: DetectorConfig, seed: int
    ) -> Outcome:
        """One plain detector: test scores and grids, then its training rows' in-sample."""
        t0 = time.perf_counter()
        try:
            model = self.estimator(config.kwargs, seed).fit(X_train)
            t1 = time.perf_counter()
            scores, maps = model.score_images(X_test)
            t2 = time.perf_counter()
            train_scores, train_maps = model.score_images(X_train)
        except Exception as exc:
            return Outcome(None, time.perf_counter() - t0, 0.0, error_text(exc))
        return Outcome(scores, t1 - t0, t2 - t1, train_scores=train_scores, maps=maps,
                       train_maps=train_maps)  # fmt: skip


# --- PatchCore -------------------------------------------------------------------------------
class PatchCoreDetector(PatchDetector):
    """Plain PatchCore: greedy coreset of the training patches, nearest-bank distances."""

    def __init__(
        self, coreset_ratio: float = 0.1, n_neighbors: int = 9, random_state: int = 0
    ) -> None:
        self.coreset_ratio = coreset_ratio
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> PatchCoreDetector:
        patches = as_patches(X)
        self.bank_ = plain_bank(patches.reshape(-1, patches.shape[2]), self.coreset_ratio,
                                self.random_state)  # fmt: skip
        return self

    def score_images(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        patches = as_patches(X)
        scores, nearest = patch_scores(patches, self.bank_)
        images = image_scores(scores, nearest, patches, self.bank_, self.n_neighbors)
        return images, scores.reshape(np.shape(X)[:3]).astype(np.float32)


class PatchCoreFamily(PatchFamily):
    class hyper(Hyper):
        coreset_ratio: CoresetRatio = 0.1
        n_neighbors: PositiveInt = 9

    name = "PatchCore"
    seeded = True  # the projection and the greedy start
    detector = PatchCoreDetector

    def reserve(self, needs: Needs, configs: Sequence[DetectorConfig]) -> None:
        reserve_coreset(needs, [self.hyperparams(c).coreset_ratio for c in configs])

    def shared(
        self, data: UnitData, split: Hashable, configs: Sequence[DetectorConfig], seed: int
    ) -> list[Scored | BaseException]:
        params = [self.hyperparams(c) for c in configs]
        ratios = sorted({p.coreset_ratio for p in params})
        bank, sizes = shared_bank(data, split, seed, ratios)
        grids = data.patches(data.queries(split))
        patches = grids.reshape(len(grids), -1, grids.shape[3])
        found = prefix_nearest(patches.reshape(-1, patches.shape[2]), bank, sizes)
        out: list[Scored | BaseException] = []
        for p in params:
            i = ratios.index(p.coreset_ratio)
            scores = found[i][0].reshape(patches.shape[:2])
            nearest = found[i][1].reshape(patches.shape[:2])
            try:
                images = image_scores(scores, nearest, patches, bank[: sizes[i]], p.n_neighbors)
            except Exception as exc:
                out.append(exc)
                continue
            out.append(Scored(images, scores.reshape(grids.shape[:3]).astype(np.float32)))
        return out
