"""Offline distillation of EfficientAd's teacher PDN from efficientnet_lite0 features.

anomalib's EfficientAd loads a teacher Patch Description Network (PDN) pretrained by the
EfficientAD authors, which it would download; there is no network here. The paper made
that teacher by training the PDN to regress a pretrained network's patch features
(WideResNet-101's layer2 + layer3, PatchCore's features). We do the same with the one
pretrained network that works offline, efficientnet_lite0, on the training images
themselves instead of ImageNet: :func:`distill_teacher` trains anomalib's own PDN class
with MSE against standardised lite0 features, deterministically and resumably, and writes
a ``state_dict`` that loads strictly into ``EfficientAdModel(...).teacher``.

Geometry. anomalib feeds the teacher the image in [0, 1] at ``image_size`` (its
pre-processor only resizes; the PDN's ``forward`` applies the ImageNet normalisation
itself), so the PDN here sees exactly that. Without padding a PDN of input S outputs
``S/4 - 8`` cells (56 for 256), each seeing a 33 px patch at stride 4, and anomalib places
cell i on cell i + 4 of the ``S/4`` grid (``F.pad(map, (4, 4, 4, 4))``). lite0 sees the
same image at twice the size (as the public EfficientAD pretraining script feeds
WideResNet-101 512 px for a 256 px PDN): then its stage4 has stride 4 in PDN pixels and a
67 / 2 = 33 px receptive field, the PDN's own, so its grid is the ``S/4`` grid; the
targets are that grid cropped by 4 cells a side, the cells anomalib puts the PDN's on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.backbones import activation_shapes, get_backbone
from stages.io import stable_hash
from stages.progress import progress as progress_bar

BACKBONE = "efficientnet_lite0"
# stage4 (40 channels, stride 8) and stage6 (112 channels, stride 16) of lite0: the two
# mid-level stages at PatchCore's strides (WideResNet's layer2 and layer3, which the paper
# distils), 152 channels together. stage4 at twice the image size lands exactly on the
# PDN's stride-4 grid with its receptive field; stage6 adds context, bilinearly upsampled.
# stage3 (24 channels, stride 4) is too low-level to be worth regressing; stage8 (stride
# 32) is too coarse and would be mostly upsampling.
TEACHER_LAYERS: tuple[str, ...] = ("stage4", "stage6")
TARGET_SCALE = 2  # lite0 sees the image at TARGET_SCALE * image_size (see the module doc)
MAP_BORDER = 4  # cells anomalib pads an unpadded PDN map with on each side
WEIGHT_DECAY = 1e-5  # the paper's Adam weight decay for the PDN
FEATURE_CHUNK = 16  # images per lite0 forward when computing targets (fixed: determinism)
LOSS_WINDOW = 10  # the reported final loss is the mean over this many last steps
CODE_VERSION = 1  # bump when anything here changes the weights for the same identity


def teacher_channels() -> int:
    """Channels of the joined target: the EfficientAd ``teacher_out_channels`` to use."""
    shapes = activation_shapes(BACKBONE, list(TEACHER_LAYERS))
    return sum(shapes[layer][0] for layer in TEACHER_LAYERS)


@dataclass(frozen=True)
class DistillConfig:
    """How to distil the teacher. ``model_size`` is EfficientAd's ("small" or "medium");
    ``checkpoint_every`` (steps) only affects how much a kill costs, not the weights."""

    image_size: int = 256
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    model_size: str = "small"
    checkpoint_every: int = 100

    def identity(self) -> dict:
        """Everything the teacher's weights depend on besides the images, for hashing."""
        config = dataclasses.asdict(self)
        del config["checkpoint_every"]
        return {
            "config": config,
            "backbone": BACKBONE,
            "layers": list(TEACHER_LAYERS),
            "target_scale": TARGET_SCALE,
            "map_border": MAP_BORDER,
            "weight_decay": WEIGHT_DECAY,
            "anomalib": version("anomalib"),  # whose PDN architecture is trained
            "code_version": CODE_VERSION,
        }


def distill_teacher(
    images: np.ndarray,
    out_path: Path,
    config: DistillConfig,
    *,
    log: logging.Logger | None = None,
    progress: bool = True,
) -> Path:
    """Train an EfficientAd teacher PDN on ``images`` and write its ``state_dict`` to
    ``out_path``; return ``out_path`` at once when it exists already.

    ``images``: (n, 3, H, W) float32 or float16 RGB in [0, 1]; each is resized (bilinear,
    antialiased) to ``image_size`` for the PDN and to twice that for lite0. The batch of
    step t is a function of (seed, t) only and checkpoints (every ``checkpoint_every``
    steps, to ``out_path`` + ".partial") hold the whole training state, so a killed run
    resumes to bitwise the same weights as an uninterrupted one (on the same machine,
    torch build and thread count). The lite0 targets are computed once up front and kept
    until the end in ``out_path`` + ".targets" (float16, about 0.56 MB per image at
    image_size 256), so a resumed run does not recompute them.
    """
    log = log or logging.getLogger(__name__)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    cached = out_path.with_name(out_path.name + ".targets")
    if out_path.exists():
        log.info("teacher %s already distilled, skipping", out_path)
        partial.unlink(missing_ok=True)  # left by a kill between the last two writes
        cached.unlink(missing_ok=True)
        return out_path
    _check(images, config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    key = _run_key(images, config)
    state = _load_keyed(partial, key, log, "partial teacher checkpoint")

    pdn = _build_pdn(config)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=config.lr, weight_decay=WEIGHT_DECAY)
    out_hw = _pdn_output_size(config)
    targets = _load_keyed(cached, key, log, "cached teacher targets", mmap=True)
    if targets is None:
        size = config.image_size * TARGET_SCALE
        log.info("computing the lite0 targets of %d images at %d px", len(images), size)
        features = _lite0_features(images, size, progress)
        _save_atomic({"key": key, "features": features}, cached)
    else:
        features = targets["features"]
        log.info("reusing the lite0 targets cached in %s", cached)
    if state is None:
        start, losses = 0, []
        mean, std = _target_stats(features, out_hw)
    else:
        start, losses = int(state["step"]), list(state["losses"])
        mean, std = state["target_mean"], state["target_std"]
        pdn.load_state_dict(state["pdn"])
        optimizer.load_state_dict(state["optimizer"])
        log.info("resuming teacher distillation from step %d of %d", start, config.steps)

    pdn.train()
    bar = progress_bar(
        total=config.steps, initial=start, disable=not progress, unit="step", desc="distil teacher"
    )
    with bar:
        for step in range(start, config.steps):
            index = _batch_indices(len(images), config, step)
            target = (_targets(features, index, out_hw) - mean) / std
            loss = F.mse_loss(pdn(_pdn_input(images, index, config.image_size)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            done = step + 1
            if done % config.checkpoint_every == 0 and done < config.steps:
                checkpoint = {
                    "key": key,
                    "step": done,
                    "pdn": pdn.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "target_mean": mean,
                    "target_std": std,
                    "losses": losses,
                }
                _save_atomic(checkpoint, partial)

    _save_atomic(pdn.state_dict(), out_path)
    partial.unlink(missing_ok=True)
    cached.unlink(missing_ok=True)
    window = losses[-LOSS_WINDOW:]
    log.info(
        "teacher distilled to %s in %d steps: final loss %.6f (mean of the last %d steps; "
        "first step %.6f)",
        out_path, config.steps, sum(window) / len(window), len(window), losses[0],
    )  # fmt: skip
    return out_path


def _check(images: np.ndarray, config: DistillConfig) -> None:
    """ValueError unless ``images`` and ``config`` can be distilled (before any work)."""
    if not isinstance(images, np.ndarray) or images.dtype not in (np.float32, np.float16):
        raise ValueError("images must be a float32 or float16 numpy array")
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images must be (n >= 1, 3, H, W), got {images.shape}")
    low, high = float(images.min()), float(images.max())
    if not (low >= 0.0 and high <= 1.0):  # also false for NaN
        raise ValueError(f"images must lie in [0, 1], got [{low}, {high}]")
    if config.image_size < 64:  # an unpadded PDN's output shrinks to nothing below that
        raise ValueError(f"image_size must be at least 64, got {config.image_size}")
    if min(config.steps, config.batch_size, config.checkpoint_every) < 1:
        raise ValueError("steps, batch_size and checkpoint_every must be at least 1")
    _pdn_class(config.model_size)


def _pdn_class(model_size: str) -> type[nn.Module]:
    """anomalib's PDN class of EfficientAd's ``model_size`` ("small" / "medium")."""
    from anomalib.models.image.efficient_ad.torch_model import (
        EfficientAdModelSize,
        MediumPatchDescriptionNetwork,
        SmallPatchDescriptionNetwork,
    )

    try:
        size = EfficientAdModelSize(model_size)
    except ValueError:
        valid = ", ".join(s.value for s in EfficientAdModelSize)
        raise ValueError(f"unknown model_size '{model_size}' (valid: {valid})") from None
    if size == EfficientAdModelSize.M:
        return MediumPatchDescriptionNetwork
    return SmallPatchDescriptionNetwork


def _build_pdn(config: DistillConfig) -> nn.Module:
    """The PDN EfficientAd uses as teacher (padding=False, its default), seeded without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _pdn_class(config.model_size)(out_channels=teacher_channels(), padding=False)


def _pdn_output_size(config: DistillConfig) -> tuple[int, int]:
    """(h, w) of the PDN's output for an ``image_size`` input, computed on the meta device."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        pdn = _pdn_class(config.model_size)(out_channels=1, padding=False)
        out = pdn(torch.empty(1, 3, config.image_size, config.image_size))
    return int(out.shape[-2]), int(out.shape[-1])


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize to size x size, as anomalib's pre-processor's Resize."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _pdn_input(images: np.ndarray, index: np.ndarray, size: int) -> torch.Tensor:
    """What EfficientAd feeds its teacher: the images in [0, 1] at ``image_size``."""
    return _resize(torch.from_numpy(np.asarray(images[index], dtype=np.float32)), size)


def _lite0_features(images: np.ndarray, size: int, progress: bool) -> dict[str, torch.Tensor]:
    """Each TEACHER_LAYERS activation of lite0 (ImageNet weights) for every image at
    ``size``, normalised with lite0's mean and std; float16 to halve the memory (1.1 MB
    per 256 px image in float32)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    spec = get_backbone(BACKBONE)
    with torch.random.fork_rng(devices=[]):  # building draws a random init first
        model = spec.build("imagenet").eval()
    with warnings.catch_warnings():  # "nodes in eval mode are a subsequence": we only eval
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        nodes = {spec.layers[layer]: layer for layer in TEACHER_LAYERS}
        extractor = create_feature_extractor(model, return_nodes=nodes).eval()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    features: dict[str, torch.Tensor] = {}
    starts = range(0, len(images), FEATURE_CHUNK)
    bar = progress_bar(starts, disable=not progress, unit="chunk", desc="lite0 targets")
    with torch.no_grad():
        for start in bar:
            chunk = torch.from_numpy(np.asarray(images[start : start + FEATURE_CHUNK], np.float32))
            out = extractor((_resize(chunk, size) - mean) / std)
            for layer in TEACHER_LAYERS:
                if layer not in features:
                    shape = (len(images), *out[layer].shape[1:])
                    features[layer] = torch.empty(shape, dtype=torch.float16)
                features[layer][start : start + len(chunk)] = out[layer]
    for layer, value in features.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"lite0 {layer} features overflow float16")
    return features


def _targets(
    features: dict[str, torch.Tensor], index: np.ndarray | slice, out_hw: tuple[int, int]
) -> torch.Tensor:
    """The unstandardised targets of images ``index``: the layers joined on the finest grid
    (bilinear), resized to anomalib's map grid (the PDN output plus MAP_BORDER cells a side;
    a no-op when lite0's stage4 already is that grid) and cropped to the PDN's cells."""
    index = torch.from_numpy(index) if isinstance(index, np.ndarray) else index
    maps = [features[layer][index].float() for layer in TEACHER_LAYERS]
    fine = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    maps = [_bilinear(m, fine) for m in maps]
    h, w = out_hw
    joined = _bilinear(torch.cat(maps, dim=1), (h + 2 * MAP_BORDER, w + 2 * MAP_BORDER))
    return joined[:, :, MAP_BORDER : MAP_BORDER + h, MAP_BORDER : MAP_BORDER + w]


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _target_stats(
    features: dict[str, torch.Tensor], out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (1, C, 1, 1) of the targets over every image and cell,
    in two float64 passes; a constant channel gets std 1."""
    n = len(next(iter(features.values())))
    chunks = [slice(start, start + FEATURE_CHUNK) for start in range(0, n, FEATURE_CHUNK)]
    total, count = 0.0, 0
    for chunk in chunks:
        target = _targets(features, chunk, out_hw).double()
        total = total + target.sum(dim=(0, 2, 3))
        count += target.numel() // target.shape[1]
    mean = total / count
    squares = 0.0
    for chunk in chunks:
        target = _targets(features, chunk, out_hw).double()
        squares = squares + ((target - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    std = (squares / count).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def _batch_indices(n: int, config: DistillConfig, step: int) -> np.ndarray:
    """The images of step ``step``: a slice of epoch ``step // (n // batch)``'s permutation
    drawn from (seed, epoch) alone, so a resumed run draws the same batches."""
    batch = min(config.batch_size, n)
    epoch, position = divmod(step, n // batch)
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    return order[position * batch : (position + 1) * batch]


def _run_key(images: np.ndarray, config: DistillConfig) -> str:
    """What a partial checkpoint must match to be resumed: the identity and the images
    (shape, dtype and a digest of their bytes)."""
    digest = hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=16).hexdigest()
    run = {
        "identity": config.identity(),
        "images": [list(images.shape), str(images.dtype), digest],
    }
    return stable_hash(run)


def _load_keyed(
    path: Path, key: str, log: logging.Logger, what: str, mmap: bool = False
) -> dict[str, Any] | None:
    """The dict saved at ``path`` (a partial checkpoint or cached targets) when its "key"
    is this run's; otherwise None, and a stale or unreadable file is deleted (and logged)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        stale = not isinstance(state, dict) or state.get("key") != key
    except Exception as exc:  # truncated or foreign file: start over
        log.warning("ignoring unreadable %s %s (%s); deleting it", what, path, exc)
        path.unlink(missing_ok=True)
        return None
    if stale:
        log.warning(
            "ignoring %s %s: it belongs to another configuration or other images; deleting it",
            what, path,
        )  # fmt: skip
        path.unlink(missing_ok=True)
        return None
    return state


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file next to ``path``, then os.replace it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
