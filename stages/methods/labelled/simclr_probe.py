"""``SimCLRProbe``: contrastive pretraining (SimCLR) on the good training images, then a
logistic-regression probe on the embeddings of the labelled images (the document's
SimCLR ResNet-50 with a linear classifier on 10% labelled data).

- **Pretraining.** The pooled backbone (:class:`stages.methods.labelled.base.Encoder`,
  every block trained by default: ``unfreeze: 4``) and lightly's SimCLR projection head
  (``projection_hidden`` -> ``projection_dim``; the document: 2048 -> 1024 -> 256), trained
  with lightly's NT-Xent loss (``temperature`` 0.07) on two views of each good training
  image per epoch (AdamW, constant ``lr``). The views are lightly's SimCLR view transform
  (random resized crop down to ``min_scale`` of the area, horizontal flip, colour jitter
  with probability ``color_jitter``, grayscale ``gray_scale``, Gaussian blur ``blur``),
  applied to each image as an 8-bit PIL image (its documented input, about ten times
  faster than on tensors), on the CPU; the network runs on ``evaluate.device``. Its draws
  come from torch's (CPU) generator and numpy's global one, both seeded per (seed, epoch)
  (numpy's global state is restored afterwards).
- **Probe.** The encoder's embeddings (not the projection's) of the labelled images and of
  the good training images (extra negatives), standardised, to scikit-learn's
  ``LogisticRegression`` (``C = probe_c``, balanced class weights, seeded).
- **Score.** The probe's probability of "anomalous"; the decision threshold is 0.5. The
  embedding of an image: the encoder's (the probe's input).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchvision.transforms.v2 import functional as TF

from stages.methods.base import Fraction, PositiveFloat, PositiveInt
from stages.methods.epochs import batches, to_device, train_epochs
from stages.methods.labelled.base import (
    Encoder,
    LabelledFamily,
    LabelledHyper,
    Scorer,
    evaluated,
)
from stages.methods.labelled.grad_cam import grad_cam

Probability = Annotated[float, Field(ge=0, le=1)]


class SimCLRProbeHyper(LabelledHyper):
    unfreeze: Annotated[int, Field(ge=0)] = 4
    projection_hidden: PositiveInt = 1024
    projection_dim: PositiveInt = 256
    temperature: PositiveFloat = 0.07
    min_scale: Fraction = 0.08
    color_jitter: Probability = 0.8
    gray_scale: Probability = 0.2
    blur: Probability = 0.5
    probe_c: PositiveFloat = 1.0


class SimCLRNet(nn.Module):
    """The encoder and the projection head: images -> projections (the NT-Xent input)."""

    def __init__(self, encoder: Encoder, hidden: int, dim: int) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.encoder = encoder
        self.projection = SimCLRProjectionHead(encoder.dim, hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


@contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for the block (lightly's blur draws from it), its
    previous state restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def to_pil(X: torch.Tensor) -> list:
    """Images in [0, 1] as 8-bit RGB PIL images (rounded)."""
    return [TF.to_pil_image(img) for img in (X * 255.0).round().clamp(0, 255).to(torch.uint8)]


def probe_layer(probe: Any) -> nn.Linear:
    """The fitted probe (standardisation, then logistic regression) as one linear layer
    whose output is the logit of "anomalous" (for Grad-CAM's gradients)."""
    scaler, logistic = probe[0], probe[-1]
    sign = 1.0 if bool(logistic.classes_[1]) else -1.0
    w = sign * logistic.coef_[0] / scaler.scale_
    b = sign * (logistic.intercept_[0] - float(np.dot(logistic.coef_[0] / scaler.scale_,
                                                       scaler.mean_)))  # fmt: skip
    layer = nn.Linear(len(w), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w).float().view(1, -1))
        layer.bias.fill_(float(b))
    return layer


class SimCLRProbeFamily(LabelledFamily):
    name = "SimCLRProbe"
    hyper = SimCLRProbeHyper

    def train(self, hp: SimCLRProbeHyper, X_good: torch.Tensor, X_labelled: torch.Tensor,
              y_labelled: np.ndarray, seed: int, workdir: Path | None, label: str,
              device: torch.device | None = None) -> tuple[Scorer, list]:  # fmt: skip
        from lightly.loss import NTXentLoss
        from lightly.transforms import SimCLRViewTransform

        if len(X_good) < 2:
            raise ValueError(f"SimCLR needs at least 2 good training images (got {len(X_good)})")
        view = SimCLRViewTransform(input_size=hp.image_size, min_scale=hp.min_scale,
                                   cj_prob=hp.color_jitter, random_gray_scale=hp.gray_scale,
                                   gaussian_blur=hp.blur, normalize=None)  # fmt: skip
        images = to_pil(X_good)
        loss_fn = NTXentLoss(temperature=hp.temperature)
        device = device or torch.device("cpu")
        net = SimCLRNet(Encoder(hp.backbone, hp.init, hp.unfreeze, seed), hp.projection_hidden,
                        hp.projection_dim).to(device)  # fmt: skip
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad],
                                      lr=hp.lr, weight_decay=hp.weight_decay)  # fmt: skip

        def epoch(_: int, rng: np.random.Generator) -> tuple[float, float | None]:
            net.train()
            total = 0.0
            with numpy_global_seed(int(rng.integers(2**31))):
                for batch in batches(rng.permutation(len(images)), hp.batch_size):
                    a, b = (
                        to_device(torch.stack([view(images[i]) for i in batch]), device)
                        for _ in range(2)
                    )  # the views on the CPU (PIL), in order
                    loss = loss_fn(net(a), net(b))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(batch)
            return total / len(images), None

        curve = train_epochs(net, optimizer, None, epoch, epochs=hp.epochs, seed=seed,
                             patience=0, workdir=workdir, label=label)  # fmt: skip
        Z = evaluated(net.encoder, torch.cat([X_good, X_labelled]), hp.batch_size).numpy()
        y = np.concatenate([np.zeros(len(X_good), dtype=bool), y_labelled])
        probe = make_pipeline(StandardScaler(), LogisticRegression(
            C=hp.probe_c, class_weight="balanced", max_iter=1000, random_state=seed))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(Z, y)

        def score(X: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            Z = evaluated(net.encoder, X, hp.batch_size).numpy()
            p = probe.predict_proba(Z)[:, list(probe.classes_).index(True)]
            classifier = nn.Sequential(net.encoder, probe_layer(probe).to(device))
            maps = grad_cam(classifier, net.encoder.features, X, 0, p, hp.batch_size)
            return p, Z, maps

        return score, curve
