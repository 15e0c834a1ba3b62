"""What the reconstruction families share: their training hyperparameters and the one
experiment's train-then-score (the plain reference: one network per config).

A family says how to build its network (:meth:`ReconstructionFamily.network`) and, if it
has more than a reconstruction loss, its objective and score (the VAE's KL term); this
module does the rest:

- **Rows.** The ``image`` feature sets (the pixels backbone's ``rgbS`` rows, (n, 3, S, S)
  in [0, 1], the same crop as every backbone), resized to ``image_size``.
- **Training** (:mod:`.training`): on all but the held-out fold of the good training
  images (``Family.holdout``); per epoch the training loss and that of the held-out images
  go to the ``epochs`` table; checkpoints every epoch under ``evaluate.scratch``/training;
  on ``evaluate.device`` (:func:`stages.methods.epochs.run_device`).
- **Scores and maps.** The anomaly map is the per-pixel squared residual averaged over the
  RGB channels, at ``image_size``; the stage resizes it to the model's 224 input and blurs
  it (sigma 4, as for the patch methods) for pixel AUROC and AUPRO. The image score is the
  mean squared residual (``score: mse``), or the maximum of that blurred map
  (``score: max``): one bright defect scores high even when the rest is well rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from stages.anomaly_maps import MAP_SIZE
from stages.errors import UserError
from stages.methods.base import (
    DetectorConfig,
    Family,
    Hyper,
    HyperparameterError,
    Outcome,
    PositiveFloat,
    PositiveInt,
    checkpoint_dir,
    current_setting,
    error_text,
)
from stages.methods.epochs import run_device
from stages.methods.reconstruction.networks import Reconstruction, reconstruction_loss
from stages.methods.reconstruction.training import fit, reconstruct, resize, to_uint8
from stages.patch.maps import SIGMA, anomaly_maps

MIN_SIZE = 16  # SSIM's 11-pixel window, and a few stride-2 blocks


class ReconstructionHyper(Hyper):
    """The training hyperparameters every reconstruction family has."""

    image_size: Annotated[int, Field(ge=MIN_SIZE)] = 64  # 64-256 on a CPU
    epochs: PositiveInt = 20
    lr: PositiveFloat = 0.001
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    batch_size: PositiveInt = 16
    loss: Literal["mse", "ssim+l1"] = "mse"
    train_augment: bool = False  # random flips and small rotations during training
    rotation: Annotated[float, Field(ge=0, le=180)] = 10.0  # degrees, with train_augment
    score: Literal["mse", "max"] = "mse"


class ReconstructionFamily(Family):
    """A detector family that trains a network to reconstruct good images."""

    hyper: ClassVar[type[ReconstructionHyper]] = ReconstructionHyper
    seeded = True
    images = True
    holdout = True

    # --- what a family defines -------------------------------------------------------------
    def network(self, hp: Any, seed: int) -> nn.Module:
        """The config's untrained network (its random parts drawn after
        ``torch.manual_seed(seed)``)."""
        raise NotImplementedError

    def objective(self, hp: Any, x: torch.Tensor, out: Reconstruction) -> torch.Tensor:
        """The training loss of a batch (the reconstruction loss by default)."""
        return reconstruction_loss(x, out.images, hp.loss)

    def image_scores(self, hp: Any, residual: np.ndarray, out: Reconstruction) -> np.ndarray:
        """Image scores from the residual maps ``(n, S, S)`` (higher = more anomalous)."""
        if hp.score == "max":
            return anomaly_maps(residual, MAP_SIZE, SIGMA).max(axis=(1, 2)).astype(np.float64)
        return residual.mean(axis=(1, 2), dtype=np.float64)

    def check(self, hp: Any) -> None:
        """Raise ``HyperparameterError`` for a config that could never train."""

    # --- plan time -------------------------------------------------------------------------
    def checked_estimators(self, params: dict[str, Any]) -> list:
        return []

    def validate(self, config: DetectorConfig) -> None:
        self.check(self.hyperparams(config))

    # --- run time --------------------------------------------------------------------------
    def reference_one(
        self, X_train: np.ndarray, X_test: np.ndarray, config: DetectorConfig, seed: int
    ) -> Outcome:
        """Train on ``X_train`` ((n, 3, h, w) in [0, 1]), then score ``X_test`` (whose last
        ``Setting.held`` rows are the held-out good images: the validation loss's)."""
        t0 = time.perf_counter()
        try:
            hp = self.hyperparams(config)
            setting = current_setting()
            held = setting.held if setting else 0
            X = resize(X_train, hp.image_size)
            queries = resize(X_test, hp.image_size)
            torch.manual_seed(seed)
            net = self.network(hp, seed)
            label = (f"{setting.category} {self.name} {setting.key[:12]}".strip()
                     if setting else self.name)  # fmt: skip
            curve = fit(
                net, lambda x, out: self.objective(hp, x, out), X,
                queries[len(queries) - held :] if held else None,
                epochs=hp.epochs, lr=hp.lr, weight_decay=hp.weight_decay,
                batch_size=hp.batch_size, degrees=hp.rotation if hp.train_augment else None,
                seed=seed, workdir=checkpoint_dir(setting), label=label,
                device=run_device(setting),
            )  # fmt: skip
            t1 = time.perf_counter()
            out = reconstruct(net, queries, hp.batch_size)
            residual = (queries - out.images).square().mean(dim=1).numpy()
            scores = self.image_scores(hp, residual, out)
            t2 = time.perf_counter()
        except UserError:
            raise
        except Exception as exc:
            return Outcome(None, time.perf_counter() - t0, 0.0, error_text(exc))
        return Outcome(scores, t1 - t0, t2 - t1, maps=residual.astype(np.float32), curve=curve,
                       inputs=to_uint8(queries), reconstructions=to_uint8(out.images))  # fmt: skip


def power_of_two_error(hp: Any, depth: int) -> HyperparameterError | None:
    """``image_size`` must halve ``depth`` times without remainder."""
    if hp.image_size % 2**depth:
        return HyperparameterError("image_size", f"{hp.image_size} is not a multiple of "
                                   f"2**depth = {2**depth}")  # fmt: skip
    return None


__all__: Sequence[str] = ["ReconstructionFamily", "ReconstructionHyper", "power_of_two_error"]
