"""``SupervisedCNN``: a convolutional network trained to tell good images from defects, on
the good training images (label 0, extra negatives) and the labelled pool images of the
few-labels protocol (the document's supervised ResNet-50).

- **Network.** The pooled backbone (:class:`stages.methods.labelled.base.Encoder`; the
  document: ResNet-50 with its last two blocks unfrozen, ``unfreeze: 2``) and the
  document's head: Dropout ``dropout`` -> Linear ``hidden`` -> ReLU -> BatchNorm ->
  Dropout ``hidden_dropout`` -> Linear 2.
- **Training.** Cross-entropy weighted by the classes' counts (``n / (2 n_c)``, as
  scikit-learn's ``balanced``), AdamW with a one-cycle learning rate (``OneCycleLR``,
  peak ``lr``, one step per batch; its state is checkpointed with the weights), random
  horizontal and vertical flips per image (``flips``, drawn per seed and epoch).
- **Early stopping** (``patience`` epochs without improvement; 0: off): on a seeded,
  stratified validation slice of the training set (``val_fraction`` of each class) when
  that slice has at least one image of each class (both classes have at least
  ``1 / val_fraction`` images), else on the training loss (then every image trains). The
  best epoch's weights score.
- **Score.** The softmax probability of "anomalous"; the decision threshold is 0.5. The
  embedding of an image: the head's ``hidden`` features; its map: Grad-CAM of the
  "anomalous" logit at the encoder's deepest block.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import nn

from stages.methods.base import PositiveInt
from stages.methods.epochs import batches, to_device, train_epochs
from stages.methods.labelled.base import (
    Encoder,
    LabelledFamily,
    LabelledHyper,
    Scorer,
    evaluated,
)
from stages.methods.labelled.grad_cam import grad_cam

VAL_SALT = 0x5EED  # the validation slice's generator: [seed, VAL_SALT] (not an epoch's)
Dropout = Annotated[float, Field(ge=0, lt=1)]


class SupervisedCNNHyper(LabelledHyper):
    hidden: PositiveInt = 512
    dropout: Dropout = 0.5
    hidden_dropout: Dropout = 0.3
    flips: bool = True
    patience: Annotated[int, Field(ge=0)] = 5
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2


class Classifier(nn.Module):
    """The pooled encoder and the document's two-layer head: (B, 3, S, S) -> (B, 2) logits."""

    def __init__(self, encoder: Encoder, hidden: int, dropout: float,
                 hidden_dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.dim, hidden), nn.ReLU(),
                                  nn.BatchNorm1d(hidden), nn.Dropout(hidden_dropout),
                                  nn.Linear(hidden, 2))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The head's hidden features (after its BatchNorm; eval mode: no dropout)."""
        return self.head[:4](self.encoder(x))


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation positions: ``floor(fraction n_c)`` seeded images of each
    class, or no validation slice when a class would have none there."""
    rng = np.random.default_rng([seed, VAL_SALT])
    members = [np.flatnonzero(y == c) for c in (0, 1)]
    sizes = [math.floor(fraction * len(m)) for m in members]
    if min(sizes) < 1:
        return np.arange(len(y)), np.arange(0)
    val = np.sort(np.concatenate([rng.permutation(m)[:k] for m, k in zip(members, sizes,
                                                                        strict=True)]))  # fmt: skip
    return np.setdiff1d(np.arange(len(y)), val), val


def flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image flipped horizontally and vertically, each with probability 1/2 (exact)."""
    h, v = (torch.from_numpy(rng.random(len(x)) < 0.5) for _ in range(2))
    x = torch.where(h.view(-1, 1, 1, 1), x.flip(-1), x)
    return torch.where(v.view(-1, 1, 1, 1), x.flip(-2), x)


class SupervisedCNNFamily(LabelledFamily):
    name = "SupervisedCNN"
    hyper = SupervisedCNNHyper

    def train(self, hp: SupervisedCNNHyper, X_good: torch.Tensor, X_labelled: torch.Tensor,
              y_labelled: np.ndarray, seed: int, workdir: Path | None, label: str,
              device: torch.device | None = None) -> tuple[Scorer, list]:  # fmt: skip
        device = device or torch.device("cpu")
        X = torch.cat([X_good, X_labelled])
        y = np.concatenate([np.zeros(len(X_good), dtype=np.int64), y_labelled.astype(np.int64)])
        train, val = validation_split(y, hp.val_fraction if hp.patience else 0.0, seed)
        counts = np.bincount(y[train], minlength=2)
        weight = torch.tensor(len(train) / (2.0 * counts), dtype=torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weight).to(device)
        target = torch.from_numpy(y)
        net = Classifier(Encoder(hp.backbone, hp.init, hp.unfreeze, seed), hp.hidden,
                         hp.dropout, hp.hidden_dropout).to(device)  # fmt: skip
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad],
                                      lr=hp.lr, weight_decay=hp.weight_decay)  # fmt: skip
        steps = len(batches(train, hp.batch_size))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr,
                                                        total_steps=hp.epochs * steps)  # fmt: skip

        def epoch(_: int, rng: np.random.Generator) -> tuple[float, float | None]:
            net.train()
            total = 0.0
            for batch in batches(rng.permutation(train), hp.batch_size):
                x = flip(X[batch], rng) if hp.flips else X[batch]
                x, t = to_device(x, device), to_device(target[batch], device)
                loss = loss_fn(net(x), t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(batch)
            if not len(val):
                return total / len(train), None
            logits = evaluated(net, X[val], hp.batch_size)
            val_loss = loss_fn(logits.to(device), target[val].to(device))
            return total / len(train), float(val_loss)

        curve = train_epochs(net, optimizer, scheduler, epoch, epochs=hp.epochs, seed=seed,
                             patience=hp.patience, workdir=workdir, label=label)  # fmt: skip

        def score(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            hidden = evaluated(net, images, hp.batch_size, net.penultimate)
            with torch.no_grad():
                logits = net.head[4:](hidden.to(device)).cpu()
            p = logits.softmax(dim=1)[:, 1].numpy()
            maps = grad_cam(net, net.encoder.features, images, 1, p, hp.batch_size)
            return p, hidden.numpy(), maps

        return score, curve
