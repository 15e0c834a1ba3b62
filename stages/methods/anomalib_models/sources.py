"""Where EfficientAd's teacher and penalty images come from, and what they are.

- **Teacher.** ``distilled-efficientnet_lite0`` (default): a PDN distilled from
  efficientnet_lite0's ImageNet features on every category's good training images of the
  image index (:mod:`.teacher`), stored as ``<scratch>/teachers/<hash>.pth``; ``anomalib``:
  the file anomalib would download (``pretrained_teacher_<size>.pth`` under its
  pre-trained folder), which must be placed there by hand; anything else: a ``.pth`` file
  of the PDN's ``state_dict``. Resolved at plan time to ``<origin>:<hash>``: the
  distillation's config and images, or the file's content.
- **Penalty images** (EfficientAd's ImageNet penalty): ``other-categories`` (default): the
  good training images of every other category of the index, or a folder of images
  (searched recursively). Resolved to ``<origin>:<hash>`` of the images' content hashes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.errors import UserError
from stages.io import sha256_file, stable_hash

if TYPE_CHECKING:
    from stages.methods.anomalib_models import AnomalibHyper
    from stages.methods.base import Setting

log = logging.getLogger("stages.evaluate")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PENALTY_LIMIT = 1000  # penalty images at most (a seeded sample of them beyond)
ANOMALIB_URL = ("https://github.com/open-edge-platform/anomalib/releases/download/"
                "efficientad_pretrained_weights/efficientad_pretrained_weights.zip")  # fmt: skip


# --- the image index's good training images ---------------------------------------------------
def good_training_rows(setting: Setting) -> list[dict[str, Any]]:
    """Every category's good training originals of the image index, by category and id."""
    from stages.dataset import read_index

    table = read_index(setting.index).select(["category", "image_id", "split", "defect_type",
                                              "path", "sha256"])  # fmt: skip
    rows = [r for r in table.to_pylist() if r["split"] == "train" and r["defect_type"] == "good"]
    return sorted(rows, key=lambda r: (r["category"], r["image_id"]))


def decode(paths: Sequence[str], crop: bool, threads: int = 2) -> np.ndarray:
    """``(n, 3, 224, 224)`` uint8 RGB: each image through the networks' resize and crop
    (``stages.images``; the pixels backbone's geometry), decoded on ``threads``."""
    from PIL import Image

    from stages.images import read_image, resize_crop

    def one(path: str) -> np.ndarray:
        try:
            with read_image(path) as image:
                rgb = resize_crop(image.convert("RGB"), "pixels", crop, Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        except OSError as exc:
            raise UserError(f"{path}: cannot read this image ({exc})") from None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        images = list(pool.map(one, paths))
    return np.stack(images) if images else np.zeros((0, 3, 224, 224), dtype=np.uint8)


# --- teacher -----------------------------------------------------------------------------------
def _distill_config(hp: AnomalibHyper, seed: int = 0) -> Any:
    from stages.methods.anomalib_models.teacher import DistillConfig

    return DistillConfig(image_size=hp.teacher_image_size or hp.image_size,
                         steps=hp.teacher_steps, batch_size=hp.teacher_batch_size, seed=seed,
                         model_size=str(hp.model_extra.get("model_size", "small")),
                         checkpoint_every=hp.checkpoint_every)  # fmt: skip


def anomalib_teacher_file(model_size: str) -> Path:
    """Where anomalib 2.7 looks for its pretrained EfficientAd teacher before downloading."""
    from anomalib.models.image.efficient_ad.lightning_model import get_pretrained_weights_dir

    size = {"s": "small", "m": "medium"}.get(model_size, model_size)
    return get_pretrained_weights_dir() / "efficientad_pretrained_weights" / (
        f"pretrained_teacher_{size}.pth")  # fmt: skip


def resolve_teacher(hp: AnomalibHyper, setting: Setting) -> str:
    """``<origin>:<hash>`` of the config's teacher; a one-line error when its file is absent."""
    if hp.teacher == "distilled-efficientnet_lite0":
        rows = good_training_rows(setting)
        if not rows:
            raise UserError(f"{setting.index}: no good training images to distil EfficientAd's "
                            "teacher from")  # fmt: skip
        identity = {"config": _distill_config(hp).identity(),
                    "images": [r["sha256"] for r in rows], "crop": setting.crop}  # fmt: skip
        return f"{hp.teacher}:{stable_hash(identity)[:16]}"
    if hp.teacher == "anomalib":
        path = anomalib_teacher_file(str(hp.model_extra.get("model_size", "small")))
        if not path.is_file():
            raise UserError(f"EfficientAd teacher: anomalib's pretrained teacher {path} is not "
                            f"there and cannot be downloaded here (get {ANOMALIB_URL} "
                            f"elsewhere and unzip it into {path.parents[1]}, or use "
                            "teacher: distilled-efficientnet_lite0)")  # fmt: skip
        return f"anomalib:{sha256_file(path)[:16]}"
    path = Path(hp.teacher)
    if not path.is_file():
        raise UserError(f"EfficientAd teacher: {path} not found (a .pth state_dict of the PDN "
                        "teacher; or use teacher: distilled-efficientnet_lite0)")  # fmt: skip
    return f"{path}:{sha256_file(path)[:16]}"


def teacher_file(resolved: str, hp: AnomalibHyper, setting: Setting) -> Path:
    """The weights file of a resolved teacher (``resolve_teacher``'s value)."""
    origin, _, digest = resolved.rpartition(":")
    if origin == "distilled-efficientnet_lite0":
        return Path(setting.scratch) / "teachers" / f"{digest}.pth"
    if origin == "anomalib":
        return anomalib_teacher_file(str(hp.model_extra.get("model_size", "small")))
    return Path(origin)


def ensure_distilled(hp: AnomalibHyper, setting: Setting) -> Path:
    """The distilled teacher of ``hp`` on disk: distilled now (resumable, with progress)
    unless it is there already."""
    from stages.methods.anomalib_models.teacher import distill_teacher

    path = teacher_file(hp.teacher, hp, setting)
    if path.is_file():
        log.info("EfficientAd teacher %s already distilled, skipping", path.name)
        return path
    rows = good_training_rows(setting)
    root = Path(setting.workdir)
    log.info("distilling EfficientAd's teacher from efficientnet_lite0 on %d good training "
             "images of %d categories -> %s", len(rows),
             len({r["category"] for r in rows}), path)  # fmt: skip
    started = time.perf_counter()
    images = decode([str(root / r["path"]) for r in rows], setting.crop)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = distill_teacher(images.astype(np.float32) / 255.0, path, _distill_config(hp), log=log)
    log.info("EfficientAd teacher ready in %.0f s", time.perf_counter() - started)
    return out


# --- penalty images -----------------------------------------------------------------------------
def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_penalty(value: str, setting: Setting) -> str:
    """``<origin>:<hash>`` of the penalty images; a one-line error when there are none."""
    if value == "other-categories":
        rows = good_training_rows(setting)
        if len({r["category"] for r in rows}) < 2:
            raise UserError("EfficientAd penalty: other-categories needs a second category in "
                            "data.categories to take penalty images from; name a folder of "
                            "images instead (penalty: path/to/folder)")  # fmt: skip
        return f"{value}:{stable_hash([r['sha256'] for r in rows])[:16]}"
    folder = Path(value)
    files = _folder_images(folder) if folder.is_dir() else []
    if not files:
        raise UserError(f"EfficientAd penalty: {folder} is not a folder with images "
                        f"({', '.join(IMAGE_SUFFIXES)}); or use penalty: other-categories")  # fmt: skip
    return f"{folder}:{stable_hash([sha256_file(p) for p in files])[:16]}"


def penalty_images(resolved: str, setting: Setting, seed: int) -> np.ndarray:
    """``(n, 3, 224, 224)`` uint8 penalty images of a resolved ``penalty`` for the setting's
    category: at most :data:`PENALTY_LIMIT`, a seeded sample beyond."""
    origin = resolved.rpartition(":")[0]
    root = Path(setting.workdir)
    if origin == "other-categories":
        paths = [str(root / r["path"]) for r in good_training_rows(setting)
                 if r["category"] != setting.category]  # fmt: skip
    else:
        paths = [str(p) for p in _folder_images(Path(origin))]
    if len(paths) > PENALTY_LIMIT:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), PENALTY_LIMIT, replace=False))
        paths = [paths[i] for i in keep]
    if not paths:
        raise UserError(f"EfficientAd penalty: no penalty images for {setting.category} ({origin})")
    return decode(paths, setting.crop)
