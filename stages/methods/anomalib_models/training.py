"""The training glue: an anomalib model fitted through anomalib's ``Engine`` on in-memory
images, resumable and deterministic, then scored without anomalib's post-processing.

- **Data.** The training images arrive as one float tensor ``(n, 3, h, w)`` in [0, 1] (the
  pixels backbone's ``image`` rows). :class:`StepStream` yields the batches of steps
  ``start .. n_steps - 1``; batch ``t`` is a function of ``(seed, t)`` only (a seeded
  permutation per pass over the images), so a resumed training draws exactly the batches
  an uninterrupted one would have drawn. One-pass models (PatchCore, PaDiM, DFM: anomalib's
  ``max_epochs: 1``) get one pass in order.
- **Randomness.** :class:`StepSeeds` reseeds torch, numpy and ``random`` from ``(seed, t)``
  before every step: whatever a model draws inside a step (EfficientAd's augmentation) is
  the same with or without a resume.
- **Checkpoints.** :class:`StepCheckpoint` saves Lightning's full training state (weights,
  optimizer, scheduler, loop counters) every ``every`` steps and at the end, atomically
  (a temporary file, then a rename): a kill costs at most ``every`` steps, and a finished
  training found on disk is not repeated.
- **Scores.** :func:`score` runs the torch model in eval mode on the pre-processed images:
  raw image scores and anomaly maps, the inputs of the project's own metrics (anomalib's
  post-processor would min-max normalise and clamp them).
- **Device** (``evaluate.device``): Lightning's ``accelerator``/``devices`` (``cpu``, or
  ``gpu`` on the one CUDA device, ``deterministic="warn"``); Lightning moves the model and
  batches and reloads checkpoints onto its device; scoring runs there too, results on the
  CPU.
"""

from __future__ import annotations

import io
import logging
import os
import random
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from stages.methods.base import say
from stages.methods.epochs import to_device

CHECKPOINT = "last.ckpt"


@contextmanager
def quiet() -> Iterator[None]:
    """anomalib's and Lightning's info lines, warnings and progress bars (its coreset
    selection's, its calibrations') off for the block: the stage shows its own progress.
    The bars write to stderr, which is captured meanwhile (a worker runs one task at a
    time) and echoed only if the block fails."""
    names = ("lightning", "lightning.pytorch", "lightning_fabric", "pytorch_lightning", "anomalib")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    captured = io.StringIO()
    with warnings.catch_warnings(), redirect_stderr(captured):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        except BaseException:
            sys.__stderr__.write(captured.getvalue()[-4000:])
            raise
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of step ``step`` (a function of the seed and the step only)."""
    return np.random.default_rng([seed, step])


class StepStream(IterableDataset):
    """Batches of the steps ``start .. n_steps - 1`` as anomalib ``ImageBatch``es.

    ``shuffle``: pass ``p`` over the images (``t * batch_size // n``) is the permutation
    of ``default_rng([seed, p])``, and step ``t`` takes its next ``batch_size`` items
    (wrapping into the next pass); else the images in order, one pass."""

    def __init__(self, images: torch.Tensor, batch_size: int, n_steps: int, start: int,
                 seed: int, shuffle: bool) -> None:  # fmt: skip
        super().__init__()
        self.images, self.batch_size, self.n_steps = images, batch_size, n_steps
        self.start, self.seed, self.shuffle = start, seed, shuffle

    def indices(self, step: int) -> np.ndarray:
        n = len(self.images)
        if not self.shuffle:
            return np.arange(step * self.batch_size, min((step + 1) * self.batch_size, n))
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = np.empty(len(positions), dtype=np.int64)
        for i, pos in enumerate(positions):
            p, j = divmod(int(pos), n)
            out[i] = np.random.default_rng([self.seed, p]).permutation(n)[j]
        return out

    def __iter__(self) -> Iterator[Any]:
        from anomalib.data import ImageBatch

        for step in range(self.start, self.n_steps):
            idx = torch.from_numpy(self.indices(step))
            image = self.images[idx].float()
            yield ImageBatch(image=image, gt_label=torch.zeros(len(idx), dtype=torch.long))


def steps_of(n_images: int, batch_size: int, max_steps: int | None) -> int:
    """Training steps: ``max_steps`` for a model that trains, else one pass."""
    return max_steps if max_steps is not None else -(-n_images // batch_size)


def _datamodule(stream: StepStream, batch_size: int) -> Any:
    """A Lightning data module over ``stream``, with what anomalib's ``Engine`` and models
    read from one (``name``, ``category``, ``train_batch_size``)."""
    from lightning.pytorch import LightningDataModule

    class Images(LightningDataModule):
        name = "images"
        category = ""
        train_batch_size = batch_size

        def train_dataloader(self) -> DataLoader:
            return DataLoader(stream, batch_size=None, num_workers=0)

    return Images()


def _callbacks(seed: int, every: int, path: Path) -> list[Any]:
    from lightning.pytorch.callbacks import Callback

    class StepSeeds(Callback):
        """Torch, numpy and ``random`` reseeded from ``(seed, step)`` before every step."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            bits = step_rng(seed, trainer.global_step).integers(0, 2**31, size=3)
            torch.manual_seed(int(bits[0]))
            np.random.seed(int(bits[1]))
            random.seed(int(bits[2]))

    class StepCheckpoint(Callback):
        """Lightning's training state every ``every`` steps and at the end, atomically."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if every and trainer.global_step % every == 0:
                save(trainer)

        def on_train_end(self, trainer, pl_module) -> None:
            save(trainer)

    def save(trainer: Any) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        os.replace(tmp, path)

    return [StepSeeds(), StepCheckpoint()]


def checkpoint_step(path: Path) -> int | None:
    """The global step saved in a checkpoint; ``None`` when absent or unreadable (a
    checkpoint is written atomically, so unreadable means damaged otherwise: retrained)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["global_step"])
    except Exception:
        return None


def train(model: Any, images: torch.Tensor, *, batch_size: int, max_steps: int | None,
          seed: int, workdir: Path, every: int, label: str,
          device: torch.device | None = None) -> dict[str, Any]:  # fmt: skip
    """Fit ``model`` through anomalib's ``Engine`` on ``images`` on ``device`` (``None``:
    the CPU); resume from the checkpoint in ``workdir`` when there is one. Returns what
    happened (``steps``, ``resumed_from``)."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CHECKPOINT
    n_steps = steps_of(len(images), batch_size, max_steps)
    start = checkpoint_step(path)
    if start is None and path.exists():
        say(f"{label}: unreadable checkpoint {path}, training from step 0")
        path.unlink()
    trained = max_steps is not None
    if start is not None and (start >= n_steps or not trained):
        say(f"{label}: already trained ({start} steps, checkpoint {path}), skipping training")
    elif start:
        say(f"{label}: resuming training from step {start} of {n_steps} (checkpoint {path})")
    stream = StepStream(images, batch_size, n_steps, start or 0, seed, shuffle=trained)
    limits = {"max_steps": n_steps, "max_epochs": -1} if trained else {}
    where = accelerator(device or torch.device("cpu"))
    engine = Engine(
        default_root_dir=workdir / "engine",
        **where,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        # anomalib's own checkpoint callback saves nothing (save_top_k=0): ours do
        callbacks=[
            *_callbacks(seed, every if trained else 0, path),
            ModelCheckpoint(dirpath=workdir / "engine", save_top_k=0),
        ],
        **limits,
    )
    torch.manual_seed(seed)  # whatever the model draws before its first step
    np.random.seed(seed)
    random.seed(seed)
    resume = str(path) if start is not None else None
    if start is not None and (start >= n_steps or not trained):
        resume_only(model, path)
    else:
        with quiet():
            engine.fit(model=model, datamodule=_datamodule(stream, batch_size), ckpt_path=resume)
    return {"steps": n_steps, "resumed_from": start}


def accelerator(device: torch.device) -> dict[str, Any]:
    """Lightning's ``accelerator``, ``devices`` (and, on CUDA, ``deterministic``) for
    ``device``."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0], "deterministic": "warn"}
    return {"accelerator": "cpu", "devices": 1}


def resume_only(model: Any, path: Path) -> None:
    """Load a finished training's weights (and buffers: PaDiM's statistics, EfficientAd's
    normalisation) from its checkpoint instead of training again."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"], strict=False)


@torch.no_grad()
def score(model: Any, images: torch.Tensor, batch_size: int,
          device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Raw image scores ``(n,)`` float64 and anomaly maps ``(n, h, w)`` float32 of the
    torch model in eval mode on ``device`` (``None``: the CPU; the model is moved there),
    on the CPU images moved there and pre-processed as in training."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    net = model.model.eval()
    transform = model.pre_processor.transform if model.pre_processor else None
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        x = to_device(images[start : start + batch_size].float(), device)
        if transform is not None:
            x = transform(x)
        out = net(x)
        scores.append(out.pred_score.reshape(len(x)).double().cpu().numpy())
        amap = out.anomaly_map.reshape(len(x), *out.anomaly_map.shape[-2:]).float()
        maps.append(amap.cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)
