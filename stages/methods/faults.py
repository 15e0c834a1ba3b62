"""Test-only families that misbehave on purpose: ``crash`` and ``hang``.

They prove the engine's isolation (a worker killed inside a fit is one ``crashed`` row),
its per-experiment timeout, and kill-and-resume. Rejected in params unless
``evaluate.allow_test_detectors: true``; no shared path (they run per config).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin

from stages.methods.base import Hyper, PositiveFloat, SklearnFamily


class CrashDetector(OutlierMixin, BaseEstimator):
    """Kills its own process in ``fit`` (abort or segfault)."""

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
    """Sleeps ``seconds`` in ``fit`` (None: forever), then scores by distance to the mean.

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
