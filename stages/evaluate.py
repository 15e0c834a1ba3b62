"""Stage ``evaluate``: every detector config on every feature set, results into SQL.

An experiment is category x augmented x extractor (backbone, init, layer, representation)
x detector config x seed. It fits on the train good images (originals, plus the augmented
copies when augmented) and scores every test image; higher score = more anomalous, AUROC
and average precision with anomalies as the positive class, plus F1, precision, recall,
accuracy and the confusion matrix at an honest threshold (a quantile of the training
images' out-of-fold scores), at the in-sample one and at the oracle max-F1 threshold
(``stages.metrics``).

A work unit is one feature set with all its pending experiments (both augmentation
choices); Dask workers read its Parquet shards themselves and return rows; this process is
the only writer of the database and upserts each unit's rows as it arrives, so a killed
run resumes where it stopped: ``done`` experiments are not recomputed (unless stored
with another ``threshold_quantile``), and failed/crashed/timeout ones are retried only
with ``evaluate.retry_failed: true`` or ``OOD_RETRY_FAILED=1``. The stage exits 0 once
every experiment has a final status.

Failures are classified. Only what an experiment hits on valid input (an estimator error
such as a singular covariance, a worker killed inside a fit, a timeout) is a final
``failed`` / ``crashed`` / ``timeout`` row. Input problems stop the stage with one line
saying what to rerun (exit 2) and are never stored: before anything is written, the stage
checks that ``feature_sets.json`` lists exactly the configured feature sets, that each
manifest is there and is the one listed, that the shards agree with it (footers: rows,
dimension, shard hashes), that the rows are the images of the current image and augment
indexes (content hash recomputed; the augment index checked against ``augment.transforms``),
and that an ``augmented`` experiment has augmented rows to train on; a shard unreadable
when a worker reads it stops the stage too. A hyperparameter scikit-learn rejects is a
params error at plan time (``stages.methods``). Rows stored as ``failed`` for an input
problem by earlier versions (their error says a shard or manifest could not be read) are
run again without ``retry_failed``.

One run per database: a second evaluate on the same database is refused with one line
naming the first (``stages.results_db.single_writer``: a ``flock`` on ``<db>.lock`` for
SQLite, released by the kernel however the run ends; an advisory lock on PostgreSQL).

    python -m stages.evaluate [--params params.yaml]

Params (section ``evaluate``; the feature sets come from ``<extract.out>/feature_sets.json``):

- ``db_url`` (``sqlite:///results/results.sqlite``): any SQLAlchemy URL (SQLite runs in WAL
  mode; ``postgresql+psycopg://user@host/db`` works too).
- ``summary`` (``results/evaluate_summary.json``): counts by status, a DVC metric.
- ``scratch`` (``cache/evaluate``): timeout notes and fault reports; must be on a filesystem
  shared with the workers, like the feature shards.
- ``seeds`` ([0]); ``timeout_s`` (600, null = none): per experiment, fit + score.
- ``shared`` (true): each (augmented, seed, family) group is one call of its family's
  shared path (``stages.methods``) on the unit's shared quantities (``UnitData``): one
  float64 Gram over all the unit's rows (streamed from the shards unless a family needs
  the raw rows), and per training set the query distances, one sorted kNN table and one
  PCA basis, each computed once for every family that asks. One call scores the test rows
  and, in-sample, the training rows (the honest threshold). A config without a shared path
  (``Family.shares`` false: the test-only families, a kernel density or LOF with a
  non-euclidean metric) runs per config, logged once per run. Scores agree with the plain
  estimators (a test per family), except where a family's module says its shared path is
  more exact than scikit-learn (the kernel density's float64 log-sum-exp). Timing:
  ``fit_s`` is the experiment's amortised share of everything it needed: its family
  call's own seconds split evenly over the call's configs, plus each shared quantity it
  used split evenly over the experiments that used it; ``score_s`` is 0 (fit and score
  are one computation). ``group_s`` is the family call's own measured seconds (less the
  shared quantities it computed first) and ``group_size`` the configs it served; per
  config, ``group_s`` is ``fit_s + score_s`` and the size 1. Deadlines: a group call gets
  ``timeout_s`` x the unit's experiments still to run (it may compute the shared
  quantities of all of them); past it the unit is split down to one experiment, whose
  whole computation gets ``timeout_s``. false: one scikit-learn estimator per config on
  the raw features (the reference; ``fit_s``/``score_s`` as measured).
- ``threshold_quantile`` (0.99): the honest threshold is this quantile of the training
  images' out-of-fold scores, so about ``1 - q`` of unseen good images score above it.
- ``threshold_folds`` (5): k of the k-fold (seeded with the experiment's seed; augmented
  copies in their original's fold) that scores each training image with a model that did
  not see it: one more family call per fold on the shared path, one more fit per config
  and fold on the plain path. The in-sample variant (``*_insample``: a KDE or LOF sees the
  point itself, so unseen good images exceed it far more often) is stored next to it. 0:
  honest = in-sample. Done experiments stored with another quantile or fold count (or
  before out-of-fold scores existed) are rerun, and the log says how many.
- ``retry_failed`` (false; or env ``OOD_RETRY_FAILED=1``): rerun failed/crashed/timeout.
- ``allow_test_detectors`` (false): enables the test-only ``crash`` and ``hang`` families.
- ``augmentation`` (``auto``): ``auto`` = augmented true and false where the category has
  transforms, false only elsewhere; ``both`` = both everywhere (the study); ``off``.
- ``detectors``: list of ``{family, grid: {name: [values]}, fixed: {name: value}}`` (the
  families: ``stages.methods.FAMILIES``; the study's 71 configs: params/study.yaml).
- ``device`` (``auto``): where the families that train a network (reconstruction,
  labelled, anomalib) run it: ``auto`` (CUDA when PyTorch sees it), ``cpu``, ``cuda``
  (every visible GPU, one GPU worker each) or ``cuda:N``; CUDA not seen here is a one-line
  error (with ``engine.address``, an explicit ``cuda`` is the workers' to check). Such a
  unit on CUDA asks for the Dask worker resource ``GPU`` (1); the local cluster's first
  workers offer it, one per GPU. Stored per experiment in ``experiments.device`` (not in
  its key: a CPU result stays done when a GPU appears).
- ``engine``: ``{address: null, n_workers: 2, threads_per_worker: 1, memory_limit: auto,
  allowed_failures: 0, connect_timeout_s: 10}``; ``address`` connects to a running Dask
  scheduler instead of starting a LocalCluster (workers need this repository importable
  and the same paths); it must answer within ``connect_timeout_s``.

Stored results of experiments no longer in the grid (e.g. after the features changed,
which changes their content hash and so the key) stay in the database; the summary counts
only the current grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import sklearn
from distributed import Client
from pydantic import Field, ValidationError, field_validator
from tqdm import tqdm

from stages import few_labels
from stages.anomaly_maps import (
    MAP_SIZE,
    grid_path,
    load_masks,
    write_embeddings,
    write_examples,
    write_grids,
)
from stages.augment import INDEX as AUGMENT_INDEX
from stages.augment import check_augment_index, train_originals
from stages.dataset import DatasetInfo, dataset_infos, read_index
from stages.device import GPU_RESOURCE, DeviceName, resolve_device
from stages.engine import EngineParams, check_scheduler, dask_client, deadline, run_units
from stages.errors import UserError, run_cli, setup_logging
from stages.features import (
    CONFIG_KEYS,
    FeatureSet,
    check_shards,
    content_hash_of,
    feature_set_inputs,
    has_maps,
    hashed_config,
    is_image,
    is_patch,
    iter_shard_tables,
    load_feature_set,
    require_manifest,
)
from stages.io import remove_stale_temps, stable_hash, write_json_atomic
from stages.methods import (
    FAMILIES,
    DetectorConfig,
    DetectorSpec,
    Family,
    Needs,
    Outcome,
    UnitData,
    error_text,
    expand_detectors,
)
from stages.methods.base import Setting, current_setting, run_setting, training_dir
from stages.methods.unit import fold_assignment, image_groups
from stages.metrics import THRESHOLD_FIELDS, honest_threshold, ranking_metrics, threshold_metrics
from stages.params import (
    OutputFile,
    OutputFolder,
    Section,
    load_params,
    load_section,
    stage_args,
)
from stages.patch.maps import anomaly_maps
from stages.pixel_metrics import pixel_metrics
from stages.results_db import (
    FINAL_NOT_DONE,
    ExperimentRow,
    failed_errors,
    open_db,
    record_datasets,
    single_writer,
    status_counts,
    statuses,
    threshold_settings,
    upsert,
)

RETRY_ENV = "OOD_RETRY_FAILED"
FEATURE_SETS_FILE = "feature_sets.json"

log = logging.getLogger("stages.evaluate")


class EvaluateParams(Section):
    """The ``evaluate`` section of params.yaml."""

    db_url: str = "sqlite:///results/results.sqlite"
    summary: OutputFile = "results/evaluate_summary.json"
    scratch: OutputFolder = "cache/evaluate"  # timeout notes, fault reports (shared with workers)
    seeds: Annotated[list[int], Field(min_length=1)] = [0]
    timeout_s: Annotated[float, Field(gt=0)] | None = 600.0
    threshold_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.99
    # k of the k-fold out-of-fold training scores of the honest threshold; 0: none (the
    # honest threshold is then the in-sample one, as before they existed; cheaper)
    threshold_folds: Annotated[int, Field(ge=0, le=100)] = 5
    retry_failed: bool = False
    allow_test_detectors: bool = False
    # auto: augmented=true only where augment.transforms[category] is non-empty;
    # both: augmented true and false for every category (the study's 68,160); off: false only.
    augmentation: Literal["auto", "both", "off"] = "auto"
    shared: bool = True  # families' shared paths (stages.methods); false = one estimator per config
    # patch experiments' test-image patch-score grids, one Parquet file per experiment
    maps: OutputFolder = "results/maps"
    # The grid: data only (params.yaml; the study's 71 configs in params/study.yaml).
    detectors: Annotated[list[DetectorSpec], Field(min_length=1)]
    engine: EngineParams = EngineParams()
    # The trained families' networks: auto (CUDA when PyTorch sees it), cpu, cuda, cuda:N.
    device: DeviceName = "auto"

    @field_validator("threshold_folds")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("1 fold has nothing to hold out: use 0 (in-sample) or >= 2")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("a seed is listed twice")
        return value


class FeatureSetEntry(Section):
    """One line of ``<extract.out>/feature_sets.json`` (written by the extract stage)."""

    model_config = {**Section.model_config, "extra": "ignore"}

    category: str
    backbone: str
    init: str
    layer: str
    representation: str
    folder: str
    content_hash: str
    n_rows: int | None = None
    dim: int | None = None
    dataset: str | None = None  # the category's content identity (set by the stage, not listed)


@dataclass(frozen=True)
class Planned:
    """One experiment of a work unit."""

    key: str
    augmented: bool
    detector: DetectorConfig
    seed: int


@dataclass(frozen=True)
class Unit:
    """A work unit: one feature set and the experiments to run on it."""

    features: FeatureSetEntry
    experiments: tuple[Planned, ...]
    timeout_s: float | None
    notes: str  # folder of deadline notes, one ``<key>.json`` per timed-out experiment
    threshold_quantile: float = 0.99
    shared: bool = True
    threshold_folds: int = 5
    index: str = ""  # the image index (absolute): where a patch unit finds its test masks
    workdir: str = "."  # relative paths in the index are relative to this
    scratch: str = ""  # evaluate.scratch (absolute): training checkpoints under training/
    device: str = "cpu"  # a unit that trains: evaluate.device as resolved (stage_device)

    def label(self) -> str:
        f = self.features
        return f"{f.category} {f.backbone}-{f.init} {f.layer} {f.representation}"


# --- planning --------------------------------------------------------------------------------


def experiment_key(
    features: FeatureSetEntry, augmented: bool, detector: DetectorConfig, seed: int
) -> str:
    """Hash of the canonical experiment config and the feature set's content hash."""
    return stable_hash(
        {
            "category": features.category,
            "augmented": augmented,
            "backbone": features.backbone,
            "init": features.init,
            "layer": features.layer,
            "representation": features.representation,
            "detector": detector.family,
            "hyperparams": detector.kwargs,
            "seed": seed,
            "features": features.content_hash,
        }
    )


def augmentation_choices(transforms: Sequence[str], policy: str) -> list[bool]:
    if policy == "off":
        return [False]
    if policy == "both" or transforms:
        return [False, True]
    return [False]


def plan(
    feature_sets: Sequence[FeatureSetEntry],
    transforms: dict[str, list[str]],
    detectors: Sequence[DetectorConfig],
    seeds: Sequence[int],
    augmentation: str = "auto",
) -> list[tuple[FeatureSetEntry, list[Planned]]]:
    """Every experiment of the grid, grouped by feature set (the work unit).

    A deterministic family (no ``random_state``) runs once, under the first seed: more
    seeds would only repeat identical scores. Patch families (``Family.patch``) run on the
    patch feature sets (representation ``patch``) only, image families (``Family.images``)
    on the image feature sets (``image``) only, the image-level ones on the others.
    """
    units = []
    for fs in feature_sets:
        patch, image = is_patch(fs.representation), is_image(fs.representation)
        experiments = [
            Planned(experiment_key(fs, aug, det, seed), aug, det, seed)
            for aug in augmentation_choices(transforms.get(fs.category, []), augmentation)
            for seed in seeds
            for det in detectors
            if (seed == seeds[0] or FAMILIES[det.family].seeded)
            and FAMILIES[det.family].patch == patch
            and FAMILIES[det.family].images == image
        ]
        units.append((fs, experiments))
    return units


def config_fields(features: FeatureSetEntry, exp: Planned) -> dict[str, Any]:
    """The experiment's config as the typed columns of ``experiments``."""
    return {
        "category": features.category,
        "augmented": exp.augmented,
        "backbone": features.backbone,
        "init": features.init,
        "layer": features.layer,
        "representation": features.representation,
        "detector": exp.detector.family,
        "hyperparams": json.dumps(exp.detector.kwargs, sort_keys=True),
        "detector_name": exp.detector.name,
        "seed": exp.seed,
        "feature_hash": features.content_hash,
        "dataset": features.dataset,
    }


# --- worker side -----------------------------------------------------------------------------


def _honest_metrics(
    y: np.ndarray, scores: np.ndarray, outcome: Outcome, quantile: float, folds: int
) -> dict[str, Any]:
    """Threshold metrics: honest from the out-of-fold training scores, in-sample from the
    fitted model's own training scores (for comparison), oracle from the test labels."""
    in_sample = threshold_metrics(y, scores, outcome.train_scores, quantile)
    if outcome.threshold is not None:  # a classifier's own threshold
        out = threshold_metrics(y, scores, None, quantile, outcome.threshold)
    else:
        out = threshold_metrics(y, scores, outcome.oof_scores, quantile) if folds else in_sample
    out.update({f"{f}_insample": in_sample[f"{f}_honest"] for f in THRESHOLD_FIELDS})
    return {"threshold_quantile": quantile, "threshold_folds": folds, **out}


def _pixel_fields(outcome: Outcome, masks: np.ndarray, quantile: float,
                  folds: int, sigma: float) -> dict[str, float | None]:  # fmt: skip
    """The pixel-level columns of an experiment with maps: its test grids as anomaly maps
    (``stages.patch.maps``, blurred with the family's ``sigma``) against the masks; the
    honest threshold is the ``quantile`` of every pixel of the training images' maps,
    out-of-fold (in-sample with 0 folds)."""
    maps = anomaly_maps(np.asarray(outcome.maps, dtype=np.float32), MAP_SIZE, sigma)
    train = outcome.oof_maps if folds else outcome.train_maps
    threshold = None
    if train is not None and len(train):
        train_maps = anomaly_maps(np.asarray(train, dtype=np.float32), MAP_SIZE, sigma)
        if np.isfinite(train_maps).all():
            threshold = honest_threshold(train_maps.reshape(-1), quantile)
        del train_maps
    try:
        m = pixel_metrics(maps, masks, threshold)
    except ValueError:  # non-finite map pixels: no pixel metrics (the image metrics stand)
        return {}
    return {
        "pixel_auroc": m["pixel_auroc"],
        "aupro": m["aupro"],
        "pixel_threshold_honest": m["pixel_threshold"],
        "pixel_f1_honest": m["pixel_f1"],
        "pixel_precision_honest": m["pixel_precision"],
        "pixel_recall_honest": m["pixel_recall"],
        "pixel_threshold_oracle": m["pixel_threshold_oracle"],
        "pixel_f1_oracle": m["pixel_f1_oracle"],
    }


def _row(features: FeatureSetEntry, exp: Planned, outcome: Outcome, y: np.ndarray,
         fs_meta: dict[str, Any], quantile: float, folds: int,
         masks: np.ndarray | None = None, crop: bool = True) -> ExperimentRow:  # fmt: skip
    row = ExperimentRow(
        key=exp.key, config=config_fields(features, exp), status="failed",
        fit_s=outcome.fit_s, score_s=outcome.score_s, error=outcome.error, **fs_meta,
        group_s=outcome.fit_s + outcome.score_s if outcome.group_s is None else outcome.group_s,
        group_size=outcome.group_size or 1,
    )  # fmt: skip
    if outcome.error is not None:
        return row
    scores = np.asarray(outcome.scores, dtype=np.float64)
    if scores.shape != y.shape:
        row.error = f"detector returned {scores.shape} scores for {y.shape[0]} test images"
        return row
    maps = outcome.maps  # patch-score grids: stored, and the pixel-level metrics
    if maps is not None and (np.ndim(maps) != 3 or len(maps) != y.shape[0]):
        row.error = f"detector returned maps of shape {np.shape(maps)} for {y.shape[0]} test images"
        return row
    if maps is not None and masks is not None:
        sigma = FAMILIES[exp.detector.family].map_sigma
        row.pixel = _pixel_fields(outcome, masks, quantile, folds, sigma)
        row.grids = np.asarray(maps, dtype=np.float16)
        row.grid_meta = {"category": features.category, "backbone": features.backbone,
                         "crop": crop, "sigma": sigma}  # fmt: skip
    return replace(
        row,
        status="done",
        **ranking_metrics(y, scores),  # ties within rounding error count half
        n_nan=int(np.isnan(scores).sum()),
        n_posinf=int(np.isposinf(scores).sum()),
        n_neginf=int(np.isneginf(scores).sum()),
        thresholds=_honest_metrics(y, scores, outcome, quantile, folds),
        scores=scores.tolist(),
    )  # fmt: skip


def unit_masks(unit: Unit, fs: FeatureSet) -> np.ndarray | None:
    """The test images' masks in the model's geometry (``stages.anomaly_maps``), for a unit
    whose experiments make maps (a patch or image feature set; else ``None``): read from the
    image index's mask paths."""
    if not has_maps(unit.features.representation) or not unit.index:
        return None
    table = read_index(unit.index).select(["category", "image_id", "path", "mask_path"])
    rows = {r["image_id"]: r for r in table.to_pylist() if r["category"] == fs.manifest.get(
        "category", unit.features.category)}  # fmt: skip
    ids = fs.image_id[fs.rows("test")]
    missing = [i for i in ids if i not in rows]
    if missing:
        raise UserError(f"{unit.index}: test image {missing[0]} of {unit.features.folder} is "
                        f"not in the image index; {RERUN_EXTRACT}")  # fmt: skip
    root = Path(unit.workdir)
    paths = [rows[i]["mask_path"] for i in ids]
    return load_masks([None if p is None else str(root / p) for p in paths],
                      [str(root / rows[i]["path"]) for i in ids],
                      str(fs.manifest.get("backbone", unit.features.backbone)),
                      bool(fs.manifest.get("crop", True)))  # fmt: skip


def _grid_of(fs: FeatureSet, representation: str) -> tuple[int, int, int] | None:
    """A patch feature set's (h, w, c), an image feature set's (3, h, w), from its
    manifest's ``feature_shape``; ``None`` for the others (rows stay vectors)."""
    if not has_maps(representation):
        return None
    shape = fs.manifest.get("feature_shape")
    if not isinstance(shape, list) or len(shape) != 3:
        what = "[3, h, w]" if is_image(representation) else "[h, w, c]"
        raise UserError(f"{fs.manifest.get('folder', 'feature set')}: the manifest needs its "
                        f"feature_shape {what}; {RERUN_EXTRACT}")  # fmt: skip
    return int(shape[0]), int(shape[1]), int(shape[2])


def _per_image(fs: FeatureSet) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    test = fs.rows("test")
    y = fs.is_anomaly[test].astype(bool)
    per_image = {
        "image_ids": fs.image_id[test].tolist(),
        "defect_types": fs.defect_type[test].tolist(),
        "is_anomaly": y.tolist(),
    }
    return test, y, per_image


def _check_hash(features: FeatureSetEntry, manifest: dict[str, Any]) -> None:
    """The feature set is still the one listed (an input problem otherwise: stops the stage)."""
    if manifest.get("content_hash") != features.content_hash:
        raise UserError(
            f"{features.folder}: content hash {manifest.get('content_hash')} differs from "
            f"{FEATURE_SETS_FILE} ({features.content_hash}); rerun the extract stage "
            "(dvc repro extract)"
        )


def _group_by(exp: Planned) -> tuple[bool, int, str]:
    return exp.augmented, exp.seed, exp.detector.family


def _per_config_rows(
    unit: Unit, fs: FeatureSet, experiments: Sequence[Planned]
) -> list[ExperimentRow]:
    """The reference path: one scikit-learn estimator per config, each under its deadline."""
    test, y, per_image = _per_image(fs)
    grid = _grid_of(fs, unit.features.representation)
    shape = (-1, *grid) if grid else (len(fs.X), -1)  # a patch family gets (n, h, w, c)
    X = fs.X.reshape(shape)
    X_test = X[test]
    masks = unit_masks(unit, fs)
    crop = bool(fs.manifest.get("crop", True))  # the geometry of maps and masks
    rows = []
    for (augmented, seed, family), group in groupby(experiments, key=_group_by):
        group = list(group)
        train = fs.rows("train", augmented)
        X_train = X[train]
        folds = (fold_assignment(image_groups(fs.image_id[train]), unit.threshold_folds, seed)
                 if unit.threshold_folds else None)  # fmt: skip
        meta = {"n_train": len(X_train), "n_test": len(X_test), "dim": fs.X.shape[1]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. LOF's n_neighbors > n_samples notice
            outcomes = FAMILIES[family].reference(
                X_train, X_test, [e.detector for e in group], seed
            )
            holdout = FAMILIES[family].holdout
            if FAMILIES[family].labelled:
                rows += [labelled_row(unit, exp, X_train, X_test, y, meta, per_image, masks,
                                      crop) for exp in group]  # fmt: skip
                continue
            for exp in group:
                setting = Setting(unit.index, unit.workdir, unit.scratch, crop,
                                  unit.features.category, exp.key, device=unit.device)  # fmt: skip
                with deadline(unit.timeout_s, Path(unit.notes) / f"{exp.key}.json"), \
                        run_setting(setting):  # fmt: skip
                    if holdout:
                        outcome = holdout_outcome(FAMILIES[family], X_train, X_test, folds,
                                                  exp.detector, seed)  # fmt: skip
                    else:
                        outcome = next(outcomes)
                    if outcome.error is None and folds is not None and not holdout:
                        reference_oof(FAMILIES[family], outcome, X_train, folds, exp.detector,
                                      seed)  # fmt: skip
                if setting.scratch:  # a finished experiment's training checkpoints
                    shutil.rmtree(training_dir(setting.scratch, exp.key), ignore_errors=True)
                rows.append(_finish(unit, exp, outcome, y, meta, per_image, masks, crop))
    return rows


def labelled_row(unit: Unit, exp: Planned, X_train: np.ndarray, X_test: np.ndarray,
                 y: np.ndarray, meta: dict[str, Any], per_image: dict[str, Any],
                 masks: np.ndarray | None, crop: bool) -> ExperimentRow:  # fmt: skip
    """One experiment of a ``labelled`` family (the few-labels protocol, ``stages.few_labels``):
    trained on the good training images and the labelled pool images, evaluated on the
    held-out test images only (its row's test images, scores, metrics, maps and
    embeddings are theirs)."""
    family = FAMILIES[exp.detector.family]
    hp = family.hyperparams(exp.detector)
    part = few_labels.split(per_image["image_ids"], per_image["defect_types"],
                            hp.label_fraction, hp.eval_fraction, hp.split_seed)  # fmt: skip
    setting = Setting(unit.index, unit.workdir, unit.scratch, crop, unit.features.category,
                      exp.key, device=unit.device)  # fmt: skip
    with deadline(unit.timeout_s, Path(unit.notes) / f"{exp.key}.json"), run_setting(setting):
        outcome = family.fit_labelled(X_train, X_test[part.labelled], y[part.labelled],
                                      X_test[part.held], exp.detector, exp.seed)  # fmt: skip
    if setting.scratch:
        shutil.rmtree(training_dir(setting.scratch, exp.key), ignore_errors=True)
    held = part.held.tolist()
    subset = {k: [v[i] for i in held] for k, v in per_image.items()}
    return _finish(unit, exp, outcome, y[part.held], {**meta, "n_test": len(held)}, subset,
                   None if masks is None else masks[part.held], crop)  # fmt: skip


def _put_maps(into: np.ndarray | None, n_train: int, held: np.ndarray,
              maps: np.ndarray | None) -> np.ndarray | None:  # fmt: skip
    """A fold's held-out grids into the training set's out-of-fold grids (created, NaN, on
    the first fold with maps); ``None`` while no fold returned maps."""
    if maps is None:
        return into
    if into is None:
        into = np.full((n_train, *np.shape(maps)[1:]), np.nan, dtype=np.float32)
    into[held] = maps
    return into


def reference_oof(family: Family, outcome: Outcome, X_train: np.ndarray, folds: np.ndarray,
                  config: DetectorConfig, seed: int) -> None:  # fmt: skip
    """Out-of-fold training scores on the plain path: one more fit per fold, each scoring
    the rows it held out (``group_s`` counts them; ``fit_s`` stays the one model's)."""
    t0 = time.perf_counter()
    oof = np.full(len(X_train), np.nan)
    oof_maps = None
    for k in range(int(folds.max()) + 1):
        held = folds == k
        fold = family.reference_one(X_train[~held], X_train[held], config, seed)
        if fold.error is not None:
            return
        oof[held] = fold.scores
        oof_maps = _put_maps(oof_maps, len(X_train), held, fold.maps)
    outcome.oof_scores = oof
    outcome.oof_maps = oof_maps
    outcome.group_s = outcome.fit_s + outcome.score_s + time.perf_counter() - t0


def holdout_outcome(family: Family, X_train: np.ndarray, X_test: np.ndarray,
                    folds: np.ndarray | None, config: DetectorConfig, seed: int) -> Outcome:  # fmt: skip
    """A family that trains (``Family.holdout``): one model on every training row but the
    first fold's, scoring the test rows and the held-out rows, whose scores and maps are
    the out-of-fold input of the honest thresholds (none without folds)."""
    held = folds == 0 if folds is not None else np.zeros(len(X_train), dtype=bool)
    queries = np.concatenate([X_test, X_train[held]]) if held.any() else X_test
    setting = replace(current_setting() or Setting(), held=int(held.sum()))
    with run_setting(setting):  # the family may report a validation loss on the held rows
        outcome = family.reference_one(X_train[~held], queries, config, seed)
    if outcome.error is not None or not held.any():
        return outcome
    n = len(X_test)
    scores, maps = np.asarray(outcome.scores), outcome.maps
    outcome.scores, outcome.oof_scores = scores[:n], scores[n:]
    if maps is not None:
        outcome.maps, outcome.oof_maps = maps[:n], maps[n:]
    for name in ("inputs", "reconstructions"):  # kept for the test images only
        if getattr(outcome, name) is not None:
            setattr(outcome, name, getattr(outcome, name)[:n])
    return outcome


def _finish(unit: Unit, exp: Planned, outcome: Outcome, y: np.ndarray, meta: dict[str, Any],
            per_image: dict[str, Any], masks: np.ndarray | None = None,
            crop: bool = True) -> ExperimentRow:  # fmt: skip
    row = _row(unit.features, exp, outcome, y, meta, unit.threshold_quantile,
               unit.threshold_folds, masks, crop)  # fmt: skip
    if FAMILIES[exp.detector.family].trains:  # where its network ran: experiments.device
        row = replace(row, config={**row.config, "device": unit.device.partition(":")[0]})
    if row.status != "done":
        return row
    row = replace(row, **per_image, curve=list(outcome.curve or []))
    if outcome.embeddings is not None and len(outcome.embeddings) == len(per_image["image_ids"]):
        row.embeddings = {"image_ids": per_image["image_ids"], "values": outcome.embeddings}
    if outcome.inputs is not None and outcome.reconstructions is not None:
        pick = example_images(per_image["defect_types"])
        row.examples = {"image_ids": [per_image["image_ids"][i] for i in pick],
                        "inputs": outcome.inputs[pick],
                        "reconstructions": outcome.reconstructions[pick]}  # fmt: skip
    return row


EXAMPLES = 4  # test images whose reconstructions are kept per experiment


def example_images(defect_types: Sequence[str], n: int = EXAMPLES) -> list[int]:
    """Which test images to keep reconstructions of: the first good one, then the first of
    each defect type in order, then the next ones, up to ``n``."""
    firsts = list({d: i for i, d in reversed(list(enumerate(defect_types)))}.values())[::-1]
    good = [i for i in firsts if defect_types[i] == "good"]
    chosen = (good + [i for i in firsts if i not in good])[:n]
    rest = [i for i in range(len(defect_types)) if i not in chosen]
    return sorted(chosen + rest[: n - len(chosen)])


# --- shared computation ----------------------------------------------------------------------


def _shares(detector: DetectorConfig) -> bool:
    return FAMILIES[detector.family].shares(detector)


def _shared_rows(
    unit: Unit, experiments: Sequence[Planned], fallback: Sequence[Planned]
) -> list[ExperimentRow]:
    """The shared path for ``experiments``; ``fallback`` run per config on the same rows.

    Each (augmented, seed, family) group is one call of its family on the unit's
    :class:`UnitData`, after every group has declared what it needs. The raw rows are
    loaded train first (both training sets contiguous: a forest fits on a view; a
    copy of resnet50 layer1 flatten's 1,254 training rows alone is 4 GB) only when a family
    asks for them; otherwise the Gram streams from the shards.
    """
    features = unit.features
    groups = [(key, list(group)) for key, group in groupby(experiments, key=_group_by)]
    needs = Needs(raw=bool(fallback))
    for (_, _, family), group in groups:
        FAMILIES[family].reserve(needs, [e.detector for e in group])
    fs = load_feature_set(features.folder, train_first=needs.raw, with_features=needs.raw)
    _check_hash(features, fs.manifest)
    test_mask, y, per_image = _per_image(fs)
    masks = unit_masks(unit, fs)
    crop = bool(fs.manifest.get("crop", True))  # the geometry of maps and masks
    grid = _grid_of(fs, features.representation)
    train = {a: np.flatnonzero(fs.rows("train", a)) for a in (False, True)}
    if needs.raw:
        data = UnitData(np.flatnonzero(test_mask), train, needs, raw=fs.X, grid=grid)
    else:
        blocks = lambda: iter_shard_tables(features.folder, columns=["feature"])  # noqa: E731
        data = UnitData(np.flatnonzero(test_mask), train, needs, blocks=blocks, grid=grid)
    notes = Path(unit.notes)
    atomic = len(unit.experiments) == 1
    group_note = notes / f"group-{uuid.uuid4().hex}.json"
    done: list[tuple[list[Planned], list[Outcome], set[str]]] = []
    with contextlib.ExitStack() as stack:
        if atomic:  # a single-experiment unit has one outer deadline
            stack.enter_context(deadline(unit.timeout_s, notes / f"{unit.experiments[0].key}.json"))
        remaining = len(experiments)
        groups_of_rows = image_groups(fs.image_id)
        for (augmented, seed, family), group in groups:
            # a group may compute the shared quantities of every later one: its deadline
            # covers the experiments still to run in the unit
            budget = None if unit.timeout_s is None or atomic else unit.timeout_s * remaining
            with deadline(budget, group_note):
                configs = [e.detector for e in group]
                outcomes = FAMILIES[family].shared_outcomes(data, augmented, configs, seed)
                if unit.threshold_folds:
                    folds = data.add_folds(augmented, groups_of_rows[train[augmented]],
                                           unit.threshold_folds, seed)  # fmt: skip
                    shared_oof(FAMILIES[family], data, augmented, folds, configs, seed,
                                outcomes)  # fmt: skip
            done.append((group, outcomes, data.take_used()))
            remaining -= len(group)
    # each shared quantity's seconds, split evenly over the experiments that used it
    users: Counter[str] = Counter()
    for group, _, used in done:
        users.update(dict.fromkeys(used, len(group)))
    rows: list[ExperimentRow] = []
    for group, outcomes, used in done:
        share = sum(data.seconds.get(name, 0.0) / users[name] for name in used)
        meta = {"n_train": len(train[group[0].augmented]), "n_test": len(data.test),
                "dim": data.n_features}  # fmt: skip
        for exp, outcome in zip(group, outcomes, strict=True):
            outcome.fit_s += share
            rows.append(_finish(unit, exp, outcome, y, meta, per_image, masks, crop))
    if fallback:
        rows += _per_config_rows(unit, fs, fallback)
    return rows


def shared_oof(family: Family, data: UnitData, augmented: bool, folds: list[tuple],
                configs: list[DetectorConfig], seed: int, outcomes: list[Outcome]) -> None:  # fmt: skip
    """Out-of-fold training scores: the family's shared path once per fold (sub-matrices
    of the unit's Gram, the fold's own kNN table and PCA basis); the folds' own seconds
    are added to the call's. A config failing on a fold gets no out-of-fold scores."""
    train = data.train[augmented]
    oof = [np.full(len(train), np.nan) for _ in configs]
    oof_maps: list[np.ndarray | None] = [None] * len(configs)
    failed: set[int] = set()
    extra = 0.0
    for key in folds:
        held = np.searchsorted(train, data.queries(key))
        fold_outcomes = family.shared_outcomes(data, key, configs, seed)
        extra += fold_outcomes[0].group_s or 0.0
        for i, fold in enumerate(fold_outcomes):
            if fold.error is not None:
                failed.add(i)
                continue
            oof[i][held] = fold.scores
            oof_maps[i] = _put_maps(oof_maps[i], len(train), held, fold.maps)
    for i, outcome in enumerate(outcomes):
        outcome.oof_scores = oof[i] if folds and i not in failed else None
        outcome.oof_maps = oof_maps[i] if folds and i not in failed else None
        outcome.group_s = (outcome.group_s or 0.0) + extra
        outcome.fit_s += extra / len(configs)


def evaluate_unit(unit: Unit) -> list[ExperimentRow]:
    """Run a unit's experiments (in a Dask worker): read the shards, fit, score, measure."""
    if not unit.shared:
        fs = load_feature_set(unit.features.folder)
        _check_hash(unit.features, fs.manifest)
        return _per_config_rows(unit, fs, unit.experiments)
    covered = [e for e in unit.experiments if _shares(e.detector)]
    fallback = [e for e in unit.experiments if not _shares(e.detector)]
    if fallback:
        log.info("%s: %d experiments without a shared path run per config (%s)",
                 unit.label(), len(fallback), ", ".join(sorted({e.detector.name for e in fallback})))  # fmt: skip
    return _shared_rows(unit, covered, fallback)


# --- stage side ------------------------------------------------------------------------------


def code_version() -> str:
    """Package version plus a hash of the evaluation code and scikit-learn's version."""
    digest = hashlib.sha256(sklearn.__version__.encode())
    here = Path(__file__).parent
    names = ("engine.py", "evaluate.py", "metrics.py", "mcd.py", "pixel_metrics.py",
             "anomaly_maps.py")  # fmt: skip
    for path in (*(here / n for n in names), *sorted((here / "methods").glob("*.py")),
                 *sorted((here / "patch").glob("*.py"))):  # fmt: skip
        digest.update(path.read_bytes())
    return f"0.1.0+{digest.hexdigest()[:12]}"


def read_feature_sets(path: Path) -> list[FeatureSetEntry]:
    """The feature sets the extract stage finished, with folders made absolute."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run the extract stage first") from None
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; rerun the extract stage") from None
    if not isinstance(raw, list):
        raise UserError(f"{path}: expected a list of feature sets")
    entries = []
    for i, item in enumerate(raw):
        try:
            entry = FeatureSetEntry.model_validate(item)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise UserError(f"{path}: entry {i}: {where}: {err['msg']}") from None
        folder = Path(entry.folder)
        if not folder.is_absolute() and not folder.exists() and (path.parent / folder).exists():
            folder = path.parent / folder
        entries.append(entry.model_copy(update={"folder": str(folder.resolve())}))
    return entries


# --- inputs that belong together (checked before anything is written) -------------------------

RERUN_EXTRACT = "rerun the extract stage (dvc repro extract)"
# A stored ``failed`` row whose error says its input could not be read (a missing manifest,
# an unreadable shard: stored so by versions before inputs were checked up front) is no
# outcome of the experiment: it is run again without ``retry_failed``.
INPUT_FAILURE = re.compile(
    r"rerun the extract stage|UserError|ArrowInvalid|ArrowIOError|ArrowException|"
    r"\.parquet\b|manifest\.json|InvalidParameterError"
)


def _label(fs: FeatureSetEntry) -> str:
    return f"{fs.category} {fs.backbone}-{fs.init} {fs.layer} {fs.representation}"


def check_listing(root: Any, feature_sets: Sequence[FeatureSetEntry], listing: Path) -> None:
    """``feature_sets.json`` lists exactly the configured feature sets: every category of
    ``data.categories`` and, when the params file has ``extract.extractors``, every
    extractor x layer x representation; nothing else (a stale list: rerun the extract stage)."""
    categories = list(root.data.categories)
    listed = {fs.category for fs in feature_sets}
    for category in categories:
        if category not in listed:
            raise UserError(f"{listing}: no feature sets of category '{category}' (data.categories "
                            f"lists it); {RERUN_EXTRACT}")  # fmt: skip
    for fs in feature_sets:
        if fs.category not in categories:
            raise UserError(f"{listing}: lists {_label(fs)}, but data.categories has no "
                            f"'{fs.category}'; {RERUN_EXTRACT}")  # fmt: skip
    extractors = (root.extract or {}).get("extractors")
    if not isinstance(extractors, list) or not all(isinstance(x, dict) for x in extractors):
        return  # no extractor list (or a malformed one: the extract stage names it)
    wanted: list[tuple[str, str, str | None, str, str]] = []
    for x in extractors:
        for layer in x.get("layers") or []:
            for representation in x.get("representations") or ["flatten"]:
                wanted += [(c, str(x.get("backbone")), x.get("init"), str(layer),
                            str(representation)) for c in categories]  # fmt: skip

    def matches(fs: FeatureSetEntry, w: tuple[str, str, str | None, str, str]) -> bool:
        return (fs.category, fs.backbone, fs.layer, fs.representation) == (
            w[0], w[1], w[3], w[4]) and w[2] in (None, fs.init)  # fmt: skip

    for w in wanted:
        if not any(matches(fs, w) for fs in feature_sets):
            name = f"{w[0]} {w[1]}-{w[2] or '*'} {w[3]} {w[4]}"
            raise UserError(f"{listing}: no feature set {name} (extract.extractors lists it); "
                            f"{RERUN_EXTRACT}")  # fmt: skip
    for fs in feature_sets:
        if not any(matches(fs, w) for w in wanted):
            raise UserError(f"{listing}: lists {_label(fs)}, which extract.extractors does not "
                            f"configure; {RERUN_EXTRACT}")  # fmt: skip


def check_pairing(specs: Sequence[DetectorSpec], feature_sets: Sequence[FeatureSetEntry],
                  params_path: str | Path) -> None:  # fmt: skip
    """A family that runs on image (or patch) feature sets only, while extract.extractors
    makes none, would silently run no experiment: a one-line error naming its entry."""
    wants = (("images", is_image, "trains on images", "{backbone: pixels, init: none, "
              "layers: [rgb128], representations: [image]}"),
             ("patch", is_patch, "scores patch features", "{backbone: efficientnet_lite0, "
              "init: imagenet, layers: [stage6], representations: [patch]}"))  # fmt: skip
    for i, spec in enumerate(specs):
        family = FAMILIES[spec.family]
        for attribute, matches, what, example in wants:
            if getattr(family, attribute) and not any(matches(fs.representation)
                                                      for fs in feature_sets):  # fmt: skip
                raise UserError(f"{params_path}: evaluate.detectors[{i}] ({spec.family}) {what}, "
                                "but no feature set has that shape (extract.extractors has no "
                                f"representation {'image' if attribute == 'images' else 'patch'}"
                                f"; add e.g. {example})")  # fmt: skip


def check_augmentation(params: EvaluateParams, transforms: dict[str, list[str]],
                       categories: Sequence[str], where: str | Path) -> None:  # fmt: skip
    """An ``augmented`` experiment must train on augmented images: ``both`` needs transforms
    for every category."""
    if params.augmentation != "both":
        return
    for category in categories:
        if not transforms.get(category):
            raise UserError(f"{where}: evaluate.augmentation: both plans augmented experiments for "
                            f"'{category}', but augment.transforms.{category} is []: they would "
                            "train on the original images only (use auto, or give it "
                            "transforms)")  # fmt: skip


class _Indexes:
    """The image index and the augment stage's index, read (and checked against each other
    and ``augment.transforms``) the first time a feature set's content hash is recomputed."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self._inputs: dict[str, tuple[list[str], list[str]]] | None = None

    def inputs(self, category: str) -> tuple[list[str], list[str]]:
        """Image ids and SHA-256 of the category's feature-set rows, in stored order."""
        if self._inputs is None:
            data, augment = self.root.data, self.root.augment
            train = train_originals(data.index, data.categories)
            augmented = check_augment_index(Path(augment.out) / AUGMENT_INDEX, train,
                                            dict(augment.transforms), data.index)  # fmt: skip
            table = read_index(data.index).select(["category", "image_id", "split", "sha256"])
            originals: dict[str, list[dict[str, Any]]] = {c: [] for c in data.categories}
            for row in table.to_pylist():
                if row["category"] in originals:
                    originals[row["category"]].append(row)
            self._inputs = {}
            for c in data.categories:
                rows = feature_set_inputs(originals[c], augmented[c])
                self._inputs[c] = ([r["image_id"] for r in rows], [r["sha256"] for r in rows])
        return self._inputs[category]


def check_feature_set(fs: FeatureSetEntry, augmented_wanted: Sequence[str] | None,
                      indexes: _Indexes) -> None:  # fmt: skip
    """One listed feature set before any experiment runs on it: its manifest is there and
    is the one listed, its shards agree with the manifest (``check_shards``), and its rows
    are the images it must hold. For a set the extract stage wrote (its manifest has the
    extractor config) the content hash is recomputed from the current image and augment
    indexes; otherwise the rows are read. ``augmented_wanted``: the transforms an augmented
    experiment on it must train on (None: no augmented experiment planned).
    """
    manifest = require_manifest(fs.folder)
    _check_hash(fs, manifest)
    for name in ("n_rows", "dim"):
        listed, stored = getattr(fs, name), manifest.get(name)
        if listed is not None and stored is not None and int(listed) != int(stored):
            raise UserError(f"{fs.folder}: {name} {stored} in its manifest, {listed} in "
                            f"{FEATURE_SETS_FILE}; {RERUN_EXTRACT}")  # fmt: skip
    check_shards(fs.folder, manifest)
    if all(k in manifest for k in CONFIG_KEYS):
        ids, hashes = indexes.inputs(fs.category)
        expected = content_hash_of(hashed_config(manifest), ids, hashes)
        if expected != manifest.get("content_hash"):
            data = indexes.root.data
            raise UserError(f"{fs.folder}: features extracted from other images than "
                            f"{data.index} and the augment index list now (content hash "
                            f"differs); {RERUN_EXTRACT}")  # fmt: skip
        return  # the rows are the indexes' images, augmented copies as configured
    meta = load_feature_set(fs.folder, with_features=False)
    seen: set[str] = set()
    for image_id in meta.image_id:
        if image_id in seen:
            raise UserError(f"{fs.folder}: image {image_id} is in the feature set twice; "
                            f"{RERUN_EXTRACT}")  # fmt: skip
        seen.add(image_id)
    if augmented_wanted is not None:
        train = meta.split == "train"
        sources = sorted(set(meta.source[train]) - {"original"})
        if sorted(augmented_wanted) != sources:
            raise UserError(f"{fs.folder}: augmented training rows are for transforms "
                            f"{sources}, but augment.transforms.{fs.category} is "
                            f"{list(augmented_wanted)}; {RERUN_EXTRACT}")  # fmt: skip


def retry_requested(params: EvaluateParams) -> bool:
    return params.retry_failed or os.environ.get(RETRY_ENV, "") not in ("", "0", "false")


class Recorder:
    """The single writer: upserts rows as units finish and drives the progress bar."""

    def __init__(self, engine: Any, total: int, maps: str | Path = "results/maps") -> None:
        self.engine = engine
        self.maps = Path(maps)
        self.version = code_version()
        self.counts: Counter[str] = Counter()
        self.bar = tqdm(total=total, unit="exp", desc="evaluate", dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.05)  # fmt: skip

    def record(self, rows: Sequence[ExperimentRow]) -> None:
        for row in rows:  # the maps first: a done patch experiment always has its maps
            if row.status == "done" and row.grids is not None:
                write_grids(self.maps, row.key, row.image_ids, row.grids, row.grid_meta)
            if row.status == "done" and row.examples:
                write_examples(self.maps, row.key, **row.examples)
            if row.status == "done" and row.embeddings:
                write_embeddings(self.maps, row.key, **row.embeddings)
        upsert(self.engine, rows, self.version)
        self.counts.update(r.status for r in rows)
        self.bar.set_postfix({k: self.counts[k] for k in sorted(self.counts)}, refresh=False)
        self.bar.update(len(rows))

    def record_all(self, unit: Unit, status: str, error: str) -> None:
        self.record(
            [
                ExperimentRow(e.key, config_fields(unit.features, e), status, error=error)
                for e in unit.experiments
            ]
        )


def unit_parts(experiments: Sequence[Planned]) -> list[tuple[Planned, ...]]:
    """The work units of one feature set's pending experiments: an experiment of a family
    that trains a model per experiment (``Family.trains``) is a unit of its own, so trainings spread
    over the workers and each is recorded when it ends; the rest stay together (they share
    the unit's computation). Trainings first: the longest tasks start earliest."""
    trains = [(e,) for e in experiments if FAMILIES[e.detector.family].trains]
    rest = tuple(e for e in experiments if not FAMILIES[e.detector.family].trains)
    return trains + ([rest] if rest else [])


def stage_device(params: EvaluateParams, where: str | Path = "") -> str:
    """``evaluate.device`` as the units that train get it: ``cpu``, ``cuda`` (each GPU
    worker its own GPU: ``stages.methods.epochs.run_device``) or ``cuda:N``; a one-line
    error naming the key when it asks for CUDA that PyTorch does not see here. With a
    remote scheduler an explicit ``cuda`` is the workers' to check (their GPUs, not this
    machine's); ``auto`` is always this machine's view."""
    if params.engine.address and params.device.startswith("cuda"):
        return params.device
    try:
        device = resolve_device(params.device, "evaluate.device")
    except UserError as exc:
        raise UserError(f"{where}: {exc}" if where else str(exc)) from None
    if device.type == "cpu":
        return "cpu"
    return "cuda" if params.device == "auto" else params.device


def unit_device(experiments: Sequence[Planned], device: str) -> str:
    """A unit's device: ``device`` when it trains a network, else the CPU."""
    return device if any(FAMILIES[e.detector.family].trains for e in experiments) else "cpu"


def unit_resources(unit: Unit) -> dict[str, float] | None:
    """The Dask worker resources a unit asks for: a GPU when it trains on CUDA."""
    return {GPU_RESOURCE: 1} if unit.device.startswith("cuda") else None


def gpu_workers(units: Sequence[Unit], n_workers: int) -> dict[str, Any]:
    """``dask_client``'s resource options for the local cluster: one worker per GPU the
    units may use (every visible one for ``cuda``, one for ``cuda:N``), at most every
    worker; none when no unit runs on CUDA."""
    devices = {u.device for u in units if u.device.startswith("cuda")}
    if not devices:
        return {}
    import torch

    gpus = torch.cuda.device_count() if "cuda" in devices else 1
    return {"resources": {GPU_RESOURCE: 1}, "resource_workers": max(1, min(gpus, n_workers))}


def check_gpu_workers(client: Client, units: Sequence[Unit]) -> None:
    """A one-line error instead of units that would wait forever: some unit asks for a
    GPU and no worker of the cluster offers one."""
    if not any(unit_resources(u) for u in units):
        return
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any((w.get("resources") or {}).get(GPU_RESOURCE, 0) >= 1 for w in workers):
        raise UserError(f"evaluate.device: {units[0].device} asked, but no Dask worker offers "
                        f"the {GPU_RESOURCE} resource: start GPU workers with `dask worker "
                        f"<scheduler> --resources {GPU_RESOURCE}=1` (README 'Scaling out'), "
                        "or set evaluate.device: cpu")  # fmt: skip


def _split(unit: Unit) -> list[Unit]:
    half = len(unit.experiments) // 2
    if half == 0:
        return [unit]
    return [
        replace(unit, experiments=unit.experiments[:half]),
        replace(unit, experiments=unit.experiments[half:]),
    ]


def _run(units: list[Unit], params: EvaluateParams, recorder: Recorder, client: Client) -> None:
    check_gpu_workers(client, units)
    notes = Path(units[0].notes)

    def explain_death(unit: Unit) -> list[Unit] | None:
        timed_out = [e for e in unit.experiments if (notes / f"{e.key}.json").exists()]
        if not timed_out:
            return None
        for exp in timed_out:
            log.info("timeout after %ss: %s on %s", params.timeout_s, exp.detector.name,
                     unit.label())  # fmt: skip
            recorder.record(
                [
                    ExperimentRow(
                        exp.key, config_fields(unit.features, exp), "timeout",
                        error=f"exceeded evaluate.timeout_s={params.timeout_s}; worker killed",
                    )
                ]
            )  # fmt: skip
            (notes / f"{exp.key}.json").unlink(missing_ok=True)
        rest = tuple(e for e in unit.experiments if e not in timed_out)
        return [replace(unit, experiments=rest)] if rest else []

    def on_crash(unit: Unit, fault: str) -> None:
        (exp,) = unit.experiments
        log.info("crashed: %s on %s (%s)", exp.detector.name, unit.label(), fault)
        recorder.record_all(unit, "crashed", f"worker process died: {fault}; "
                            "confirmed by a rerun alone on the cluster")  # fmt: skip

    def on_error(unit: Unit, exc: BaseException) -> None:
        if isinstance(exc, UserError):  # an input problem (unreadable shard): no outcome
            raise exc
        log.info("failed: %s: %s", unit.label(), error_text(exc))
        recorder.record_all(unit, "failed", error_text(exc))

    run_units(
        client,
        evaluate_unit,
        units,
        split=_split,
        on_result=lambda unit, rows: recorder.record(rows),
        on_error=on_error,
        on_crash=on_crash,
        explain_death=explain_death,
        scratch=Path(params.scratch) / "faults",
        threads=params.engine.threads_per_worker,
        name="evaluate-unit",
        resources=unit_resources,
    )


def stage_setting(params: EvaluateParams, root: Any) -> Setting:
    """What families that need more than their rows read (:class:`Setting`): the image
    index, the scratch folder and the extraction's geometry, as absolute paths."""
    return Setting(index=str(Path(root.data.index).resolve()), workdir=str(Path.cwd()),
                   scratch=str(Path(params.scratch).resolve()),
                   crop=bool((root.extract or {}).get("crop", True)))  # fmt: skip


def resolved_detectors(params: EvaluateParams, root: Any,
                       params_path: str | Path) -> tuple[list[DetectorConfig], Setting]:  # fmt: skip
    """The grid's detector configs as their experiments record them (``Family.resolve``:
    e.g. a teacher's origin and hash), and the stage's setting."""
    setting = stage_setting(params, root)
    try:  # the grid is checked before anything else, so a typo is reported first
        detectors = expand_detectors(params.detectors, params.allow_test_detectors)
        return [FAMILIES[d.family].resolve(d, setting) for d in detectors], setting
    except UserError as exc:
        raise UserError(f"{params_path}: {exc}") from None


def evaluate(params_path: str | Path, client: Client | None = None) -> dict[str, Any]:
    """Run (or resume) the whole evaluation; returns the summary written to ``summary``.

    ``client``: an existing Dask client to use instead of ``evaluate.engine``.
    """
    params = load_section(params_path, "evaluate", EvaluateParams)
    assert isinstance(params, EvaluateParams)
    device = stage_device(params, params_path)  # CUDA asked and not here: before anything
    root = load_params(params_path)
    detectors, setting = resolved_detectors(params, root, params_path)
    setting = replace(setting, device=device)
    if client is None:
        check_scheduler(params.engine, "evaluate.engine", params_path)
    extract_out = Path((root.extract or {}).get("out", "cache/features"))
    listing = extract_out / FEATURE_SETS_FILE
    feature_sets = read_feature_sets(listing)
    # Inputs that belong together, before anything is written (one line: what to rerun).
    check_listing(root, feature_sets, listing)
    check_augmentation(params, root.augment.transforms, root.data.categories, params_path)
    check_pairing(params.detectors, feature_sets, params_path)
    # Feature sets written by hand (no image index) have no dataset identity: NULL rows.
    datasets = (dataset_infos(root.data.index, root.data.root, root.data.categories)
                if Path(root.data.index).is_file() else {})  # fmt: skip
    feature_sets = [fs.model_copy(update={"dataset": datasets[fs.category].id})
                    if fs.category in datasets else fs for fs in feature_sets]  # fmt: skip
    grid = plan(feature_sets, root.augment.transforms, detectors, params.seeds,
                params.augmentation)  # fmt: skip
    indexes = _Indexes(root)
    for fs, exps in grid:
        augmented = any(e.augmented for e in exps)
        check_feature_set(fs, root.augment.transforms.get(fs.category, []) if augmented
                          else None, indexes)  # fmt: skip
    with single_writer(params.db_url):  # one run per database: a second one is refused
        remove_stale_temps(Path(params.summary).parent, recursive=False)
        return _evaluate_grid(params, grid, feature_sets, detectors, client, setting,
                              list(datasets.values()))  # fmt: skip


def _evaluate_grid(params: EvaluateParams, grid: list[tuple[FeatureSetEntry, list[Planned]]],
                   feature_sets: list[FeatureSetEntry], detectors: list[DetectorConfig],
                   client: Client | None, setting: Setting | None = None,
                   datasets: Sequence[DatasetInfo] = ()) -> dict[str, Any]:  # fmt: skip
    """The checked grid against the database: run what is pending, write the summary.
    ``setting``: the image index (absolute), where units with maps read their test masks,
    and what the families that need more than their rows read. ``datasets``: the
    categories' identities, recorded as the database's current datasets."""
    setting = setting or Setting(scratch=str(Path(params.scratch).resolve()))
    index = setting.index
    keys = [e.key for _, exps in grid for e in exps]
    db = open_db(params.db_url)
    try:
        if datasets:
            planned: dict[str, list[str]] = {}
            for fs, exps in grid:
                if fs.dataset is not None:
                    planned.setdefault(fs.dataset, []).extend(e.key for e in exps)
            filled = record_datasets(db, datasets, planned)
            if filled:
                log.info("%d stored experiments had no dataset recorded (written before "
                         "datasets were); named theirs", filled)  # fmt: skip
        known = statuses(db, keys)
        unread = [k for k, e in failed_errors(db, keys).items() if INPUT_FAILURE.search(e)]
        for key in unread:
            known[key] = "input"  # stored failed for an input problem: not final, rerun
        if unread:
            log.info("%d experiments stored as failed because their input could not be read "
                     "(not an outcome of the experiment); running them again", len(unread))  # fmt: skip
        stored = threshold_settings(db, keys)
        other_q = [k for k, (q, _) in stored.items() if q != params.threshold_quantile]
        other_f = [k for k, (q, f) in stored.items()
                   if q == params.threshold_quantile and f != params.threshold_folds]  # fmt: skip
        for key in (*other_q, *other_f):
            known[key] = "stale"  # threshold metrics computed otherwise: rerun
        lost = [e.key for fs, exps in grid if has_maps(fs.representation) for e in exps
                if known.get(e.key) == "done" and FAMILIES[e.detector.family].maps
                and not grid_path(params.maps, e.key).is_file()]  # fmt: skip
        for key in lost:
            known[key] = "maps"
        if lost:
            log.info("%d done patch experiments have no stored maps in %s; rerunning them",
                     len(lost), params.maps)  # fmt: skip
        if other_q:
            log.info("%d done experiments have threshold metrics of another "
                     "threshold_quantile; rerunning them", len(other_q))  # fmt: skip
        if other_f:
            before = sum(1 for k in other_f if stored[k][1] is None)
            log.info("%d done experiments have an honest threshold not from %d-fold "
                     "out-of-fold scores (%d from in-sample scores, stored before it "
                     "existed); rerunning them", len(other_f), params.threshold_folds,
                     before)  # fmt: skip
        retry = retry_requested(params)
        skip = {"done"} if retry else {"done", *FINAL_NOT_DONE}
        notes = Path(params.scratch) / "timeouts"
        notes.mkdir(parents=True, exist_ok=True)
        Path(params.maps).mkdir(parents=True, exist_ok=True)  # a DVC output, even when empty
        for stale in notes.glob("*.json"):
            stale.unlink()
        units = []
        for fs, exps in grid:
            todo = tuple(e for e in exps if known.get(e.key) not in skip)
            skipped = Counter(known[e.key] for e in exps if known.get(e.key) in skip)
            if skipped:
                what = ", ".join(f"{n} {s}" for s, n in sorted(skipped.items()))
                log.info("skip %s: %s of %d (%d to run)", f"{fs.category} {fs.backbone}-"
                         f"{fs.init} {fs.layer} {fs.representation}", what, len(exps),
                         len(todo))  # fmt: skip
            for part in unit_parts(todo):
                units.append(Unit(fs, part, params.timeout_s, str(notes.resolve()),
                                  params.threshold_quantile, params.shared,
                                  params.threshold_folds, index, str(Path.cwd()),
                                  setting.scratch, unit_device(part, setting.device)))  # fmt: skip
        n_todo = sum(len(u.experiments) for u in units)
        not_done = sum(1 for k in keys if known.get(k) in FINAL_NOT_DONE)
        log.info("%d experiments in the grid (%d feature sets x %d detector configs x "
                 "%d seeds, augmentation %s); %d to run", len(keys), len(feature_sets),
                 len(detectors), len(params.seeds), params.augmentation, n_todo)  # fmt: skip
        per_config = [d.name for d in detectors if not _shares(d)]
        if params.shared and per_config:
            log.info("shared computation: %d of %d detector configs; per config (no shared "
                     "path): %s", len(detectors) - len(per_config), len(detectors),
                     ", ".join(per_config))  # fmt: skip
        elif not params.shared:
            log.info("evaluate.shared is false: one scikit-learn estimator per config")
        if not_done and not retry:
            log.info("%d failed/crashed/timeout experiments are kept; set "
                     "evaluate.retry_failed: true or %s=1 to retry them", not_done,
                     RETRY_ENV)  # fmt: skip
        started = time.perf_counter()
        pending = [e.detector for u in units for e in u.experiments]
        for name in dict.fromkeys(d.family for d in pending):  # e.g. a teacher to distil
            FAMILIES[name].prepare(list(dict.fromkeys(d for d in pending if d.family == name)),
                                   setting)  # fmt: skip
        if units:
            recorder = Recorder(db, n_todo, params.maps)
            try:
                if client is not None:
                    _run(units, params, recorder, client)
                else:
                    with dask_client(
                        params.engine, **gpu_workers(units, params.engine.n_workers)
                    ) as own:
                        _run(units, params, recorder, own)
            finally:
                recorder.bar.close()
        seconds = time.perf_counter() - started
        counts = status_counts(db, keys)
    finally:
        db.dispose()
    final = sum(counts.values())
    summary = {
        "experiments": len(keys),
        **counts,
        "pending": len(keys) - final,
        "ran": n_todo,
        "seconds": round(seconds, 3),
        "experiments_per_s": round(n_todo / seconds, 3) if n_todo and seconds > 0 else None,
    }
    write_json_atomic(params.summary, summary)
    log.info("%s", ", ".join(f"{k} {v}" for k, v in summary.items() if k in counts))
    if summary["pending"]:
        raise UserError(f"{summary['pending']} experiments have no final status; rerun")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_args(__doc__.splitlines()[0], list(argv) if argv is not None else None)
    setup_logging("evaluate")
    evaluate(args.params)


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: work units sent to Dask workers (and
    # on to DataLoader processes) must pickle by reference to ``stages.evaluate``.
    from stages import evaluate as stage

    run_cli(stage.main)
