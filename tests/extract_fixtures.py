"""A tiny MVTec-like dataset with the dataset and augment indexes the extract stage reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from stages.io import sha256_file

# category -> (PIL mode, side in pixels, augmentation transforms)
CATEGORIES: dict[str, tuple[str, int, list[str]]] = {
    "alpha": ("RGB", 48, ["rot90", "hflip"]),
    "beta": ("L", 40, []),
}
_OPS = {
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
}


def draw_image(seed: int, mode: str, size: int, anomalous: bool = False) -> Image.Image:
    """A smooth textured image; anomalies get a bright square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3 if mode == "RGB" else 1):
        fx, fy, phase = rng.uniform(1, 4, size=3)
        channels.append(127 + 80 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, size=(size, size, len(channels)))
    if anomalous:
        top, left = rng.integers(4, size // 2, size=2)
        pixels[top : top + size // 4, left : left + size // 4] = 255
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def make_dataset(
    root: Path,
    categories: dict[str, tuple[str, int, list[str]]] | None = None,
    n_train: int = 6,
    n_test: int = 4,
) -> dict[str, Any]:
    """Write PNGs, ``cache/dataset/index.parquet`` and ``cache/augment/index.parquet``.

    Returns the ``data`` and ``augment`` params sections (paths relative to ``root``).
    """
    categories = categories or CATEGORIES
    rows, augmented = [], []
    for c, (category, (mode, size, transforms)) in enumerate(categories.items()):
        images = [("train", "good", i) for i in range(n_train)]
        images += [("test", "good" if i % 2 == 0 else "crack", i) for i in range(n_test)]
        for split, defect, i in images:
            image_id = f"{split}/{defect}/{i:03d}"
            path = Path("data") / category / f"{image_id}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            seed = 1000 * c + i + (500 if split == "test" else 0)
            image = draw_image(seed, mode, size, anomalous=defect != "good")
            image.save(root / path)
            rows.append(
                {
                    "category": category,
                    "image_id": image_id,
                    "split": split,
                    "defect_type": defect,
                    "is_anomaly": defect != "good",
                    "path": str(path),
                    "mask_path": None,
                    "width": size,
                    "height": size,
                    "mode": mode,
                    "sha256": sha256_file(root / path),
                }
            )
            if split != "train":
                continue
            for transform in transforms:
                aug_path = Path("cache/augment") / category / f"{image_id}@{transform}.png"
                (root / aug_path).parent.mkdir(parents=True, exist_ok=True)
                image.transpose(_OPS[transform]).save(root / aug_path)
                augmented.append(
                    {
                        "category": category,
                        "image_id": f"{image_id}@{transform}",
                        "source_image_id": image_id,
                        "transform": transform,
                        "path": str(aug_path),
                        "sha256": sha256_file(root / aug_path),
                        "source_sha256": rows[-1]["sha256"],
                    }
                )
    index = root / "cache/dataset/index.parquet"
    index.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), index)
    augment_schema = pa.schema(
        [
            (name, pa.string())
            for name in (
                "category",
                "image_id",
                "source_image_id",
                "transform",
                "path",
                "sha256",
                "source_sha256",
            )
        ]
    )
    augment_index = root / "cache/augment/index.parquet"
    augment_index.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(augmented, schema=augment_schema), augment_index)
    return {
        "data": {
            "root": "data",
            "categories": list(categories),
            "index": "cache/dataset/index.parquet",
        },
        "augment": {
            "out": "cache/augment",
            "transforms": {name: spec[2] for name, spec in categories.items()},
        },
    }


def write_params(root: Path, sections: dict[str, Any], extract: dict[str, Any]) -> Path:
    """Write ``root/params.yaml`` with the dataset sections and an ``extract`` section."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({**sections, "extract": extract}, sort_keys=False))
    return path
