"""The training glue of the reconstruction families: a seeded, resumable epoch loop, and
scoring by reconstruction residuals.

- **Determinism and checkpoints**: :mod:`stages.methods.epochs` (epoch ``e`` draws the
  image order, every batch's augmentation and the VAE's samples from ``(seed, e)``; the
  weights, the optimizer's state and the curve are written atomically after every epoch,
  and a rerun resumes). The initial weights come from ``torch.manual_seed(seed)``. Same
  seed and threads: bitwise the same weights and scores (on one machine: BLAS kernels
  differ between CPUs).
- **Augmentation** (``train_augment``): per image, a horizontal and a vertical flip each
  with probability 1/2 and a rotation uniform in +-``rotation`` degrees, as one bilinear
  resampling (``affine_grid``/``grid_sample``, reflection padding: no black corners).
- **Curve.** Per epoch: the mean training loss over its batches (weighted by batch size),
  the loss of the held-out good images in eval mode (``None`` without them) and seconds.
- **Device** (``device``): the network and the training images on it (copied once, pinned
  and asynchronously on CUDA; the augmentation runs there too); reconstructions come back
  on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.methods.epochs import to_device, train_epochs
from stages.methods.reconstruction.networks import Reconstruction

Objective = Callable[[torch.Tensor, Reconstruction], torch.Tensor]


def resize(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """``(n, 3, h, w)`` images as float32 ``(n, 3, size, size)`` (bilinear, antialiased;
    unchanged when already that size)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(0.0, 1.0)  # fmt: skip


def augment(x: torch.Tensor, rng: np.random.Generator, degrees: float) -> torch.Tensor:
    """Random flips and a small rotation per image, drawn from ``rng``."""
    n = len(x)
    angle = np.deg2rad(rng.uniform(-degrees, degrees, size=n))
    flip_x = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    flip_y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.stack([np.stack([cos * flip_x, -sin * flip_y, np.zeros(n)], 1),
                      np.stack([sin * flip_x, cos * flip_y, np.zeros(n)], 1)], 1)  # fmt: skip
    theta_t = torch.from_numpy(theta).float().to(x.device)
    grid = F.affine_grid(theta_t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _batches(n: int, batch_size: int, order: np.ndarray | None = None) -> list[np.ndarray]:
    idx = np.arange(n) if order is None else order
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def mean_loss(net: nn.Module, objective: Objective, X: torch.Tensor, batch_size: int) -> float:
    """The objective over ``X`` in eval mode, weighted by batch size."""
    net.eval()
    total = sum(float(objective(X[b], net(X[b]))) * len(b) for b in _batches(len(X), batch_size))
    return total / len(X)  # X on the network's device


def fit(net: nn.Module, objective: Objective, X: torch.Tensor, X_val: torch.Tensor | None,
        *, epochs: int, lr: float, weight_decay: float, batch_size: int, degrees: float | None,
        seed: int, workdir: Path | None, label: str,
        device: torch.device | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Train ``net`` (Adam) on ``X`` for ``epochs`` (:func:`stages.methods.epochs.train_epochs`:
    seeded per epoch, checkpointed, resumed from ``workdir``) on ``device`` (``net`` is moved
    there and stays; ``None``: the CPU); ``degrees``: augment with this rotation range (``None``: no
    augmentation). Returns the learning curve, one entry per epoch (also those of a
    previous, interrupted run)."""
    device = device or torch.device("cpu")
    net.to(device)
    X = to_device(X, device)
    X_val = None if X_val is None else to_device(X_val, device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def epoch(_: int, rng: np.random.Generator) -> tuple[float, float | None]:
        net.train()
        total = 0.0
        for batch in _batches(len(X), batch_size, rng.permutation(len(X))):
            x = X[batch]
            if degrees is not None:
                x = augment(x, rng, degrees)
            loss = objective(x, net(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        has_val = X_val is not None and len(X_val)
        return total / len(X), mean_loss(net, objective, X_val, batch_size) if has_val else None

    return train_epochs(net, optimizer, None, epoch, epochs=epochs, seed=seed, patience=0,
                        workdir=workdir, label=label)  # fmt: skip


@torch.no_grad()
def reconstruct(net: nn.Module, X: torch.Tensor, batch_size: int) -> Reconstruction:
    """Every image's reconstruction (eval mode: the VAE decodes its mean), on the CPU
    whatever the network's device (``X``: CPU images)."""
    net.eval()
    device = next(net.parameters()).device
    Xd = to_device(X, device)
    outs = [net(Xd[b]) for b in _batches(len(X), batch_size)]
    kl = None if outs[0].kl is None else torch.cat([o.kl for o in outs]).cpu()
    return Reconstruction(torch.cat([o.images for o in outs]).cpu(), kl)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] as uint8 (for pictures)."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
