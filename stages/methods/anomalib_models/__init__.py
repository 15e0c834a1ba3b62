"""anomalib's image models as one detector family, ``Anomalib``: each config is one model
trained through anomalib's ``Engine`` and scored by the project's own metrics.

``model`` names the anomalib class; its keyword arguments are the config's other
hyperparameters (checked against :data:`MODELS`). Offline only: a model that takes a
backbone gets the project's own network as an ``nn.Module`` (``backbone``, ``init``,
``layers`` as in ``extract.extractors``), so neither timm nor torchvision downloads
anything; EfficientAd's teacher is distilled from efficientnet_lite0 (:mod:`.teacher`) or
read from a file, and its penalty images are the other categories' good training images or
a folder (:mod:`.penalty`). A model that needs a download we cannot make is a one-line
params error before anything runs.

Rows: the family runs on the ``image`` feature sets (the pixels backbone's ``rgbS`` rows,
the same crop as every backbone); the images are resized to ``image_size`` (and normalised
with the backbone's statistics) by the model's pre-processor. Image scores and anomaly maps
are the torch model's raw outputs (no anomalib post-processing, no anomalib metrics): the
evaluate stage computes every metric as for any other row. anomalib's maps are final (its
PatchCore blurs its own), so ``map_sigma`` is 0.

Training (:mod:`.training`): on ``evaluate.device`` (Lightning's accelerator), seeded and
deterministic on the CPU (on CUDA: ``deterministic="warn"``), checkpointed every
``checkpoint_every`` steps under ``evaluate.scratch``/training (removed when the experiment
is done), resumed from the last checkpoint after a kill. One training per experiment: the
model trains on all but the first of the ``threshold_folds`` folds of the training images
and scores the held-out ones for the honest threshold (``holdout``; as anomalib splits a
validation set off), instead of k more trainings. In-sample training scores (only the
in-sample comparison columns use them) would cost a forward pass per training image: none.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict

from stages.errors import UserError
from stages.methods.base import (
    DetectorConfig,
    Family,
    Hyper,
    HyperparameterError,
    Outcome,
    PositiveInt,
    Setting,
    checkpoint_dir,
    current_setting,
    error_text,
)


@dataclass(frozen=True)
class ModelSpec:
    """What the family must know of an anomalib model: the keyword that takes the backbone's
    layers (``layers``: a list, ``layer``: one; None: no backbone), whether it trains for
    ``max_steps`` steps (else one pass over the images, anomalib's ``max_epochs: 1``), its
    other keyword arguments (the hyperparameters a config may set) and its training batch
    size when anomalib fixes one, its smallest image size, and the keywords it needs with
    an ``nn.Module`` backbone (PaDiM's ``n_features``: it knows defaults for timm names only)."""

    layers: str | None
    trains: bool
    kwargs: tuple[str, ...]
    batch_size: int | None = None
    min_size: int = 0
    required: tuple[str, ...] = ()


# The anomalib 2.7 models that run offline here (tests/test_anomalib_models.py checks the
# keyword names against anomalib's signatures). Others load pretrained weights anomalib
# would download (CLIP, DINOv2, timm backbones), need a backbone's teacher and student as
# separate networks (STFPM would share one nn.Module between them) or make no anomaly map
# (DFKDE; its torch model also fails on two joined layers of an nn.Module).
MODELS: dict[str, ModelSpec] = {
    "Patchcore": ModelSpec("layers", False, ("coreset_sampling_ratio", "num_neighbors")),
    "Padim": ModelSpec("layers", False, ("n_features",), required=("n_features",)),
    "Dfm": ModelSpec("layer", False, ("pooling_kernel_size", "pca_level", "score_type")),
    "EfficientAd": ModelSpec(
        None,
        True,
        ("teacher_out_channels", "model_size", "lr", "weight_decay", "padding", "pad_maps"),
        batch_size=1,
        min_size=256,
    ),
}
DISTILLED = "distilled-efficientnet_lite0"
OTHER_CATEGORIES = "other-categories"


class AnomalibHyper(Hyper):
    """The family's own hyperparameters; any other key is the model's keyword argument."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    model: str | None = None
    backbone: str | None = None
    init: str | None = None
    layers: str | None = None  # "layer2+layer3": the backbone layers, joined by "+"
    image_size: PositiveInt = 256
    batch_size: PositiveInt | None = None  # None: the model's (EfficientAd 1), else 8
    max_steps: PositiveInt | None = None  # models that train (EfficientAd): required
    checkpoint_every: PositiveInt = 100
    # Training images EfficientAd computes its teacher statistics and map quantiles on
    # (a seeded sample; None: all, as anomalib): each costs a forward pass.
    calibration_images: PositiveInt | None = None
    # EfficientAd: its teacher (distilled-efficientnet_lite0, anomalib, or a .pth file) and
    # penalty images (other-categories, or a folder); the distillation's budget.
    teacher: str = DISTILLED
    penalty: str = OTHER_CATEGORIES
    teacher_steps: PositiveInt = 2000
    teacher_image_size: PositiveInt | None = None  # None: image_size
    teacher_batch_size: PositiveInt = 8


class AnomalibFamily(Family):
    name = "Anomalib"
    hyper = AnomalibHyper
    seeded = True
    images = True
    map_sigma = 0.0
    holdout = True

    # --- plan time -----------------------------------------------------------------------
    def checked_estimators(self, params: dict[str, Any]) -> list:
        return []

    def validate(self, config: DetectorConfig) -> None:
        """One-line errors for what would fail every experiment of the config: an unknown
        or download-only model, a keyword it does not take, a missing backbone or step
        budget, a teacher file that is not there."""
        from stages.backbones import BACKBONES, init_error, layer_parts

        hp = self.hyperparams(config)
        spec = MODELS.get(hp.model or "")
        if spec is None:
            raise HyperparameterError("model", f"{hp.model!r} is not an anomalib model that runs "
                                      f"offline here (offline: {', '.join(MODELS)}; the others "
                                      "load weights anomalib would download)")  # fmt: skip
        extra = sorted(set(hp.model_extra or {}) - set(spec.kwargs))
        if extra:
            raise HyperparameterError(extra[0], f"anomalib's {hp.model} takes no keyword "
                                      f"{extra[0]!r} here (its keywords: "
                                      f"{', '.join(spec.kwargs)})")  # fmt: skip
        if spec.layers is None:
            for key in ("backbone", "init", "layers"):
                if getattr(hp, key) is not None:
                    raise HyperparameterError(key, f"anomalib's {hp.model} has no backbone to set")
        else:
            if hp.backbone not in BACKBONES or hp.backbone == "pixels":
                raise HyperparameterError("backbone", f"anomalib's {hp.model} needs a backbone "
                                          f"(one of {', '.join(b for b in BACKBONES if b != 'pixels')}"
                                          f"), got {hp.backbone!r}")  # fmt: skip
            message = init_error(hp.backbone, hp.init or BACKBONES[hp.backbone].inits[0])
            if message:
                raise HyperparameterError("init", message)
            known = BACKBONES[hp.backbone].layers
            parts = layer_parts(hp.layers or "")
            bad = [p for p in parts if p not in known]
            if bad:
                raise HyperparameterError("layers", f"{bad[0]!r} is not a layer of {hp.backbone} "
                                          f"(valid: {', '.join(known)}; join with +)")  # fmt: skip
            if spec.layers == "layer" and len(parts) != 1:
                raise HyperparameterError("layers", f"anomalib's {hp.model} takes one layer")
        missing = [k for k in spec.required if k not in (hp.model_extra or {})]
        if missing:
            raise HyperparameterError(missing[0], f"anomalib's {hp.model} needs {missing[0]} "
                                      "with the project's backbones (its defaults are for timm's)")  # fmt: skip
        if spec.min_size and hp.image_size < spec.min_size:
            raise HyperparameterError("image_size", f"anomalib's {hp.model} needs images of at "
                                      f"least {spec.min_size} pixels (its autoencoder's last "
                                      f"kernel), got {hp.image_size}")  # fmt: skip
        channels = (hp.model_extra or {}).get("teacher_out_channels")
        if hp.model == "EfficientAd" and hp.teacher == DISTILLED and channels is not None:
            from stages.methods.anomalib_models.teacher import teacher_channels

            if channels != teacher_channels():
                raise HyperparameterError("teacher_out_channels", f"the distilled teacher has "
                                          f"{teacher_channels()} channels, got {channels}")  # fmt: skip
        if spec.trains and hp.max_steps is None:
            raise HyperparameterError("max_steps", f"anomalib's {hp.model} trains: set "
                                      "max_steps (its number of training steps)")  # fmt: skip
        if spec.batch_size and hp.batch_size not in (None, spec.batch_size):
            raise HyperparameterError("batch_size", f"anomalib's {hp.model} trains with batch "
                                      f"size {spec.batch_size}")  # fmt: skip

    def resolve(self, config: DetectorConfig, setting: Setting) -> DetectorConfig:
        """EfficientAd's teacher and penalty images as what they are, content included
        (:mod:`.sources`): ``teacher`` becomes ``distilled-efficientnet_lite0:<hash>``
        (the distillation's config and images), ``anomalib:<file hash>`` or ``<path>:<file
        hash>``; ``penalty`` gets the hash of its images. Rows of different teachers then
        never share a key; a missing file is a one-line error naming it."""
        hp = self.hyperparams(config)
        if hp.model != "EfficientAd" or ":" in hp.teacher:
            return config
        from stages.methods.anomalib_models.sources import resolve_penalty, resolve_teacher

        kwargs = dict(config.kwargs)
        kwargs["teacher"] = resolve_teacher(hp, setting)
        kwargs["penalty"] = resolve_penalty(hp.penalty, setting)
        return DetectorConfig(config.family, tuple(sorted(kwargs.items())))

    def prepare(self, configs: Sequence[DetectorConfig], setting: Setting) -> None:
        """Distil the teachers the configs need that are not on disk yet."""
        from stages.methods.anomalib_models.sources import ensure_distilled

        for config in configs:
            hp = self.hyperparams(config)
            if hp.model == "EfficientAd" and hp.teacher.startswith(DISTILLED + ":"):
                ensure_distilled(hp, setting)

    # --- run time ------------------------------------------------------------------------
    def reference_one(
        self, X_train: np.ndarray, X_test: np.ndarray, config: DetectorConfig, seed: int
    ) -> Outcome:
        """Train on ``X_train`` ((n, 3, h, w) in [0, 1]), then score ``X_test``."""
        t0 = time.perf_counter()
        try:
            from stages.methods.anomalib_models.models import build, train_and_score
            from stages.methods.epochs import run_device

            setting = current_setting() or Setting()
            hp = self.hyperparams(config)
            model = build(hp, seed, setting)
            label = f"{setting.category} {hp.model} {setting.key[:12]} {setting.part}".strip()
            workdir = (
                checkpoint_dir(setting) or Path(setting.scratch or ".") / "training" / "unnamed"
            )
            out = train_and_score(
                model, hp, X_train, X_test, seed, workdir, label, run_device(setting)
            )
        except UserError:
            raise
        except Exception as exc:
            return Outcome(None, time.perf_counter() - t0, 0.0, error_text(exc))
        return Outcome(out.scores, out.fit_s, out.score_s, maps=out.maps)


__all__ = ["MODELS", "AnomalibFamily", "AnomalibHyper", "ModelSpec"]
