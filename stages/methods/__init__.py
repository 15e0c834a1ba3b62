"""Detector families (methods), one module each, and the grid that expands them.

Every family is one class in its own module (``stages/methods/<module>.py``) holding its
hyperparameters, its plain scikit-learn reference and its shared path side by side
(:mod:`stages.methods.base` says what each part does); :data:`FAMILIES` lists them. Adding
a family is one module, one line below and its grid in params.yaml (``evaluate.detectors``).
The grids are data only: the study's 71 configs live in params.yaml / params/study.yaml.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.errors import UserError
from stages.methods.anomalib_models import AnomalibFamily
from stages.methods.base import (
    DetectorConfig,
    Family,
    HyperparameterError,
    Outcome,
    Scored,
    error_text,
)
from stages.methods.elliptic import EllipticEnvelopeFamily
from stages.methods.faults import CrashFamily, HangFamily
from stages.methods.iforest import IsolationForestFamily
from stages.methods.kde import KernelDensityFamily
from stages.methods.kmeans import KMeansDistanceFamily
from stages.methods.knn import KNNDistanceFamily
from stages.methods.labelled import SimCLRProbeFamily, SupervisedCNNFamily
from stages.methods.lof import LocalOutlierFactorFamily
from stages.methods.mahalanobis import MahalanobisFamily
from stages.methods.ocsvm import OneClassSVMFamily
from stages.methods.padim import PaDiMFamily
from stages.methods.patch_knn import PatchKNNFamily
from stages.methods.patch_mahalanobis import PatchMahalanobisFamily
from stages.methods.patchcore import PatchCoreFamily
from stages.methods.pca_reconstruction import PCAReconstructionFamily
from stages.methods.reconstruction import (
    ConvAutoencoderFamily,
    EncoderAutoencoderFamily,
    VAEFamily,
)
from stages.methods.unit import Needs, UnitData

__all__ = ["FAMILIES", "DetectorConfig", "DetectorSpec", "Family", "Needs", "Outcome",
           "Scored", "UnitData", "error_text", "expand_detectors"]  # fmt: skip

FAMILIES: dict[str, Family] = {
    family.name: family()
    for family in (
        OneClassSVMFamily,
        IsolationForestFamily,
        KernelDensityFamily,
        LocalOutlierFactorFamily,
        EllipticEnvelopeFamily,
        KMeansDistanceFamily,
        KNNDistanceFamily,
        MahalanobisFamily,
        PCAReconstructionFamily,
        PatchCoreFamily,
        PaDiMFamily,
        PatchKNNFamily,
        PatchMahalanobisFamily,
        AnomalibFamily,
        ConvAutoencoderFamily,
        VAEFamily,
        EncoderAutoencoderFamily,
        SupervisedCNNFamily,
        SimCLRProbeFamily,
        CrashFamily,
        HangFamily,
    )
}

GridValue = str | int | float | bool | None


class DetectorSpec(BaseModel):
    """One entry of ``evaluate.detectors``: every combination of ``grid`` plus ``fixed``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    grid: dict[str, Annotated[list[GridValue], Field(min_length=1)]] = {}
    fixed: dict[str, GridValue] = {}


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


def _validate(family: Family, config: DetectorConfig, spec: DetectorSpec, where: str) -> None:
    """scikit-learn's own validation of the config's values, at plan time: a value it rejects
    would fail every experiment of the config, so it is a params error naming the key."""
    try:
        family.validate(config)
    except HyperparameterError as exc:
        if exc.key in spec.grid:
            at = f"{where}.grid.{exc.key}"
        elif exc.key in spec.fixed:
            at = f"{where}.fixed.{exc.key}"
        else:
            at = where
        raise UserError(f"{at}: {exc} (config {config.name})") from None


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
            _validate(family, config, spec, where)
            if config in seen:
                raise UserError(f"{where}: {config.name} is already in "
                                f"{section}[{seen[config]}]")  # fmt: skip
            seen[config] = i
            configs.append(config)
    return configs
