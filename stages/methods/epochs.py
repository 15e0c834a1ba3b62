"""The epoch loop of the families that train a network (the reconstruction and the labelled
ones): seeded, resumable, with optional early stopping, whatever one epoch does (a
reconstruction pass, a supervised one, a contrastive one).

- **Determinism.** Epoch ``e`` draws everything from ``numpy.random.default_rng([seed,
  e])``: the epoch function gets that generator (image order, augmentations), and the
  torch seed is set from it before the epoch starts (dropout, a VAE's samples,
  torchvision's random transforms). So a
  training resumed at epoch ``e`` computes bitwise what an uninterrupted one computes from
  there (same seed and threads, one machine).
- **Checkpoints.** After every epoch the model's weights, the optimizer's and the learning
  rate scheduler's states, the early-stopping state (best loss, its epoch and weights, the
  epochs since) and the curve so far are written atomically (``stages.io.atomic_path``) to
  ``epoch.pt``: a kill costs at most the epoch under way; a rerun logs ``resuming training
  from epoch N of M``. An unreadable checkpoint is retrained from epoch 0.
- **Early stopping** (``patience`` > 0): on the epoch's validation loss when the epoch
  function returns one, else on its training loss; after ``patience`` epochs without a
  lower loss training stops. Either way the model ends with its best epoch's weights.
- **Curve.** Per epoch: the training loss (mean over its images), the validation loss
  (``None`` without a validation set) and seconds.
- **Device** (``evaluate.device``, :func:`run_device`): the model and its batches on the
  experiment's device (pinned memory and asynchronous copies on CUDA), scores and maps back
  on the CPU. Checkpoints hold CPU tensors only and load with ``map_location="cpu"`` (the
  optimizer's state follows its parameters' device), so a training checkpointed on CUDA
  resumes on the CPU and vice versa (continuing on another device's kernels: not bitwise
  what an uninterrupted run computes). On CUDA, cuDNN runs deterministic and unbenchmarked,
  PyTorch's deterministic algorithms are on (ops without a deterministic CUDA kernel warn)
  and cuBLAS gets a fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``): same device
  model, seed, PyTorch and CUDA versions, same bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.device import deterministic_cuda, resolve_device
from stages.io import atomic_path
from stages.methods.base import Setting, say

CHECKPOINT = "epoch.pt"
# One epoch: (epoch index from 0, its generator) -> (training loss, validation loss or None).
EpochStep = Callable[[int, np.random.Generator], tuple[float, float | None]]


def run_device(setting: Setting | None) -> torch.device:
    """The device an experiment's network runs on: its setting's ``device`` (the stage's
    ``evaluate.device``, resolved; the CPU outside the stage). Plain ``cuda`` in a local
    cluster's GPU worker (named by its number) is that worker's own GPU, ``cuda:<name>``;
    elsewhere ``cuda:0`` of the GPUs the worker sees. On CUDA, the deterministic settings."""
    spec = setting.device if setting is not None else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    deterministic_cuda()
    device = resolve_device(spec, "evaluate.device")
    if spec == "cuda":
        name = _worker_name()
        if isinstance(name, int) and name < torch.cuda.device_count():
            device = torch.device("cuda", name)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def _worker_name() -> object:
    try:
        from distributed import get_worker

        return get_worker().name
    except ValueError:  # not in a Dask worker
        return None


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: through pinned memory, asynchronously, on CUDA (the
    same tensor on the CPU)."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def cpu_state(value: Any) -> Any:
    """``value`` (a state dict, nested) with every tensor copied to the CPU: what a
    checkpoint holds, whatever the training's device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_state(v) for v in value)
    return value


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of ``order``; a last batch of one image joins the one before
    (BatchNorm in training mode, and NT-Xent, need two images)."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2:] = [np.concatenate(out[-2:])]
    return out


@dataclass
class EarlyStopping:
    """The lowest monitored loss so far, its epoch and weights, and the epochs since."""

    patience: int  # 0: never stop early
    best: float = math.inf
    best_epoch: int = 0
    waited: int = 0
    weights: dict[str, torch.Tensor] | None = None

    def update(self, loss: float, epoch: int, model: nn.Module) -> bool:
        """Record epoch ``epoch``'s loss; whether training stops here."""
        if not self.patience:
            return False
        if loss < self.best:
            self.best, self.best_epoch, self.waited = loss, epoch, 0
            self.weights = cpu_state(model.state_dict())
            return False
        self.waited += 1
        return self.waited >= self.patience


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None


def train_epochs(model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, step: EpochStep, *,
                 epochs: int, seed: int, patience: int, workdir: Path | None,
                 label: str) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``step`` for up to ``epochs`` epochs (resuming from ``workdir``'s checkpoint);
    ``model``, ``optimizer`` and ``scheduler`` are what the checkpoints hold. Returns the
    learning curve, one entry per epoch run (also those of an interrupted run)."""
    curve: list[dict[str, Any]] = []
    stopping = EarlyStopping(patience)
    start, stopped = 0, False
    path = workdir / CHECKPOINT if workdir is not None else None
    if path is not None and path.exists():
        state = _load(path)
        if state is None:
            say(f"{label}: unreadable checkpoint {path}, training from epoch 0")
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            stopping = EarlyStopping(patience, **state["stopping"])
            curve, start, stopped = state["curve"], int(state["epoch"]), bool(state["stopped"])
            if stopped or start >= epochs:
                say(f"{label}: already trained ({start} epochs, checkpoint {path}), "
                    "skipping training")  # fmt: skip
            else:
                say(f"{label}: resuming training from epoch {start} of {epochs} "
                    f"(checkpoint {path})")  # fmt: skip
    for epoch in range(start, epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(int(rng.integers(2**31)))
        train_loss, val_loss = step(epoch, rng)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch + 1} "
                                     "(lower lr?)")  # fmt: skip
        curve.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                      "seconds": time.perf_counter() - t0})  # fmt: skip
        stopped = stopping.update(train_loss if val_loss is None else val_loss, epoch + 1, model)
        if stopped:
            say(f"{label}: stopped early at epoch {epoch + 1} of {epochs} (best: epoch "
                f"{stopping.best_epoch})")  # fmt: skip
        if path is not None:
            state = {"model": cpu_state(model.state_dict()),
                     "optimizer": cpu_state(optimizer.state_dict()),
                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                     "stopping": {"best": stopping.best, "best_epoch": stopping.best_epoch,
                                  "waited": stopping.waited, "weights": stopping.weights},
                     "epoch": epoch + 1, "stopped": stopped, "curve": curve}  # fmt: skip
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
    if stopping.weights is not None:
        model.load_state_dict(stopping.weights)
    return curve
