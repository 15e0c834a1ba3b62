"""Anomaly maps on disk and on images: ground-truth masks in the model's geometry, the
per-experiment Parquet store of patch-score grids, and overlays for people.

Geometry. A patch family scores a grid of patches of the model's 224 x 224 input; its map
(:func:`stages.patch.maps.anomaly_maps`: bilinear upsampling to 224 x 224, Gaussian blur of
sigma 4) lives in that input's pixels. The masks go through exactly the image's resize and
crop (:func:`stages.backbones.geometry`) with nearest-neighbour resampling, so map and mask
are pixel-aligned. With ``extract.crop: true`` (resize the shorter side, centre-crop 224)
the evaluated pixels are those of the centre crop: a defect outside it is not evaluated
(nor seen by the model); with ``crop: false`` the whole image is resized to 224 x 224 and
every pixel is evaluated (non-square images are squeezed, as their images are). A mask
pixel is a defect pixel iff it is non-zero; a good image has an all-zero mask.

Store. The test images' patch-score grids of every done patch experiment are one Parquet
file ``<maps>/<key[:2]>/<key>.parquet`` (``image_id``, ``grid`` as float16 ``h * w`` values
in row-major order; the grid shape in the file's metadata), written atomically before the
experiment's row reaches the database, so a done patch experiment always has its maps and
a killed run never leaves half a file. A family that reconstructs its input also stores a
few test images' inputs and reconstructions (uint8) in ``<key>.examples.parquet`` beside
them, for the report's figure. float16 keeps 3 significant digits of a score,
enough for a picture; the metrics are computed from the float32 grids before storing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.errors import UserError
from stages.images import INPUT_SIZE, read_image, resize_crop
from stages.io import atomic_path

# (H, W) of every anomaly map: the model's input.
MAP_SIZE = (INPUT_SIZE, INPUT_SIZE)
# Masks are resized with nearest-neighbour resampling, so a mask stays binary.
NEAREST = Image.Resampling.NEAREST
GRID_META = b"grid_shape"
META = b"geometry"


# --- masks -------------------------------------------------------------------------------------
def load_masks(
    paths: Sequence[str | None], image_paths: Sequence[str], backbone: str, crop: bool
) -> np.ndarray:
    """``(n, 224, 224)`` boolean defect masks in the model's geometry; ``None`` (a good
    image): all False. A mask whose size differs from its image (changed since the dataset
    stage checked it) is a one-line ``UserError`` naming both files."""
    out = np.zeros((len(paths), *MAP_SIZE), dtype=bool)
    for i, (path, image_path) in enumerate(zip(paths, image_paths, strict=True)):
        if path is None:
            continue
        try:
            with read_image(path) as mask, Image.open(image_path) as image:
                if mask.size != image.size:
                    raise UserError(
                        f"{path}: mask is {mask.size[0]}x{mask.size[1]}, expected "
                        f"{image.size[0]}x{image.size[1]} like its image {image_path} "
                        "(rerun the dataset stage: dvc repro dataset)"
                    )
                resized = resize_crop(mask.convert("L"), backbone, crop, NEAREST)
        except OSError as exc:
            raise UserError(f"{path}: cannot read this mask ({exc}); rerun the dataset "
                            "stage (dvc repro dataset)") from None  # fmt: skip
        out[i] = np.asarray(resized) != 0
    return out


# --- the grid store ------------------------------------------------------------------------
def grid_path(maps_dir: str | Path, key: str) -> Path:
    """Where the grids of experiment ``key`` are stored."""
    return Path(maps_dir) / key[:2] / f"{key}.parquet"


def write_grids(
    maps_dir: str | Path,
    key: str,
    image_ids: Sequence[str],
    grids: np.ndarray,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Store one experiment's test-image grids ``(n, h, w)`` as float16 (atomically);
    ``meta`` (JSON) goes into the file's metadata: the stage records the image geometry
    there (``category``, ``backbone``, ``crop``), so a map can be drawn over its image."""
    grids = np.asarray(grids)
    if grids.ndim != 3 or len(grids) != len(image_ids):
        raise ValueError(f"grids {grids.shape} do not match {len(image_ids)} images")
    h, w = grids.shape[1:]
    values = pa.array(np.ascontiguousarray(grids, dtype=np.float16).reshape(-1))
    columns = {
        "image_id": pa.array(list(image_ids), pa.string()),
        "grid": pa.FixedSizeListArray.from_arrays(values, h * w),
    }
    metadata = {GRID_META: json.dumps([h, w]).encode(), META: json.dumps(meta or {}).encode()}
    table = pa.table(columns).replace_schema_metadata(metadata)
    path = grid_path(maps_dir, key)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_grids(maps_dir: str | Path, key: str) -> tuple[list[str], np.ndarray]:
    """``(image_ids, grids (n, h, w) float32)`` of one experiment; ``UserError`` if absent."""
    table = _grid_table(maps_dir, key)
    h, w = json.loads((table.schema.metadata or {})[GRID_META])
    values = table.column("grid").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    grids = values.astype(np.float32).reshape(table.num_rows, h, w)
    return table.column("image_id").to_pylist(), grids


def grid_meta(maps_dir: str | Path, key: str) -> dict[str, Any]:
    """The metadata :func:`write_grids` stored with an experiment's grids."""
    table = _grid_table(maps_dir, key)
    return json.loads((table.schema.metadata or {}).get(META, b"{}"))


def _grid_table(maps_dir: str | Path, key: str) -> pa.Table:
    path = grid_path(maps_dir, key)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no stored anomaly maps for experiment {key} (only done "
                        "patch experiments have maps; see evaluate.maps)") from None  # fmt: skip
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: unreadable anomaly-map file ({exc}); delete it and rerun "
                        "the evaluate stage") from None  # fmt: skip
    return table


def _stored(path: Path, key: str, what: str, families: str) -> pa.Table:
    """A per-experiment file the evaluate stage stores beside the grids; a missing or
    unreadable one is a one-line ``UserError`` saying what to rerun."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no stored {what} for experiment {key} (stored by the "
                        f"evaluate stage for done experiments of {families}; rerun it to "
                        "store them)") from None  # fmt: skip
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: unreadable file ({exc}); delete it and rerun the evaluate "
                        "stage") from None  # fmt: skip


# --- reconstructions (families that rebuild their input) ---------------------------------
def example_path(maps_dir: str | Path, key: str) -> Path:
    """Where a few test images' inputs and reconstructions of experiment ``key`` are stored."""
    return Path(maps_dir) / key[:2] / f"{key}.examples.parquet"


def write_examples(maps_dir: str | Path, key: str, image_ids: Sequence[str],
                   inputs: np.ndarray, reconstructions: np.ndarray) -> Path:  # fmt: skip
    """Store ``(n, 3, h, w)`` uint8 inputs and reconstructions of ``image_ids`` (atomically)."""
    inputs, reconstructions = np.asarray(inputs, np.uint8), np.asarray(reconstructions, np.uint8)
    if inputs.shape != reconstructions.shape or len(inputs) != len(image_ids):
        raise ValueError(f"examples {inputs.shape} / {reconstructions.shape} do not match "
                         f"{len(image_ids)} images")  # fmt: skip
    size = int(np.prod(inputs.shape[1:]))
    columns = {"image_id": pa.array(list(image_ids), pa.string())}
    for name, values in (("input", inputs), ("reconstruction", reconstructions)):
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, size)
    metadata = {GRID_META: json.dumps(list(inputs.shape[1:])).encode()}
    path = example_path(maps_dir, key)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns).replace_schema_metadata(metadata), tmp, compression="zstd")
    return path


def read_examples(maps_dir: str | Path, key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(image_ids, inputs, reconstructions)`` ((n, 3, h, w) uint8) of one experiment."""
    table = _stored(example_path(maps_dir, key), key, "reconstructions",
                    "reconstruction families")  # fmt: skip
    shape = json.loads((table.schema.metadata or {})[GRID_META])
    out = [table.column(n).combine_chunks().flatten().to_numpy(zero_copy_only=False)
           .reshape(table.num_rows, *shape) for n in ("input", "reconstruction")]  # fmt: skip
    return table.column("image_id").to_pylist(), out[0], out[1]


# --- embeddings (a labelled family's per-image features) -----------------------------------
def embedding_path(maps_dir: str | Path, key: str) -> Path:
    """Where the test images' embeddings of experiment ``key`` are stored."""
    return Path(maps_dir) / key[:2] / f"{key}.embeddings.parquet"


def write_embeddings(maps_dir: str | Path, key: str, image_ids: Sequence[str],
                     values: np.ndarray) -> Path:  # fmt: skip
    """Store ``(n, d)`` float32 embeddings of ``image_ids`` (atomically)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) != len(image_ids):
        raise ValueError(f"embeddings {values.shape} do not match {len(image_ids)} images")
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    table = pa.table({"image_id": pa.array(list(image_ids), pa.string()), "embedding": column})
    path = embedding_path(maps_dir, key)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_embeddings(maps_dir: str | Path, key: str) -> tuple[list[str], np.ndarray]:
    """``(image_ids, embeddings (n, d) float32)`` of one experiment; ``UserError`` if absent."""
    table = _stored(embedding_path(maps_dir, key), key, "embeddings", "labelled families")
    column = table.column("embedding").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return table.column("image_id").to_pylist(), values.reshape(table.num_rows, -1)


# --- pictures ------------------------------------------------------------------------------
def overlay(
    image: np.ndarray, amap: np.ndarray, mask: np.ndarray, vmin: float, vmax: float
) -> np.ndarray:
    """An RGB uint8 picture: the image, the anomaly map over it (jet, half transparent,
    scaled to ``[vmin, vmax]``) and the mask outline in white."""
    from matplotlib import colormaps
    from scipy import ndimage

    base = np.asarray(image, dtype=np.float32) / 255.0
    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormaps["jet"](scaled)[..., :3]
    picture = 0.55 * base + 0.45 * heat
    edge = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), border_value=0)
    edge = ndimage.binary_dilation(edge, iterations=1)
    picture[edge] = 1.0
    return (picture * 255.0 + 0.5).astype(np.uint8)
